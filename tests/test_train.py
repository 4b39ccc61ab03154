"""Tests for vaedraw.train: a step learns, a tiny real run writes its directory, resume is exact, refusals."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from vaedraw import checkpoint as ckpt_io
from vaedraw import data
from vaedraw.config import RunConfig, build_config
from vaedraw.errors import ConfigError, DataError, VaedrawError
from vaedraw import evaluate
from vaedraw.plots import read_metrics
from vaedraw.run import load_run
from vaedraw.sample import GaussianMixture
from vaedraw import distributed
from vaedraw.train import learning_rate, train

train_mod = importlib.import_module("vaedraw.train")  # the module (the package exports the function)
# A model and budgets small enough for a run to take about a second on one core.
SMALL = {"model.channels": "4", "model.hidden": "16", "model.latent_dim": "4", "train.batch_size": "16",
         "train.eval_images": "100", "sample.fit_gmm": "false", "train.log_every": "2", "train.eval_every": "3",
         "train.picture_every": "3", "train.checkpoint_every": "3"}


def _grid_size(n: int, nrow: int) -> tuple[int, int]:
    """(width, height) of plots.image_grid: 28-pixel tiles, 2-pixel gaps, scaled by 2."""
    rows = math.ceil(n / nrow)
    return 2 * (nrow * 30 + 2), 2 * (rows * 30 + 2)


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- one step
def _real_step(cfg, split):
    """The model and the step exactly as the training loop builds them (fast path, noise, fused Adam)."""
    model, _, step_fn, _ = train_mod._build(cfg, distributed.Context(), split, None)
    return model.train(), step_fn


@pytest.mark.parametrize("preset,overrides", [
    ("default", {"model.channels": "4", "model.hidden": "16"}),
    ("seed", {}),
    ("conditional", {"model.channels": "4", "model.hidden": "16"}),
])
def test_one_training_step_changes_every_weight(preset, overrides, mnist_dir):
    cfg = build_config(preset, overrides=overrides)
    test = data.load_split("mnist", "test", mnist_dir)
    x, y = data.to_float(test.images[:8]), test.labels[:8]
    model, step = _real_step(cfg, test)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, recon, kl = step(x, y, learning_rate(0, cfg)).tolist()
    assert all(math.isfinite(v) for v in (loss, recon, kl))
    assert loss == pytest.approx(recon + kl, rel=1e-5) and kl >= 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(before)


def test_steps_on_a_fixed_batch_lower_the_loss(mnist_dir):
    cfg = build_config("default", overrides={"model.channels": "4", "model.hidden": "16",
                                             "data.binarize": "none", "train.lr": "1e-2"})
    test = data.load_split("mnist", "test", mnist_dir)
    x, y = data.to_float(test.images[:32]), test.labels[:32]
    _, step = _real_step(cfg, test)
    losses = [step(x, y, cfg.train.lr)[0].item() for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0]


# ----------------------------------------------------------------------------- a tiny real run
def test_a_tiny_run_writes_its_directory(tiny_run, mnist_dir):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "command.txt", "metrics.jsonl", "checkpoint.safetensors", "pictures", "curves.png",
            "progress.gif", "samples.png", "gmm.safetensors"} <= names

    cfg = RunConfig.from_dict(json.loads((tiny_run / "config.json").read_text()))
    assert (cfg.train.steps, cfg.train.seed, cfg.train.batch_size, cfg.train.eval_images) == (6, 7, 32, 200)
    assert (cfg.model.conv.channels, cfg.model.conv.hidden, cfg.sample.gmm_components) == (8, 32, 5)
    ckpt = ckpt_io.load(tiny_run / ckpt_io.CHECKPOINT_NAME)
    assert ckpt.config == cfg and ckpt.step == 6
    command = (tiny_run / "command.txt").read_text().splitlines()
    assert len(command) == 1 and command[0].startswith(f"vaedraw train --out {tiny_run} ")
    assert "--steps 6 --seed 7" in command[0]

    rows = read_metrics(tiny_run / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert [r["step"] for r in test_rows] == [3, 6]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "recon", "kl"))
        assert r["loss"] == pytest.approx(r["recon"] + r["kl"], rel=1e-5)
    # an untrained Bernoulli decoder starts near 784 * log 2 = 543 nats; six steps move it below that
    assert train_rows[-1]["loss"] < 784 * math.log(2)
    # the logged test loss is that of the saved model, recomputed here from the checkpoint
    run = load_run(tiny_run, device="cpu")
    test = data.load_split("mnist", "test", mnist_dir)
    again = evaluate.heldout_loss(run.model, evaluate.eval_inputs(test.images[:200], True), test.labels[:200])
    assert again["loss"] == pytest.approx(test_rows[-1]["loss"], rel=1e-6)

    pictures = sorted(p.name for p in (tiny_run / "pictures").iterdir())
    assert pictures == ["step_0000003.png", "step_0000006.png"]
    with Image.open(tiny_run / "pictures" / pictures[0]) as img:
        assert img.size == _grid_size(50, 10)  # 10 inputs, 10 reconstructions, 30 fixed codes
    with Image.open(tiny_run / "samples.png") as img:
        assert img.size == _grid_size(100, 10)
    with Image.open(tiny_run / "curves.png") as img:
        assert img.format == "PNG" and min(img.size) > 100
    with Image.open(tiny_run / "progress.gif") as img:
        assert img.n_frames == 2

    gmm = GaussianMixture.load(tiny_run / "gmm.safetensors")
    assert gmm.means.shape == (5, 16) and gmm.scale_tril.shape == (5, 16, 16)
    assert torch.allclose(gmm.weights.sum(), torch.tensor(1.0), atol=1e-5)
    assert run.gmm is not None and run.step == 6


# ----------------------------------------------------------------------------- resume
def _cfg(steps: int, **extra: str) -> RunConfig:
    return build_config("default", overrides={**SMALL, "train.lr_schedule": "constant", "train.steps": str(steps),
                                              **extra})


def test_resume_continues_exactly(tmp_path, mnist_dir):
    """k steps, then a resume to 2k, ends with the weights of an uninterrupted 2k-step run (CPU)."""
    k = 3
    split = tmp_path / "split"
    train(_cfg(k), split, device="cpu", data_dir=mnist_dir, progress=False, argv=["test"])
    at_k = ckpt_io.load(split / ckpt_io.CHECKPOINT_NAME)
    assert at_k.step == k
    train(_cfg(2 * k), split, device="cpu", data_dir=mnist_dir, resume=True, progress=False, argv=["test"])
    whole = tmp_path / "whole"
    train(_cfg(2 * k), whole, device="cpu", data_dir=mnist_dir, progress=False, argv=["test"])

    a = ckpt_io.load(split / ckpt_io.CHECKPOINT_NAME)
    b = ckpt_io.load(whole / ckpt_io.CHECKPOINT_NAME)
    assert a.step == b.step == 2 * k
    assert a.model_state.keys() == b.model_state.keys()
    for name in a.model_state:
        assert torch.equal(a.model_state[name], b.model_state[name]), name
        assert not torch.equal(a.model_state[name], at_k.model_state[name]), name  # it did train on
    sa, sb = a.optim_state["state"], b.optim_state["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for key in sa[pid]:
            assert torch.equal(torch.as_tensor(sa[pid][key]), torch.as_tensor(sb[pid][key])), (pid, key)
    assert torch.equal(a.rng["cpu"], b.rng["cpu"])
    # the held-out evaluations agree too, and the resumed log has one test row per evaluation step
    test_a = [r for r in read_metrics(split / "metrics.jsonl") if r["split"] == "test"]
    test_b = [r for r in read_metrics(whole / "metrics.jsonl") if r["split"] == "test"]
    assert [r["step"] for r in test_a] == [r["step"] for r in test_b] == [3, 6]
    assert [r["loss"] for r in test_a] == [r["loss"] for r in test_b]
    assert (split / "command.txt").read_text().count("test") == 2


def test_an_existing_run_is_not_overwritten(tiny_run, tmp_path, mnist_dir):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    with pytest.raises(VaedrawError, match="--resume"):
        train(_cfg(2), tiny_run, device="cpu", data_dir=mnist_dir, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(VaedrawError, match="not empty"):
        train(_cfg(2), other, device="cpu", data_dir=mnist_dir, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(VaedrawError, match="no checkpoint"):
        train(_cfg(2), tmp_path / "empty", device="cpu", data_dir=mnist_dir, resume=True, progress=False)


def _stored(run_dir: Path) -> RunConfig:
    return RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


def test_a_conflicting_resume_is_refused_unless_keep_is_given(tiny_run, tmp_path, mnist_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    stored = _stored(run)

    conflicting = _stored(run)
    conflicting.model.latent_dim = 3
    conflicting.train.lr = 5e-4
    with pytest.raises(ConfigError, match=r"model\.latent_dim.*train\.lr|train\.lr.*model\.latent_dim"):
        train(conflicting, run, device="cpu", data_dir=mnist_dir, resume=True, progress=False)
    assert _stored(run) == stored

    # keep the stored config, but honour the harmless changes (one more step, no mixture refit)
    conflicting.train.steps, conflicting.sample.fit_gmm = 7, False
    train(conflicting, run, device="cpu", data_dir=mnist_dir, resume=True, keep="stored", progress=False)
    kept = _stored(run)
    assert kept.model.latent_dim == stored.model.latent_dim and kept.train.lr == stored.train.lr
    assert kept.train.steps == 7 and ckpt_io.load(run / ckpt_io.CHECKPOINT_NAME).step == 7

    # or take the new values where the weights allow it
    new = _stored(run)
    new.train.lr, new.train.steps = 5e-4, 8
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train(new, run, device="cpu", data_dir=mnist_dir, resume=True, progress=False)
    train(new, run, device="cpu", data_dir=mnist_dir, resume=True, keep="new", progress=False)
    assert _stored(run).train.lr == 5e-4
    last = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"][-1]
    assert last["step"] == 8 and last["lr"] == learning_rate(7, new)  # the new rate's schedule is in effect


def test_keep_new_cannot_change_the_network_shape(tiny_run, tmp_path, mnist_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    new = _stored(run)
    new.model.latent_dim, new.train.steps = 3, 7
    with pytest.raises(VaedrawError, match="latent_dim"):
        train(new, run, device="cpu", data_dir=mnist_dir, resume=True, keep="new", progress=False)
    assert _stored(run) == _stored(tiny_run)


def test_epochs_convert_to_steps(tmp_path, full_mnist_dir):
    out = tmp_path / "run"
    # ceil(0.001 * 60000 / 16) = 4 steps
    train(_cfg(1000), out, device="cpu", data_dir=full_mnist_dir, progress=False, epochs=0.001)
    assert _stored(out).train.steps == 4
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 4


# ----------------------------------------------------------------------------- validation before any write
def test_a_refused_start_leaves_nothing_behind_and_the_corrected_command_works(tmp_path, mnist_dir):
    out = tmp_path / "run"
    refusals = [
        (dict(cfg=_cfg(2, **{"train.batch_size": "65536"})), ConfigError, "larger than the training set"),
        (dict(data_dir=tmp_path / "no-such-folder"), DataError, "no-such-folder"),
        (dict(epochs=1e308), ConfigError, "--epochs"),
        (dict(device="cuda:99"), VaedrawError, "cuda"),
    ]
    for change, error, words in refusals:
        kw = {"cfg": _cfg(2), "data_dir": mnist_dir, "device": "cpu", **change}
        with pytest.raises(error, match=words):
            train(kw.pop("cfg"), out, progress=False, **kw)
        assert not out.exists(), change
    out.mkdir()  # an existing empty folder stays empty too
    with pytest.raises(ConfigError):
        train(_cfg(2, **{"train.batch_size": "65536"}), out, device="cpu", data_dir=mnist_dir, progress=False)
    assert list(out.iterdir()) == []
    train(_cfg(2), out, device="cpu", data_dir=mnist_dir, progress=False)
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 2


def test_one_trainer_per_run_directory_and_a_killed_one_leaves_no_stale_lock(tiny_run, tmp_path, mnist_dir):
    import signal
    import subprocess
    import sys

    from vaedraw.errors import RunLocked
    from vaedraw.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    more = {"train.steps": 7, "sample.fit_gmm": False}
    holder = RunDir(run)
    holder.lock()  # as another trainer would
    with pytest.raises(RunLocked, match="another `vaedraw train`"):
        train(None, run, device="cpu", data_dir=mnist_dir, resume=True, changes=more, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    holder.unlock()

    # a trainer killed while holding the lock: the kernel releases it with the process
    proc = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(120)"), str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunLocked):
        train(None, run, device="cpu", data_dir=mnist_dir, resume=True, changes=more, progress=False)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    train(None, run, device="cpu", data_dir=mnist_dir, resume=True, changes=more, progress=False)
    assert ckpt_io.load(run / ckpt_io.CHECKPOINT_NAME).step == 7


def test_the_run_records_the_data_it_was_trained_on(tiny_run, mnist_dir):
    recorded = json.loads((tiny_run / "data.json").read_text())
    train_split, test_split = data.load_dataset("mnist", mnist_dir)
    assert recorded == {"train": train_split.provenance, "test": test_split.provenance}
    assert recorded["train"]["source"] == "folder" and recorded["train"]["files"]
    assert load_run(tiny_run, device="cpu").data_source == recorded


def test_resume_without_options_continues_the_stored_config(tiny_run, tmp_path, mnist_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    train(None, run, device="cpu", data_dir=mnist_dir, resume=True, changes={"train.steps": 8}, progress=False)
    stored = _stored(run)
    assert stored.train.steps == 8 and stored.model == _stored(tiny_run).model
    assert ckpt_io.load(run / ckpt_io.CHECKPOINT_NAME).step == 8


# ----------------------------------------------------------------------------- progress and the end of a run
def test_progress_in_a_log_file_is_a_plain_line_every_tenth_of_the_run():
    import io

    log = io.StringIO()
    bar = train_mod.Progress(200, "training", "steps", enabled=True, file=log)
    for step in range(1, 201):
        if step % 20 == 0:
            bar.set_stats(f", loss {100.0 - step / 10:.2f}")
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 10
    assert lines[0].startswith("vaedraw: training: 20/200 steps (10%)")
    assert lines[-1].startswith("vaedraw: training: 200/200 steps (100%)")
    assert "loss 80.00" in lines[-1] and "steps/s" in lines[-1]  # the stats as of the end, once
    quiet = io.StringIO()
    bar = train_mod.Progress(10, "training", "steps", enabled=False, file=quiet)
    for step in range(1, 11):
        bar.update(1)
    assert quiet.getvalue() == ""


def test_a_signal_during_the_mixture_fit_stops_and_resume_finishes_the_run(tmp_path, mnist_dir, monkeypatch):
    import os
    import signal
    import time

    from vaedraw.errors import TrainingInterrupted

    def signalled_fit(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("the signal did not stop the fit")

    monkeypatch.setattr(train_mod, "fit_gmm", signalled_fit)
    out = tmp_path / "run"
    cfg = _cfg(3, **{"sample.fit_gmm": "true", "sample.gmm_components": "3"})
    with pytest.raises(TrainingInterrupted, match=r"stopped while finishing the run .*step 3.*finish it with: "
                                                  rf"vaedraw train --out {out} --resume") as stop:
        train(cfg, out, device="cpu", data_dir=mnist_dir, progress=False)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert not (out / "gmm.safetensors").exists() and not (out / "samples.png").exists()
    rows = read_metrics(out / "metrics.jsonl")
    monkeypatch.undo()
    train(None, out, device="cpu", data_dir=mnist_dir, resume=True, progress=False)
    assert (out / "gmm.safetensors").exists() and (out / "samples.png").exists()
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 3 and read_metrics(out / "metrics.jsonl") == rows


def test_progress_of_a_resumed_run_counts_tenths_of_what_is_left():
    import io

    log = io.StringIO()
    bar = train_mod.Progress(1000, "training", "steps", initial=900, enabled=True, file=log)
    for _ in range(100):
        bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("vaedraw: training: 910/1,000 steps (91%)")
