"""One-shot GPU check: correctness and speed of every GPU variant of the training step, then the seed
preset's full 30,000-step schedule with the fastest correct variant.

    benchmarks/gpu_check.sh --data-dir DIR            (on the GPU machine; about 6 minutes)
    benchmarks/gpu_check.sh --data-dir DIR --device cpu --dry-run    (the script's logic, on a CPU)

For `seed` and `default`, each variant (eager fp32 reference, TF32, bf16 autocast, whole-step CUDA graph,
channels-last, the stride-1 transposed convs as flipped-kernel convs, torch.compile default and
reduce-overhead) is timed at steady state (ms/step from CUDA-synchronized wall time) and checked: it
trains --check-steps steps of the preset's schedule from the same weights, and its test loss must be
finite and within --tol of the eager float32 reference's. A variant that fails is reported, never fatal.
Work is ordered so that a time limit (--budget-s) drops the least important items last: the full run
comes right after the CUDA-graph variants; compile variants and the end-to-end `vaedraw train` run last.
Writes gpu_check.json and a log to $OUT when OUT is set; prints a compact table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Trainer, check_loss, load_data, machine, sync, vaedraw_command  # noqa: E402

import torch  # noqa: E402

from vaedraw import fastpath  # noqa: E402
from vaedraw.config import preset  # noqa: E402
from vaedraw.evaluate import heldout_loss  # noqa: E402

# name -> (Plan fields or None for the plain eager reference, TF32, cudnn.benchmark, compile mode)
GRAPH_VARIANTS = {
    "eager fp32 (reference)": (None, False, False, None),
    "eager fused-adam tf32": ({}, True, True, None),
    "eager bf16": ({"precision": "bf16"}, True, True, None),
    "graph fp32": ({"cuda_graph": True}, False, True, None),
    "graph tf32": ({"cuda_graph": True}, True, True, None),
    "graph tf32+conv": ({"cuda_graph": True, "conv_as_conv": True}, True, True, None),
    "graph bf16": ({"cuda_graph": True, "precision": "bf16"}, True, True, None),
    "graph bf16+conv": ({"cuda_graph": True, "precision": "bf16", "conv_as_conv": True}, True, True, None),
    "graph bf16+cl": ({"cuda_graph": True, "precision": "bf16", "channels_last": True}, True, True, None),
    "graph bf16+cl+conv": ({"cuda_graph": True, "precision": "bf16", "channels_last": True, "conv_as_conv": True},
                           True, True, None),
    "graph bf16+conv, no cudnn.benchmark": ({"cuda_graph": True, "precision": "bf16", "conv_as_conv": True},
                                            True, False, None),
}
COMPILE_VARIANTS = {
    "compile tf32": ({"compile": True}, True, True, "default"),
    "compile bf16": ({"compile": True, "precision": "bf16"}, True, True, "default"),
    "compile reduce-overhead bf16+conv": ({"compile": True, "precision": "bf16", "conv_as_conv": True}, True, True,
                                          "reduce-overhead"),
}


def set_backends(tf32: bool, bench: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = bench


def build(cfg, device, spec) -> Trainer:
    fields, tf32, bench, mode = spec
    set_backends(tf32, bench)
    if fields is None:
        return Trainer(cfg, device, None)
    fields = dict(fields)
    if cfg.model.arch != "seed":
        fields.pop("conv_as_conv", None)
    if device.type != "cuda":
        fields.pop("cuda_graph", None)
    plan = fastpath.Plan(reason="gpu_check", **fields)
    tr = Trainer(cfg, device, plan)
    if mode and mode != "default":
        tr.fast.forward = torch.compile(tr.fast.objective, mode=mode)
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


def full_run(name: str, spec, device, data, steps: int, log) -> dict:
    cfg = preset("seed")
    tr = build(cfg, device, spec)
    torch.manual_seed(cfg.train.seed)
    sync(device)
    t0 = time.perf_counter()
    total = tr.train(data.batcher, 0, steps)
    sync(device)
    seconds = time.perf_counter() - t0
    loss = heldout_loss(tr.model, data.x_test, data.y_test)["loss"]
    row = {"variant": name, "steps": steps, "seconds": seconds, "ms_per_step": seconds / steps * 1000,
           "test_loss": loss, "mean_train_loss": (total / steps)[0].item()}
    log(f"full run: {name}: {steps} steps in {seconds:.1f}s ({row['ms_per_step']:.3f} ms/step), "
        f"test loss {loss:.3f}")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with the four MNIST IDX .gz files")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--presets", default="seed,default", help="seed first: the full run needs its numbers")
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    p.add_argument("--check-steps", type=int, default=400, help="steps before the correctness check")
    p.add_argument("--tol", type=float, default=0.02, help="relative test-loss tolerance vs eager float32")
    p.add_argument("--full-steps", type=int, default=30_000, help="the full seed schedule (0: skip)")
    p.add_argument("--budget-s", type=float, default=370, help="stop starting new items after this")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-cli-run", action="store_true", help="skip the end-to-end `vaedraw train` run")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: check the script's logic (CPU is fine)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps, args.check_steps, args.full_steps = 2, 3, 20
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / "gpu_check.log", "a") if out_dir else None

    def log(msg: str) -> None:
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    device = torch.device(args.device)
    t_start = time.perf_counter()

    def left() -> float:  # seconds of the budget left
        return args.budget_s - (time.perf_counter() - t_start)

    report: dict = {"machine": machine(device), "rows": [], "full": []}
    log(f"gpu_check on {report['machine']}")
    try:
        report["rng_in_graph"] = rng_in_graph_check(device)
    except Exception as e:
        report["rng_in_graph"] = f"FAILED {type(e).__name__}: {e}"
    log(f"rng inside CUDA graphs: {report['rng_in_graph']}")

    def save() -> None:
        if out_dir:
            (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))

    data = {name: load_data(preset(name), device, args.data_dir)
            for name in [s.strip() for s in args.presets.split(",") if s.strip()]}

    def run_variants(variants: dict) -> None:
        for name, d in data.items():
            # the reference row, if it ran: a failed reference leaves the others without a ratio, not a wrong one
            ref = next((r for r in report["rows"] if r["preset"] == name and "reference" in r["variant"]
                        and "ms_per_step" in r), None)
            for vname, spec in variants.items():
                if left() < 20:
                    log(f"{name} {vname}: skipped (time budget)")
                    continue
                row = {"preset": name, "variant": vname}
                try:
                    cfg = preset(name)
                    cfg.train.steps = max(cfg.train.steps, args.check_steps)
                    # one build per variant (a compile costs tens of seconds): first the check from the initial
                    # weights, then the timing, which continues the same training
                    tr = build(cfg, device, spec)
                    t0 = time.perf_counter()
                    loss, finite = check_loss(tr, d, args.check_steps)
                    row["warmup_s"] = time.perf_counter() - t0  # includes compile or capture
                    row["ms_per_step"] = time_steps(tr, d.batcher, args.steps, device)
                    del tr
                    row.update(test_loss=loss, finite=finite)
                    if ref is None and "reference" in vname:
                        ref = row
                    nan = float("nan")
                    row["speedup"] = ref["ms_per_step"] / row["ms_per_step"] if ref else nan
                    row["rel_diff"] = abs(loss - ref["test_loss"]) / abs(ref["test_loss"]) if ref else nan
                    row["correct"] = finite and math.isfinite(loss) and (ref is None or row["rel_diff"] <= args.tol)
                    log(f"{name} {vname}: {row['ms_per_step']:.3f} ms/step ({row['speedup']:.1f}x), warm-up "
                        f"{row['warmup_s']:.1f}s, test loss {loss:.3f} ({100 * row['rel_diff']:.2f}%) "
                        f"{'ok' if row['correct'] else 'WRONG'}")
                except Exception as e:  # report and go on
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    log(f"{name} {vname}: FAILED {row['error']}")
                    if logf:
                        logf.write(traceback.format_exc())
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                report["rows"].append(row)
                save()

    run_variants(GRAPH_VARIANTS)

    # the full seed schedule with the fastest correct variant
    seed_rows = [r for r in report["rows"] if r["preset"] == "seed" and r.get("correct")]
    if args.full_steps and seed_rows and "seed" in data:
        best = min(seed_rows, key=lambda r: r["ms_per_step"])
        need = args.full_steps * best["ms_per_step"] / 1000 * 1.3 + 10
        if left() > need:
            spec = {**GRAPH_VARIANTS, **COMPILE_VARIANTS}[best["variant"]]
            try:
                report["full"].append(full_run(best["variant"], spec, device, data["seed"], args.full_steps, log))
            except Exception as e:
                log(f"full run FAILED {type(e).__name__}: {e}")
        else:
            log(f"full run skipped: needs ~{need:.0f}s, {left():.0f}s left")
    save()

    if not args.no_compile:
        run_variants(COMPILE_VARIANTS)

    # the real command, end to end (evaluation every 2,000 steps, pictures every 200, checkpoints)
    if not args.no_cli_run and args.full_steps and "seed" in data and left() > 60:
        run_dir = (out_dir or Path("/tmp")) / "gpu_check_seed_run"
        cmd, env = vaedraw_command("train", "--preset", "seed", "--device", args.device, "--data-dir", args.data_dir,
                                   "--out", str(run_dir), "--no-progress", "--steps", str(args.full_steps))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(30, left()))
            secs = time.perf_counter() - t0
            tail = proc.stderr.strip().splitlines()[-4:]
            report["cli_run"] = {"rc": proc.returncode, "seconds": secs, "tail": tail}
            log(f"vaedraw train --preset seed ({args.full_steps} steps, end to end): rc {proc.returncode}, "
                f"{secs:.1f}s; " + " | ".join(tail))
        except subprocess.TimeoutExpired:
            report["cli_run"] = {"rc": None, "seconds": time.perf_counter() - t0, "tail": ["timed out"]}
            log("vaedraw train --preset seed: stopped at the time budget")
    save()

    # compact table
    log("\n| preset | variant | ms/step | vs eager | warm-up s | test loss | rel. diff | ok |")
    log("|---|---|---:|---:|---:|---:|---:|---|")
    for r in report["rows"]:
        if "error" in r:
            log(f"| {r['preset']} | {r['variant']} | failed: {r['error'][:80]} | | | | | no |")
        else:
            log(f"| {r['preset']} | {r['variant']} | {r['ms_per_step']:.3f} | {r['speedup']:.1f}x | "
                f"{r['warmup_s']:.1f} | {r['test_loss']:.3f} | {100 * r['rel_diff']:.2f}% | "
                f"{'yes' if r['correct'] else 'NO'} |")
    for f in report["full"]:
        ref = next((r for r in report["rows"] if r["preset"] == "seed" and "reference" in r["variant"]), None)
        ratio = f", {ref['ms_per_step'] / f['ms_per_step']:.1f}x eager" if ref and "ms_per_step" in ref else ""
        log(f"seed full schedule ({f['steps']} steps) with {f['variant']}: {f['seconds']:.1f}s "
            f"({f['ms_per_step']:.3f} ms/step{ratio}), test loss {f['test_loss']:.3f}")
    log(f"rng inside CUDA graphs: {report['rng_in_graph']}; total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
