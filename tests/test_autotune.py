"""The measured training plan: cache written and reused, wrong losses rejected, explicit settings honoured,
the RNG and the model untouched (bitwise the same run as the static plan), plan.json in the run directory."""

from __future__ import annotations

import json

import pytest
import torch

from vaedraw import autotune, fastpath
from vaedraw import checkpoint as ckpt_io
from vaedraw import data
from vaedraw.config import build_config
from vaedraw.distributed import Context
from vaedraw.models import build_model
from vaedraw.train import train

TINY = {"model.conv.channels": "4", "model.conv.hidden": "16", "model.latent_dim": "4", "train.batch_size": "16",
        "train.eval_images": "50", "sample.fit_gmm": "false", "train.log_every": "2", "train.eval_every": "4",
        "train.picture_every": "4", "train.checkpoint_every": "4", "train.steps": "4"}
CPU = torch.device("cpu")
REAL_OTHER_CORES = autotune.LoadMeter.other_cores  # the fixture below replaces it in every test


@pytest.fixture(autouse=True)
def _quick(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "MIN_STEPS", 0)  # the tiny runs below are measured anyway
    monkeypatch.setattr(autotune, "ROUNDS", 2)
    # a quiet machine unless a test says otherwise (other tests' processes must not make these re-measure)
    monkeypatch.setattr(autotune.LoadMeter, "other_cores", lambda self: 0.0)


@pytest.fixture(scope="module")
def split(mnist_dir):
    return data.load_split("mnist", "test", mnist_dir, progress=False)


def _setup(overrides=None):
    cfg = build_config("default", overrides={**TINY, **(overrides or {})})
    static = fastpath.choose_plan(cfg.train, cfg.model.arch, CPU)
    torch.manual_seed(0)
    return cfg, static, build_model(cfg.model, (1, 28, 28))


def test_the_choice_is_cached_and_the_second_run_measures_nothing(split, monkeypatch, tmp_path):
    cfg, static, model = _setup()
    plan, record = autotune.settle(static, model, cfg, Context(), split)
    assert record["source"] == "measured"
    names = [t["plan"] for t in record["timings"]]
    assert names[0] == "fp32"  # the plain float32 step is always a candidate, measured first
    assert any(t["ms"] is not None for t in record["timings"])
    path = tmp_path / "cache" / "plans.json"
    assert autotune.cache_path() == path and path.is_file()
    stored = json.loads(path.read_text())["plans"]
    (entry,) = stored.values()
    key = json.loads(next(iter(stored)))
    assert key["arch"] == "conv" and key["batch_size"] == 16 and key["image_shape"] == [1, 28, 28]
    assert key["device"] == "cpu" and key["model"] == autotune.device_model(CPU) and key["torch"] == torch.__version__
    assert entry["plan"] == {s: getattr(plan, s) for s in autotune.SWITCHES}

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    again, record2 = autotune.settle(static, model, cfg, Context(), split)
    assert record2["source"] == "cache" and str(path) in again.reason
    assert {s: getattr(again, s) for s in autotune.SWITCHES} == entry["plan"]
    # another batch size is another key: measured again
    cfg3, static3, model3 = _setup({"train.batch_size": "8"})
    with pytest.raises(AssertionError, match="measured again"):
        autotune.settle(static3, model3, cfg3, Context(), split)


def test_a_candidate_whose_loss_is_off_is_rejected(split, monkeypatch):
    cfg, static, model = _setup()
    forward = fastpath.Objective.forward

    def off(self, x, y=None):  # channels-last candidates compute a loss 10% too high
        out = forward(self, x, y)
        return out * 1.1 if self.plan.channels_last else out

    monkeypatch.setattr(fastpath.Objective, "forward", off)
    plan, record = autotune.settle(static, model, cfg, Context(), split)
    cl = [t for t in record["timings"] if "channels_last" in t["plan"]]
    assert cl and all(t["note"].startswith("rejected") and t["ms"] is None for t in cl)
    assert not plan.channels_last
    plain = record["timings"][0]
    assert plain["plan"] == "fp32" and plain["ms"] is not None and plain["loss"] == pytest.approx(
        record["reference_loss"], rel=1e-6)


def test_the_fastest_correct_candidate_wins(split, monkeypatch):
    """With a timer under the test's control: bf16 'takes' 1 ms, everything else 10 ms."""
    cfg, static, model = _setup()
    if not autotune.native_bf16(CPU):
        pytest.skip("this CPU has no native bf16: a single precision candidate")
    now = [0.0]
    step_call = fastpath.FastStep.__call__

    def timed_call(self, *a, **k):
        now[0] += 0.001 if self.plan.precision == "bf16" and not self.plan.channels_last else 0.010
        return step_call(self, *a, **k)

    monkeypatch.setattr(fastpath.FastStep, "__call__", timed_call)
    monkeypatch.setattr(autotune, "_clock", lambda: now[0])
    plan, record = autotune.settle(static, model, cfg, Context(), split)
    assert plan.precision == "bf16" and not plan.channels_last, record["timings"]
    slow = [t for t in record["timings"] if t["plan"] == "fp32 + channels_last"]
    assert slow and slow[0]["note"].startswith("slower")  # stopped early: over 1.5x the best


def test_autotune_false_is_the_static_table(split, monkeypatch):
    cfg, static, model = _setup({"train.autotune": "false"})
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    plan, record = autotune.settle(static, model, cfg, Context(), split)
    assert plan == static and record["source"] == "static"
    row = fastpath.AUTO[(fastpath.device_class(CPU), "conv")]
    assert plan.precision == row["precision"] and plan.channels_last == row["channels_last"]
    assert not autotune.cache_path().exists()


def test_explicit_precision_is_every_candidates(split):
    cfg, static, model = _setup({"train.precision": "fp32", "train.compile": "off"})
    cands = autotune.candidates(static, cfg.train, "conv", CPU)
    assert cands and all(c.precision == "fp32" and not c.compile for c in cands)
    plan, record = autotune.settle(static, model, cfg, Context(), split)
    assert plan.precision == "fp32" and not plan.compile
    auto = autotune.candidates(static, build_config("default").train, "conv", CPU)
    assert {c.precision for c in auto} == ({"fp32", "bf16"} if autotune.native_bf16(CPU) else {"fp32"})
    assert not any(c.compile or c.cuda_graph for c in auto)  # no compile on a CPU unless asked
    seed = autotune.candidates(fastpath.choose_plan(build_config("seed").train, "seed", CPU),
                               build_config("seed").train, "seed", CPU)
    assert {c.conv_as_conv for c in seed} == {False, True}


def test_measuring_leaves_the_rng_and_the_model_alone(split):
    cfg, static, model = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    autotune.settle(static, model, cfg, Context(), split)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_measured_run_trains_bitwise_as_the_same_static_plan(mnist_dir, tmp_path, monkeypatch):
    cfg = build_config("default", overrides=TINY)
    train(cfg, tmp_path / "tuned", device="cpu", data_dir=mnist_dir, progress=False, argv=["test"])
    record = json.loads((tmp_path / "tuned" / "plan.json").read_text())
    assert record["source"] == "measured" and record["timings"] and record["cache"]
    chosen = record["plan"]
    # the same plan from the static table: the row set to what was measured, autotune off
    key = (fastpath.device_class(CPU), "conv")
    monkeypatch.setitem(fastpath.AUTO, key, {k: v for k, v in chosen.items() if k != "cuda_graph"})
    static_cfg = build_config("default", overrides={**TINY, "train.autotune": "false"})
    train(static_cfg, tmp_path / "static", device="cpu", data_dir=mnist_dir, progress=False, argv=["test"])
    static_record = json.loads((tmp_path / "static" / "plan.json").read_text())
    assert static_record["source"] == "static" and static_record["plan"] == chosen
    a = ckpt_io.load(tmp_path / "tuned" / ckpt_io.CHECKPOINT_NAME)
    b = ckpt_io.load(tmp_path / "static" / ckpt_io.CHECKPOINT_NAME)
    assert a.step == b.step == 4
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)


def test_a_short_run_keeps_the_static_plan_unless_cached(split, monkeypatch):
    monkeypatch.setattr(autotune, "MIN_STEPS", 500)
    cfg, static, model = _setup()
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    plan, record = autotune.settle(static, model, cfg, Context(), split, remaining_steps=4)
    assert record["source"] == "static" and "too few" in plan.reason
    assert {s: getattr(plan, s) for s in autotune.SWITCHES} == {s: getattr(static, s) for s in autotune.SWITCHES}


def test_a_burst_of_other_load_does_not_decide_the_race(split, monkeypatch):
    """bf16 'takes' 1 ms and the rest 10 ms, but other load makes bf16's whole first round take 50 ms a step:
    timed one candidate after another it would lose; raced in interleaved rounds it still wins."""
    cfg, static, model = _setup()
    if not autotune.native_bf16(CPU):
        pytest.skip("this CPU has no native bf16: a single precision candidate")
    monkeypatch.setattr(autotune, "ROUNDS", 4)
    now, bf16_steps = [0.0], [0]
    step_call = fastpath.FastStep.__call__

    def timed_call(self, *a, **k):
        fast = self.plan.precision == "bf16" and not self.plan.channels_last
        if fast:
            bf16_steps[0] += 1
        # its checked step, warm-up and first round (ROUND_STEPS steps) meet the burst
        burst = fast and bf16_steps[0] <= 1 + autotune.WARMUP + autotune.ROUND_STEPS
        now[0] += 0.050 if burst else 0.001 if fast else 0.010
        return step_call(self, *a, **k)

    monkeypatch.setattr(fastpath.FastStep, "__call__", timed_call)
    monkeypatch.setattr(autotune, "_clock", lambda: now[0])
    plan, record = autotune.settle(static, model, cfg, Context(), split)
    assert plan.precision == "bf16" and not plan.channels_last, record["timings"]
    (row,) = [t for t in record["timings"] if t["plan"] == "bf16"]
    assert row["rounds_ms"][0] == pytest.approx(50) and row["ms"] == pytest.approx(1)


def test_a_plan_measured_on_a_busy_machine_is_measured_again(split, monkeypatch):
    cfg, static, model = _setup()
    load = [2.0]  # cores' worth of other processes
    monkeypatch.setattr(autotune.LoadMeter, "other_cores", lambda self: load[0])
    _, first = autotune.settle(static, model, cfg, Context(), split)
    assert first["source"] == "measured" and first["contended"] and first["other_cores"] == 2.0
    load[0] = 0.1  # quiet now: measured again, and this result is kept for good
    _, second = autotune.settle(static, model, cfg, Context(), split)
    assert second["source"] == "measured" and not second["contended"]
    _, third = autotune.settle(static, model, cfg, Context(), split)
    assert third["source"] == "cache"
    (entry,) = autotune.read_cache().values()
    assert entry["tries"] == 2 and entry["other_cores"] == 0.1


def test_a_busy_machine_measures_at_most_max_tries_times(split, monkeypatch):
    cfg, static, model = _setup()
    monkeypatch.setattr(autotune.LoadMeter, "other_cores", lambda self: 2.0)
    sources = [autotune.settle(static, model, cfg, Context(), split)[1]["source"]
               for _ in range(autotune.MAX_TRIES + 1)]
    assert sources == ["measured"] * autotune.MAX_TRIES + ["cache"]


def test_the_load_meter_sees_another_busy_process():
    import subprocess
    import sys
    import time

    meter = autotune.LoadMeter()
    other_cores = REAL_OTHER_CORES.__get__(meter)
    if meter.busy0 is None:
        pytest.skip("no /proc/stat here")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    try:
        time.sleep(1.0)
        other = other_cores()
    finally:
        busy.wait()
    assert other is not None and other > 0.5  # the spinning process's core (it is not this process's time)


def test_torch_compile_is_a_cuda_candidate_only_for_long_runs():
    cfg = build_config("default")
    assert not autotune._compile_pays(cfg.train, CPU, False, 10.0, 10**6)  # never on a CPU unless asked
    cuda = torch.device("cuda")
    assert not autotune._compile_pays(cfg.train, cuda, False, 1.0, 12_000)  # 12 s of training: no
    assert autotune._compile_pays(cfg.train, cuda, False, 1.0, 10**6)  # 1,000 s: yes
    off = build_config("default", overrides={"train.compile": "off"})
    assert not autotune._compile_pays(off.train, cuda, False, 1.0, 10**6)
