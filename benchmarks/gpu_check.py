"""One-shot GPU check in one call of at most 10 minutes: is each GPU variant of the training step correct,
how fast is it, and how long do the real commands take end to end.

    OUT=/some/folder benchmarks/gpu_check.sh --data-dir DIR          (GPU machine: about 9 minutes)
    OUT=/tmp/gpu_dry OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --dry-run \\
        --data-dir DIR --doc /tmp/SPEED_dry.md                       (the whole flow at tiny sizes on a CPU)

Items, in priority order (the time budget drops the later ones first):

1. random numbers drawn inside a captured CUDA graph change at every replay;
2. seed: eager float32 (the reference: common.Trainer's plain step, TF32 off) and whole-step CUDA graphs
   (bf16 or TF32, flipped-kernel convs, channels-last). Each trains --check-steps steps of the preset's
   schedule from the preset's initial weights; its test loss must be finite and within --tol of the
   reference's. Then its steady-state ms/step over --steps fresh batches (CUDA-synchronized wall time);
3. the seed preset's full 30,000-step schedule with the fastest correct variant (targets: at most 15 s of
   training, i.e. 0.5 ms/step, and at least 10x the eager ms/step);
4. default: eager float32, graph bf16, graph tf32, checked and timed alike;
5. hierarchical: the same, with at most 1,000 check steps and 200 timed steps;
6. `vaedraw train --preset seed` end to end, in a fresh process with a fresh plan cache (so the plan is
   measured, as on a first use);
7. `vaedraw train --preset default` end to end, then `vaedraw eval RUN --iwae-k 5000` on the 10,000 test
   images (target: at most 60 s);
8. `vaedraw train --preset hierarchical` for as many steps as the time left allows (from item 5's ms/step),
   then `vaedraw eval` with k = 1,000 and k = 5,000 (on 1,000 images when time is short);
9. seed with torch.compile in mode reduce-overhead (its fusions inside its own CUDA graphs), checked and
   timed like item 2, when time is left.

Every item runs in its own try/except (a failure is logged with its traceback and reported, never fatal),
and starts only when its estimated cost fits in what is left of --budget-s; what does not fit is reported
as skipped. The tables go into --doc between `<!-- speed:cuda:start -->` and `<!-- speed:cuda:end -->`,
rewritten after every section (default: docs/SPEED.md for a CUDA run; --work-dir/SPEED.md for a dry run
or a CPU run, so that they never overwrite the GPU figures). With OUT set, gpu_check.json and gpu_check.log
are written there after every item, the doc is copied to $OUT/SPEED.md after every section, and the eval
JSONs and the plan cache land there too; the run directories go to --work-dir, not OUT (few files come
back from OUT). --dry-run shrinks every size so the whole flow runs on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()  # the budget counts from here: importing torch and CUDA's start-up included

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Trainer, check_loss, load_data, machine, sync, vaedraw_command, write_block  # noqa: E402

import torch  # noqa: E402

from vaedraw import autotune, fastpath  # noqa: E402
from vaedraw.config import preset  # noqa: E402
from vaedraw.evaluate import heldout_loss  # noqa: E402
from vaedraw.sample import GMM_NAME  # noqa: E402

BLOCK = "speed:cuda"
REFERENCE = "eager fp32 (reference)"
# name -> (Plan fields, or None for the plain eager reference; TF32; cudnn.benchmark)
SEED_VARIANTS = {
    REFERENCE: (None, False, False),
    "graph bf16+conv": ({"cuda_graph": True, "precision": "bf16", "conv_as_conv": True}, True, True),
    "graph tf32+conv": ({"cuda_graph": True, "conv_as_conv": True}, True, True),
    "graph bf16+cl+conv": ({"cuda_graph": True, "precision": "bf16", "channels_last": True, "conv_as_conv": True},
                           True, True),
}
CONV_VARIANTS = {
    REFERENCE: (None, False, False),
    "graph bf16": ({"cuda_graph": True, "precision": "bf16"}, True, True),
    "graph tf32": ({"cuda_graph": True}, True, True),
}
# Last of all, when time is left: torch.compile's fusions inside its own CUDA graphs (mode reduce-overhead), what
# the seed step's many small kernels might still gain (a 4th element: the compile mode)
LATE_SEED_VARIANTS = {
    "compile reduce-overhead bf16+cl+conv": ({"compile": True, "precision": "bf16", "channels_last": True,
                                              "conv_as_conv": True}, True, True, "reduce-overhead"),
}
VARIANTS = {"seed": {**SEED_VARIANTS, **LATE_SEED_VARIANTS}, "default": CONV_VARIANTS, "hierarchical": CONV_VARIANTS}
SEED_PLAIN_PORT = (27.8, 28.0)  # the seed's full-schedule test loss of a plain port (docs/RESULTS.md)
FULL_TARGET_S, SPEEDUP_TARGET, EVAL_TARGET_S = 15.0, 10.0, 60.0
# kept for the hierarchical run's two evaluations at least: before any evaluation was timed, and after the
# default's (whose IWAE pass then scales the estimates)
HIER_EVAL_RESERVE_S = (150.0, 90.0)
# The hierarchical run is for its likelihood bounds, not an end-to-end time, so its fixed costs are cut:
# `--compile off` keeps any compiling candidate out of the plan measurement (tens of seconds; the step is then one
# of item 5's kind), and no mixture fit (its evaluations draw samples from the prior).
HIER_TRAIN_EXTRA = ("--compile", "off", "--set", "sample.fit_gmm=false")

# Cost guesses (seconds; ms/step as (eager, graph)) used until the check has measured better: each item is
# started only when its estimate fits in the time left. CUDA: the H200 figures of docs/SPEED.md (2026-12-04).
GUESS = {
    "cuda": {"ms": {"seed": (4.3, 0.9), "default": (3.9, 0.6), "hierarchical": (13.8, 3.3)},
             "setup_s": 3.0, "capture_s": 4.0, "compile_s": 60.0, "start_s": 20.0, "gmm_s": 65.0, "finish_s": 5.0,
             "eval_s": 0.3, "picture_s": 0.03, "checkpoint_s": 0.2, "quality_s": 15.0,
             "iwae_s_per_m": {"seed": 0.6, "default": 0.4, "hierarchical": 2.5}},  # seconds per million decodes
    "cpu": {"ms": {"seed": (150.0, 80.0), "default": (45.0, 40.0), "hierarchical": (140.0, 100.0)},
            "setup_s": 2.0, "capture_s": 0.0, "compile_s": 40.0, "start_s": 8.0, "gmm_s": 10.0, "finish_s": 3.0,
            "eval_s": 0.5, "picture_s": 0.2, "checkpoint_s": 0.3, "quality_s": 10.0,
            "iwae_s_per_m": {"seed": 300.0, "default": 300.0, "hierarchical": 700.0}},
}
DRY = {"steps": 3, "check_steps": 4, "full_steps": 20, "cli_steps": 20, "test_images": 200, "n_images": 50,
       "n_samples": 100, "iwae_k": (5, 5, 10)}  # iwae_k: default's, then the hierarchical run's two
DRY_SETS = {"train.eval_every": 10, "train.picture_every": 10, "train.checkpoint_every": 10, "train.log_every": 10,
            "train.eval_images": 200, "sample.gmm_components": 2}


class Terminated(BaseException):
    """SIGTERM (the machine's limit): stop where we are, keep what was measured."""


def _terminate(signum, frame):
    raise Terminated()


# ----------------------------------------------------------------------------- the step variants
def set_backends(tf32: bool, bench: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = bench


def build(cfg, device, spec) -> Trainer:
    fields, tf32, bench, *mode = spec
    set_backends(tf32, bench)
    if fields is None and cfg.train.grad_clip > 0:
        # the plain step does not clip gradients: the reference is then the fast path's float32 eager step
        fields = {}
    if fields is None:
        return Trainer(cfg, device, None)
    fields = dict(fields)
    if cfg.model.arch != "seed":
        fields.pop("conv_as_conv", None)
    if device.type != "cuda":
        fields.pop("cuda_graph", None)
    tr = Trainer(cfg, device, fastpath.Plan(reason="gpu_check", **fields))
    if mode and mode[0] != "default":
        tr.fast.forward = torch.compile(tr.fast.objective, mode=mode[0])
    return tr


def time_steps(tr: Trainer, batcher, steps: int, device) -> float:
    """Steady-state ms/step after 5 warm-up steps (compile, capture). Fresh batches every step."""
    for s in range(5):
        tr.step(*batcher.batch(s), tr.cfg.train.lr)
    xs = [batcher.batch(5 + s) for s in range(steps)]  # drawn beforehand: time the step alone
    sync(device)
    t0 = time.perf_counter()
    for x, y in xs:
        out = tr.step(x, y, tr.cfg.train.lr)
    sync(device)
    assert torch.isfinite(out).all(), "non-finite training loss"
    return (time.perf_counter() - t0) / steps * 1000


def rng_in_graph_check(device) -> str:
    """Noise drawn inside a captured graph must change at every replay (philox offsets advance)."""
    if device.type != "cuda":
        return "skipped (no CUDA)"
    noise = fastpath.Noise()
    x = torch.zeros(4096, device=device)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        noise.uniform_like(x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        u = noise.uniform_like(x)
        drop = fastpath.GlobalDropout(0.5, noise)(torch.ones_like(x))
    draws, masks = [], []
    for _ in range(3):
        g.replay()
        draws.append(u.clone())
        masks.append(drop.clone())
    torch.cuda.synchronize()
    differ = not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    mask_differ = not torch.equal(masks[0], masks[1])
    mean = torch.stack(draws).mean().item()
    ok = differ and mask_differ and abs(mean - 0.5) < 0.02
    return f"{'ok' if ok else 'FAILED'}: replays differ {differ}, dropout masks differ {mask_differ}, mean {mean:.3f}"


def full_run(name: str, spec, device, data, steps: int) -> dict:
    cfg = preset("seed")
    tr = build(cfg, device, spec)
    torch.manual_seed(cfg.train.seed)
    sync(device)
    t0 = time.perf_counter()
    total = tr.train(data.batcher, 0, steps)
    sync(device)
    seconds = time.perf_counter() - t0
    loss = heldout_loss(tr.model, data.x_test, data.y_test)["loss"]
    return {"variant": name, "steps": steps, "seconds": seconds, "ms_per_step": seconds / steps * 1000,
            "test_loss": loss, "mean_train_loss": (total / steps)[0].item()}


# ----------------------------------------------------------------------------- the check's state
class Check:
    """The report (JSON), the log, the time budget, the doc, and what has been measured so far."""

    def __init__(self, args, argv: list[str]):
        self.args, self.device = args, torch.device(args.device)
        self.t0 = STARTED
        self.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        self.work = Path(args.work_dir)
        for d in (self.out, self.work):
            if d:
                d.mkdir(parents=True, exist_ok=True)
        self.files = self.out or self.work  # the log, the JSON and the eval JSONs
        self.log_path = self.files / "gpu_check.log"
        self.logf = open(self.log_path, "a")
        self.cache_dir = self.work / "cache"  # a fresh plan cache: `vaedraw train` measures its plan
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.g = GUESS["cuda" if self.device.type == "cuda" else "cpu"]
        self._data: dict = {}
        command = shlex.join([Path(sys.executable).name, "benchmarks/gpu_check.py", *argv])
        self.report: dict = {"machine": machine(self.device), "command": command,
                             "date": time.strftime("%Y-%m-%d %H:%M %Z"), "budget_s": args.budget_s,
                             "dry_run": args.dry_run, "items": {}}

    # time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def timeout(self, est: float, cap: float = 1e9) -> float:
        """A subprocess's limit: generous against its estimate, never past the budget."""
        return max(10.0, min(cap, self.left() - 5, max(2 * est + 30, self.left() - 60)))

    # records
    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.logf.write(msg + "\n")
        self.logf.flush()

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        if self.out:
            tmp = self.out / "gpu_check.json.tmp"
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
            tmp.replace(self.out / "gpu_check.json")

    def publish(self) -> None:
        """The doc block, rewritten; a copy to $OUT/SPEED.md."""
        try:
            doc, tmp = Path(self.args.doc), Path(self.args.doc + ".tmp")
            if doc.exists():
                shutil.copyfile(doc, tmp)
            write_block(tmp, BLOCK, render(self))
            tmp.replace(doc)  # at once: a SIGTERM never leaves half a doc
            if self.out:
                shutil.copyfile(self.args.doc, self.out / "SPEED.md")
        except Exception:
            self.log(f"writing {self.args.doc} FAILED:\n{traceback.format_exc()}")

    def item(self, key: str, est: float, fn) -> dict:
        """Run fn() -> dict as one item: skipped when `est` seconds do not fit, failures recorded, saved after."""
        entry: dict = {"estimate_s": round(est, 1)}
        self.report["items"][key] = entry
        if est > self.left():
            entry["skipped"] = f"time budget: needs ~{est:.0f} s, {max(0.0, self.left()):.0f} s left"
            self.log(f"{key}: skipped ({entry['skipped']})")
        else:
            t0 = time.perf_counter()
            try:
                entry.update(fn())
            except Exception as e:  # report and go on
                entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.log(f"{key}: FAILED {entry['error']}\n{traceback.format_exc()}")
            except Terminated:
                entry["error"] = "interrupted by SIGTERM"
                raise
            finally:
                entry["item_s"] = round(time.perf_counter() - t0, 1)
                free_memory(self.device)
        self.save()
        return entry

    def get(self, key: str) -> dict:
        return self.report["items"].get(key, {})

    # what has been measured
    def data(self, name: str):
        if name not in self._data:
            d = load_data(preset(name), self.device, self.args.data_dir)
            if self.args.dry_run:
                n = DRY["test_images"]
                d = dataclasses.replace(d, x_test=d.x_test[:n], y_test=d.y_test[:n])
            self._data[name] = d
        return self._data[name]

    def drop_data(self) -> None:
        """Leave the device to the subprocesses."""
        self._data.clear()
        free_memory(self.device)

    def ms(self, name: str, graph: bool) -> float:
        """ms/step of the preset's eager reference or of its fastest correct graph variant: measured, else guessed."""
        rows = [r for v, r in self.variant_rows(name) if "ms_per_step" in r and r.get("ok")
                and (v != REFERENCE) == graph]
        return min(r["ms_per_step"] for r in rows) if rows else self.g["ms"][name][1 if graph else 0]

    def variant_rows(self, name: str) -> list[tuple[str, dict]]:
        return [(v, self.get(f"variant/{name}/{v}")) for v in VARIANTS[name] if f"variant/{name}/{v}" in
                self.report["items"]]

    def check_steps(self, name: str) -> int:
        return min(self.args.check_steps, 1000) if name == "hierarchical" else self.args.check_steps

    def timed_steps(self, name: str) -> int:
        return min(self.args.steps, 200) if name == "hierarchical" else self.args.steps


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- items 2-5: variants, full run
def variant(c: Check, name: str, vname: str, spec) -> dict:
    d = c.data(name)
    cfg = preset(name)
    n_check = c.check_steps(name)
    cfg.train.steps = max(cfg.train.steps, n_check)
    tr = build(cfg, c.device, spec)
    plan = tr.plan.describe() if tr.plan else "plain eager step"
    t0 = time.perf_counter()
    loss, finite = check_loss(tr, d, n_check)
    check_s = time.perf_counter() - t0
    ms = time_steps(tr, d.batcher, c.timed_steps(name), c.device)
    del tr
    ref = c.get(f"variant/{name}/{REFERENCE}") if vname != REFERENCE else {"ms_per_step": ms, "test_loss": loss}
    row = {"plan": plan, "ms_per_step": ms, "check_steps": n_check, "timed_steps": c.timed_steps(name),
           "check_s": check_s, "warmup_s": max(0.0, check_s - n_check * ms / 1000), "test_loss": loss,
           "finite": finite}
    if "ms_per_step" in ref:
        row["speedup"] = ref["ms_per_step"] / ms
        row["rel_diff"] = abs(loss - ref["test_loss"]) / abs(ref["test_loss"])
    row["ok"] = finite and math.isfinite(loss) and row.get("rel_diff", 0.0) <= c.args.tol
    c.log(f"{name} {vname}: {ms:.3f} ms/step ({row.get('speedup', math.nan):.1f}x), warm-up {row['warmup_s']:.1f} s, "
          f"test loss {loss:.3f} ({100 * row.get('rel_diff', math.nan):.2f}%) {'ok' if row['ok'] else 'WRONG'}")
    return row


def variant_estimate(c: Check, name: str, spec) -> float:
    graph = bool(spec[0] and (spec[0].get("cuda_graph") or spec[0].get("compile")))
    compiling = bool(spec[0] and spec[0].get("compile"))
    steps = c.check_steps(name) + c.timed_steps(name) + 5
    return (c.g["setup_s"] + (c.g["capture_s"] if graph else 0) + (c.g["compile_s"] if compiling else 0)
            + 1.3 * steps * c.ms(name, graph) / 1000)


def variants_section(c: Check, name: str, variants: dict | None = None) -> None:
    """The preset's variants (`variants`: these instead; by default all but the late ones)."""
    if variants is None:
        variants = SEED_VARIANTS if name == "seed" else VARIANTS[name]
    for vname, spec in variants.items():
        c.item(f"variant/{name}/{vname}", variant_estimate(c, name, spec),
               lambda vname=vname, spec=spec: variant(c, name, vname, spec))
    c.publish()


def full_section(c: Check) -> None:
    # the fast variants only: the point is the fast path's full schedule, whose test loss is then set against
    # a plain port's (at 2,000 steps the two noise streams alone can differ by about 1%, docs/SPEED.md)
    rows = [(v, r) for v, r in c.variant_rows("seed") if "ms_per_step" in r and v != REFERENCE]
    correct = [(v, r) for v, r in rows if r["ok"]]
    # none within --tol: the fastest finite one still runs, flagged (its full-schedule loss tells more)
    pick = correct or [(v, r) for v, r in rows if r["finite"] and math.isfinite(r["test_loss"])]
    if not pick:
        c.report["items"]["full/seed"] = {"skipped": "no seed variant trained to a finite loss"}
        c.log("full run skipped: no usable seed variant")
    else:
        vname, best = min(pick, key=lambda vr: vr[1]["ms_per_step"])
        steps = c.args.full_steps
        est = steps * best["ms_per_step"] / 1000 * 1.3 + 10

        def run() -> dict:
            row = full_run(vname, SEED_VARIANTS[vname], c.device, c.data("seed"), steps)
            ref = c.get(f"variant/seed/{REFERENCE}")
            if "ms_per_step" in ref:
                row["speedup"] = ref["ms_per_step"] / row["ms_per_step"]
            row.update(check_rel_diff=best.get("rel_diff"), check_ok=best["ok"])
            c.log(f"full run: {vname}: {steps} steps in {row['seconds']:.1f} s ({row['ms_per_step']:.3f} ms/step, "
                  f"{row.get('speedup', math.nan):.1f}x eager), test loss {row['test_loss']:.3f}")
            return row

        c.item("full/seed", est, run)
    c.save()
    c.publish()


# ----------------------------------------------------------------------------- items 6-8: the real commands
def run_vaedraw(c: Check, args: list[str], timeout: float) -> dict:
    """`vaedraw ARGS` in a subprocess, its output appended to the log; on timeout SIGTERM (vaedraw train then
    saves a checkpoint), then SIGKILL. -> {rc, wall_s, timed_out, output}."""
    argv, env = vaedraw_command(*args)
    env.update(VAEDRAW_CACHE_DIR=str(c.cache_dir), PYTHONUNBUFFERED="1")
    c.log(f"$ vaedraw {shlex.join(args)}   (time limit {timeout:.0f} s)")
    start = c.log_path.stat().st_size
    t0 = time.perf_counter()
    timed_out = False
    with open(c.log_path, "a") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        except BaseException:  # Terminated: the child goes too
            proc.kill()
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    with open(c.log_path, errors="replace") as f:
        f.seek(start)
        output = f.read()
    c.log(f"vaedraw {args[0]}: exit {rc}, {wall:.1f} s" + (" (stopped at its time limit)" if timed_out else ""))
    tail = [line.strip() for line in output.splitlines() if line.strip()][-3:]
    return {"rc": rc, "wall_s": wall, "timed_out": timed_out, "tail": tail, "output": output}


def dry_sets(c: Check) -> list[str]:
    return [x for k, v in DRY_SETS.items() for x in ("--set", f"{k}={v}")] if c.args.dry_run else []


def plan_measure_s(c: Check, name: str, steps: int, quick: bool = False) -> float:
    """What `vaedraw train` spends measuring plans on first use (0 for runs too short to measure): autotune's
    budget, and a torch.compile candidate's where autotune would try one (quick: --compile off, never)."""
    if steps < autotune.MIN_STEPS:
        return 0.0
    cuda = c.device.type == "cuda"
    seconds = (autotune.BUDGET_CUDA_S if cuda else autotune.BUDGET_S) + 5
    if cuda and not quick:
        if steps * c.ms(name, graph=True) / 1000 > autotune.COMPILE_PAYBACK_S:
            seconds += autotune.COMPILE_BUDGET_S
    return seconds


def train_costs(c: Check, name: str, quick: bool = False) -> tuple[float, float]:
    """(fixed seconds, seconds per step) of `vaedraw train --preset NAME` end to end, the plan measurement
    aside: start-up, the mixture fit and the rest; per step the graph ms/step measured in-process (guessed
    before) and the periodic evaluations, pictures and checkpoints. quick: with HIER_TRAIN_EXTRA."""
    t = preset(name).train
    if c.args.dry_run:
        t = dataclasses.replace(t, **{k.split(".")[1]: v for k, v in DRY_SETS.items() if k.startswith("train.")})
    fits = [c.get(f"cli/train-{p}").get("gmm_s") for p in ("seed", "default")]
    gmm = 0.0 if quick else max([f for f in fits if f] or [c.g["gmm_s"]])
    per_step = (1.2 * c.ms(name, graph=True) / 1000 + c.g["eval_s"] / t.eval_every
                + c.g["picture_s"] / t.picture_every + c.g["checkpoint_s"] / t.checkpoint_every)
    return c.g["start_s"] + gmm + c.g["finish_s"], per_step


def train_estimate(c: Check, name: str, steps: int, quick: bool = False) -> float:
    fixed, per_step = train_costs(c, name, quick)
    return fixed + plan_measure_s(c, name, steps, quick) + steps * per_step


def run_facts(run_dir: Path, output: str) -> dict:
    """What a finished `vaedraw train` says about itself: the plan, its measurement, the mixture fit, the steady
    training ms/step (median of the logged windows), the last test loss."""
    facts: dict = {}
    for line in output.splitlines():
        if line.startswith("vaedraw: plan:"):
            facts["plan_line"] = line.strip()
        elif line.startswith("vaedraw: fast path"):
            facts["fast_path_line"] = line.strip()
            facts["plan"] = line.split(": ", 2)[-1].strip()
        m = re.search(r"gmm sampler fitted in (\d+(?:\.\d+)?) s", line)
        if m:
            facts["gmm_s"] = float(m.group(1))
    try:
        record = json.loads((run_dir / "plan.json").read_text())
        facts.update(plan_source=record.get("source"), plan_measure_s=record.get("seconds"))
    except (OSError, ValueError):
        pass
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        batch = json.loads((run_dir / "config.json").read_text())["train"]["batch_size"]
        ips = [r["images_per_s"] for r in rows if r.get("split") == "train" and r.get("images_per_s")]
        if ips:
            facts["train_ms_per_step"] = 1000 * batch / statistics.median(ips)
        tests = [r for r in rows if r.get("split") == "test"]
        if tests:
            facts["test_loss"], facts["steps_done"] = tests[-1]["loss"], tests[-1]["step"]
    except (OSError, ValueError, KeyError):
        pass
    return facts


def cli_train(c: Check, name: str, steps: int | None, timeout: float, extra: tuple[str, ...] = ()) -> dict:
    run_dir = c.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run from an earlier call
    args = ["train", "--preset", name, "--device", c.args.device, "--data-dir", c.args.data_dir,
            "--out", str(run_dir), "--no-progress", *(["--steps", str(steps)] if steps else []), *extra, *dry_sets(c)]
    r = run_vaedraw(c, args, timeout)
    facts = run_facts(run_dir, r.pop("output"))
    if r["rc"] != 0 and not (run_dir / "checkpoint.safetensors").exists():
        raise RuntimeError(f"vaedraw train exited {r['rc']}: {' | '.join(r['tail'])[-200:]}")
    return {**r, **facts, "run_dir": str(run_dir), "args": args, "steps": steps or preset(name).train.steps}


def eval_estimate(c: Check, name: str, k: int, n_images: int, quality: bool = True) -> float:
    done = c.get("cli/eval-default")
    per_m = c.g["iwae_s_per_m"][name]
    quality_s = c.g["quality_s"]
    if done.get("iwae_s"):  # measured on the default: scale by the step times' ratio
        per_m = done["iwae_s"] / (done["iwae_k"] * done["n_images"] / 1e6) * (c.ms(name, True) / c.ms("default", True))
        quality_s = done.get("quality_s") or quality_s
    return c.g["start_s"] + per_m * k * n_images / 1e6 + (quality_s if quality else 3.0) + c.g["finish_s"]


def cli_eval(c: Check, name: str, run: dict, k: int, n_images: int | None, est: float, cap: float,
             quality: bool = True) -> dict:
    path = c.files / f"eval_{name}_k{k}.json"
    path.unlink(missing_ok=True)
    args = ["eval", run["run_dir"], "--iwae-k", str(k), "--device", c.args.device, "--data-dir", c.args.data_dir,
            "--json", str(path), "--no-save"]
    if n_images:
        args += ["--n-images", str(n_images)]
    if not quality:  # the figures of the likelihood alone: one sample judged, no FD interval
        args += ["-n", "1", "--fd-bootstrap", "0"]
    elif c.args.dry_run:
        args += ["-n", str(DRY["n_samples"])]
    if not (Path(run["run_dir"]) / GMM_NAME).exists():
        args += ["--sampler", "prior"]  # a run without its mixture (not fitted, or stopped before the fit)
    r = run_vaedraw(c, args, c.timeout(est, cap))
    r.pop("output")
    if r["rc"] != 0:
        raise RuntimeError(f"vaedraw eval exited {r['rc']} after {r['wall_s']:.0f} s: {' | '.join(r['tail'])[-200:]}")
    res = json.loads(path.read_text())
    row = {**r, "args": args, "json": str(path), "iwae_k": k, "n_images": res["n_images"], "step": res.get("step")}
    for key in ("iwae", "iwae_se", "elbo", "elbo_se"):
        row[key] = res.get(key)
    row["iwae_s"] = res.get("seconds", {}).get("iwae")
    row["quality_s"] = res.get("seconds", {}).get("quality")
    if quality and res.get("samples"):
        row["fd"] = res["samples"].get("fd")
    c.log(f"eval {name} k={k}: IWAE {row['iwae']:.2f} +- {row['iwae_se']:.2f}, ELBO {row['elbo']:.2f} +- "
          f"{row['elbo_se']:.2f} on {row['n_images']:,} images, {r['wall_s']:.0f} s")
    return row


def seed_e2e(c: Check) -> None:
    steps = DRY["cli_steps"] if c.args.dry_run else None
    est = train_estimate(c, "seed", steps or preset("seed").train.steps)
    c.item("cli/train-seed", est, lambda: cli_train(c, "seed", steps, c.timeout(est)))
    c.publish()


def default_e2e(c: Check) -> None:
    steps = DRY["cli_steps"] if c.args.dry_run else None
    est = train_estimate(c, "default", steps or preset("default").train.steps)
    run = c.item("cli/train-default", est, lambda: cli_train(c, "default", steps, c.timeout(est)))
    c.publish()
    k = DRY["iwae_k"][0] if c.args.dry_run else 5000
    n = DRY["n_images"] if c.args.dry_run else None
    if "run_dir" in run:
        est = eval_estimate(c, "default", k, n or 10_000)
        c.item("cli/eval-default", est, lambda: cli_eval(c, "default", run, k, n, est, cap=240))
    else:
        c.report["items"]["cli/eval-default"] = {"skipped": "no default run to evaluate"}
        c.save()
    c.publish()


def hierarchical_steps(c: Check, reserve: float) -> tuple[int, float]:
    """Steps that fit in the time left less `reserve` (at item 5's graph ms/step) -> (steps, estimate s)."""
    if c.args.dry_run:
        return DRY["cli_steps"], train_estimate(c, "hierarchical", DRY["cli_steps"], quick=True)
    fixed, per_step = train_costs(c, "hierarchical", quick=True)
    fixed += plan_measure_s(c, "hierarchical", autotune.MIN_STEPS, quick=True)
    steps = int((c.left() - reserve - fixed - 10) / per_step) // 100 * 100
    steps = min(10 * preset("hierarchical").train.steps, steps)
    return steps, train_estimate(c, "hierarchical", max(steps, 0), quick=True)


def no_run(c: Check, ks: tuple[int, int]) -> None:
    for k in ks:
        c.report["items"][f"cli/eval-hierarchical-k{k}"] = {"skipped": "no hierarchical run to evaluate"}
    c.save()
    c.publish()


def hierarchical_run(c: Check) -> None:
    k1, k2 = (DRY["iwae_k"][1], DRY["iwae_k"][2]) if c.args.dry_run else (1000, 5000)
    n_full = DRY["n_images"] if c.args.dry_run else 10_000
    reserve = eval_estimate(c, "hierarchical", k1, n_full) + eval_estimate(c, "hierarchical", k2, n_full // 10,
                                                                              quality=False)
    if not c.args.dry_run:
        reserve = max(reserve, HIER_EVAL_RESERVE_S[1 if c.get("cli/eval-default").get("iwae_s") else 0])
    steps, est = hierarchical_steps(c, reserve)
    c.report["hierarchical_plan"] = {"steps": steps, "train_estimate_s": round(est, 1), "eval_reserve_s":
                                     round(reserve, 1), "left_s": round(c.left(), 1)}
    if steps < 1000 and not c.args.dry_run:
        c.report["items"]["cli/train-hierarchical"] = {
            "skipped": f"little time left ({max(0.0, c.left()):.0f} s): fewer than 1,000 steps would fit"}
        c.log("hierarchical run skipped: little time left")
        no_run(c, (k1, k2))
        return
    c.log(f"hierarchical run: {steps:,} steps (estimate {est:.0f} s, {reserve:.0f} s kept for the evaluations, "
          f"{c.left():.0f} s left)")
    # past its estimate, the run is stopped (checkpoint saved) in time for at least the k=1,000 evaluation
    timeout = max(60.0, c.left() - eval_estimate(c, "hierarchical", k1, n_full) - 10)
    run = c.item("cli/train-hierarchical", est,
                 lambda: cli_train(c, "hierarchical", steps, min(timeout, c.left() - 5), HIER_TRAIN_EXTRA))
    c.publish()
    if "run_dir" not in run:
        no_run(c, (k1, k2))
        return
    est1 = eval_estimate(c, "hierarchical", k1, n_full)
    c.item(f"cli/eval-hierarchical-k{k1}", est1, lambda: cli_eval(c, "hierarchical", run, k1, n_full, est1, cap=300))
    c.publish()
    n2 = n_full if eval_estimate(c, "hierarchical", k2, n_full, quality=False) < c.left() - 10 else n_full // 10
    if c.args.dry_run:
        n2 = n_full
    est2 = eval_estimate(c, "hierarchical", k2, n2, quality=False)
    c.item(f"cli/eval-hierarchical-k{k2}", est2,
           lambda: cli_eval(c, "hierarchical", run, k2, n2, est2, cap=300, quality=False))
    c.publish()


# ----------------------------------------------------------------------------- the doc block
def _f(v, fmt: str = ".2f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _status(e: dict, result: str) -> str | None:
    """Why an item has no figures (None when it has them: its `result` key is there)."""
    if not e:
        return "not reached"
    if "skipped" in e:
        return f"skipped: {e['skipped']}"
    if "error" in e:
        return f"failed: {e['error'][:120]}"
    return None if result in e else "interrupted"


def _plain(args: list[str], c: Check) -> str:
    """A command for the doc: the data folder as D, run directories as RUN, the eval JSON as OUT.json."""
    out = []
    for a in args:
        if a == c.args.data_dir:
            a = "D"
        elif a.startswith(str(c.work / "runs")):
            a = "RUN"
        elif a.endswith(".json") and a.startswith(str(c.files)):
            a = "OUT.json"
        out.append(a)
    return "vaedraw " + shlex.join(out)


def render_variants(c: Check, name: str) -> list[str]:
    ref_note = (" The reference here is the fast path's float32 eager step: it clips gradients at "
                f"train.grad_clip={preset(name).train.grad_clip:g} as training does (the plain step does not)."
                if preset(name).train.grad_clip > 0 else "")
    lines = [f"**{name}**: test loss after {c.check_steps(name):,} steps of the preset's schedule from its initial "
             f"weights; ms/step over {c.timed_steps(name):,} fresh batches.{ref_note}", "",
             "| variant | ms/step | x eager | warm-up s | test loss | rel. diff | ok |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for vname in VARIANTS[name]:
        e = c.get(f"variant/{name}/{vname}")
        status = _status(e, "ok")
        if status:
            lines.append(f"| {vname} | {status} | | | | | - |")
            continue
        ok = "yes" if e["ok"] else "NO" if e["finite"] else "NO (non-finite)"
        if "rel_diff" not in e:
            ok += " (no reference)"
        rel = f"{100 * e['rel_diff']:.2f}%" if "rel_diff" in e else "-"
        speedup = f"{e['speedup']:.1f}x" if "speedup" in e else "-"
        lines.append(f"| {vname} | {e['ms_per_step']:.3f} | {speedup} | {e['warmup_s']:.1f} | {e['test_loss']:.3f} | "
                     f"{rel} | {ok} |")
    return lines


def render_full(c: Check) -> list[str]:
    e = c.get("full/seed")
    head = (f"**seed, full schedule** ({c.args.full_steps:,} steps in this process, the fastest correct variant, "
            "else the fastest finite one):")
    status = _status(e, "seconds")
    if status:
        return [head, "", status]
    lo, hi = SEED_PLAIN_PORT
    off = max(lo - e["test_loss"], e["test_loss"] - hi, 0.0) / ((lo + hi) / 2)
    scale = c.args.full_steps / 30_000  # the targets are for the 30,000-step schedule
    rows = [("training time", f"{e['seconds']:.1f} s", f"<= {FULL_TARGET_S * scale:g} s",
             e["seconds"] <= FULL_TARGET_S * scale),
            ("ms/step", f"{e['ms_per_step']:.3f}", "<= 0.5", e["ms_per_step"] <= 0.5),
            ("x eager fp32 ms/step", f"{_f(e.get('speedup'), '.1f')}x", f">= {SPEEDUP_TARGET:g}x",
             (e.get("speedup") or 0) >= SPEEDUP_TARGET),
            ("test loss", f"{e['test_loss']:.3f} ({100 * off:.2f}% outside a plain port's {lo}-{hi})", "within 1%",
             off <= 0.01),
            (f"{c.check_steps('seed'):,}-step check vs eager fp32", f"{_f(100 * (e.get('check_rel_diff') or 0))}%",
             f"<= {100 * c.args.tol:g}%", (e.get("check_rel_diff") or 0) <= c.args.tol)]
    lines = [head[:-1] + f": {e['variant']}.", "", "| figure | measured | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {a} | {b} | {t} | {'yes' if ok else 'no'} |" for a, b, t, ok in rows]
    return lines


def render_cli(c: Check) -> list[str]:
    lines = ["**End to end** (each a fresh process: CUDA start-up, the plan measured on first use (fresh plan "
             "cache), periodic test evaluations, pictures, checkpoints and the mixture fit included; D: the data "
             "folder, RUN: the run directory):", "",
             "| command | steps | wall s | exit | plan | plan measured in | training ms/step | mixture fit s | "
             "test loss |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name in ("seed", "default", "hierarchical"):
        e = c.get(f"cli/train-{name}")
        status = _status(e, "wall_s")
        if status:
            lines.append(f"| `vaedraw train --preset {name}` | | {status} | | | | | | |")
            continue
        rc = f"{e['rc']}" + (" (time limit)" if e["timed_out"] else "")
        measured = f"{e['plan_measure_s']:.0f} s" if e.get("plan_measure_s") is not None else \
            (e.get("plan_source") or "-")
        lines.append(f"| `{_plain(e['args'], c)}` | {e.get('steps_done', e['steps']):,} | {e['wall_s']:.1f} | {rc} | "
                     f"{e.get('plan', '-')} | {measured} | {_f(e.get('train_ms_per_step'), '.3f')} | "
                     f"{_f(e.get('gmm_s'), '.0f')} | {_f(e.get('test_loss'), '.3f')} |")
    measured = [(n, c.get(f"cli/train-{n}").get("plan_line")) for n in ("seed", "default", "hierarchical")]
    if any(line for _, line in measured):
        lines += ["", "Plans measured on first use (`vaedraw train`'s own line):", ""]
        lines += [f"- {n}: `{line}`" for n, line in measured if line]
    return lines


def render_evals(c: Check) -> list[str]:
    k1, k2 = (DRY["iwae_k"][1], DRY["iwae_k"][2]) if c.args.dry_run else (1000, 5000)
    kd = DRY["iwae_k"][0] if c.args.dry_run else 5000
    lines = ["**Evaluations** (`vaedraw eval`, a fresh process; bounds in nats per test image, +- the standard "
             "error over the images; IWAE s: the importance-sampling pass alone):", "",
             "| run | command | images | wall s | IWAE bound | ELBO | IWAE s | FD |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = [("default", "cli/eval-default", True), ("hierarchical", f"cli/eval-hierarchical-k{k1}", False),
            ("hierarchical", f"cli/eval-hierarchical-k{k2}", False)]
    for name, key, target in keys:
        e = c.get(key)
        status = _status(e, "iwae")
        k = kd if target else int(key.rsplit("k", 1)[1])
        if status:
            lines.append(f"| {name} | k={k:,} | | {status} | | | | |")
            continue
        wall = f"{e['wall_s']:.1f}"
        if target:
            wall += f" (target <= {EVAL_TARGET_S:g}: {'met' if e['wall_s'] <= EVAL_TARGET_S else 'not met'})"
        lines.append(f"| {name} ({e.get('step') or 0:,} steps) | `{_plain(e['args'], c)}` | {e['n_images']:,} | "
                     f"{wall} | {e['iwae']:.2f} +- {e['iwae_se']:.2f} | {e['elbo']:.2f} +- {e['elbo_se']:.2f} | "
                     f"{_f(e.get('iwae_s'), '.1f')} | {_f(e.get('fd'))} |")
    plan = c.report.get("hierarchical_plan")
    e = c.get("cli/train-hierarchical")
    if plan and "wall_s" in e:
        lines += ["", f"Hierarchical run: {e.get('steps_done', e['steps']):,} steps (chosen to fit the time left, "
                      f"from item 5's graph ms/step) in {e['wall_s'] / 60:.1f} min end to end, with "
                      f"`{shlex.join(HIER_TRAIN_EXTRA)}`: no compiling candidate in the plan measurement and no "
                      "mixture fit, so its evaluations sample from the prior."]
    return lines


def render(c: Check) -> str:
    dry = " Dry run: tiny sizes, the figures mean nothing." if c.args.dry_run else ""
    skipped = sum("skipped" in e for e in c.report["items"].values())
    failed = sum("error" in e for e in c.report["items"].values())
    lines = [f"{c.report['machine']}; {c.report['date']}; `{c.report['command']}` (budget {c.args.budget_s:g} s, "
             f"{c.elapsed():.0f} s used so far; {skipped} items skipped, {failed} failed; ok: finite and within "
             f"{100 * c.args.tol:g}% of the eager float32 reference's test loss).{dry}", "",
             f"Random numbers inside CUDA graphs: {_status(c.get('rng'), 'result') or c.get('rng')['result']}.", ""]
    parts = [lambda: render_variants(c, "seed"), lambda: render_full(c), lambda: render_variants(c, "default"),
             lambda: render_variants(c, "hierarchical"), lambda: render_cli(c), lambda: render_evals(c)]
    for part in parts:
        try:
            lines += part() + [""]
        except Exception as e:  # a rendering slip must not cost the other tables
            lines += [f"(a table could not be written: {type(e).__name__}: {e}; see gpu_check.json)", ""]
    return "\n".join(lines).rstrip()


# ----------------------------------------------------------------------------- main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Usage: see the module docstring (benchmarks/gpu_check.py).")
    p.add_argument("--data-dir", required=True, help="folder with the four MNIST IDX .gz files")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant (hierarchical: at most 200)")
    p.add_argument("--check-steps", type=int, default=2000,
                   help="steps before the correctness check (hierarchical: at most 1,000)")
    p.add_argument("--tol", type=float, default=0.01, help="relative test-loss tolerance vs eager float32")
    p.add_argument("--full-steps", type=int, default=30_000, help="the seed preset's full schedule")
    p.add_argument("--budget-s", type=float, default=550, help="no item starts unless its estimate fits in this")
    p.add_argument("--doc", help="markdown file for the speed:cuda block (default: docs/SPEED.md on CUDA, else "
                                 "WORK_DIR/SPEED.md)")
    p.add_argument("--work-dir", default="/tmp/gpu_check", help="run directories and the plan cache")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: the whole flow on a CPU in a few minutes")
    p.add_argument("--no-hierarchical-run", action="store_true",
                   help="leave out item 8 (e.g. to run benchmarks/budget.py --preset hierarchical in a call of its own)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.check_steps, args.full_steps = DRY["steps"], DRY["check_steps"], DRY["full_steps"]
    if args.doc is None:
        real = args.device == "cuda" and not args.dry_run
        args.doc = str(REPO / "docs" / "SPEED.md") if real else str(Path(args.work_dir) / "SPEED.md")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    c = Check(args, argv)
    signal.signal(signal.SIGTERM, _terminate)
    c.log(f"gpu_check on {c.report['machine']}: {c.report['command']}")
    try:
        c.item("rng", 5, lambda: {"result": rng_in_graph_check(c.device)})
        c.log(f"rng inside CUDA graphs: {c.get('rng').get('result')}")
        c.publish()
        variants_section(c, "seed")
        full_section(c)
        variants_section(c, "default")
        variants_section(c, "hierarchical")
        c.drop_data()
        seed_e2e(c)
        default_e2e(c)
        if args.no_hierarchical_run:
            c.report["items"]["cli/train-hierarchical"] = {"skipped": "left out (--no-hierarchical-run)"}
            c.save()
        else:
            hierarchical_run(c)
        variants_section(c, "seed", LATE_SEED_VARIANTS)
    except Terminated:
        c.log(f"terminated (SIGTERM) after {c.elapsed():.0f} s; keeping what was measured")
    except Exception:  # nothing above should get here: items catch their own
        c.log(f"gpu_check FAILED:\n{traceback.format_exc()}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        plans = c.cache_dir / "plans.json"
        if c.out and plans.exists():
            shutil.copyfile(plans, c.out / "plans.json")
        c.save()
        c.publish()
        try:
            c.log("\n" + render(c))
        except Exception:
            c.log(traceback.format_exc())
        c.log(f"\ntotal {c.elapsed():.0f} s; doc block in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
