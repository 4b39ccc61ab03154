"""Training speed of the fast path against a plain eager loop, per preset, on one device.

    python benchmarks/speed.py [--device cpu|cuda] [--presets seed,default] [--steps N] [--check-steps N]

For each preset: the plain eager reference (common.plain_step: the model's ELBO terms, backward, foreach
Adam, one batch at a time) and the fast path (fastpath.FastStep with the plan `auto` picks on this device, or the
plans given by --variants) are built from the same initial weights in this process and timed in
alternating rounds, so a busy machine slows both alike. Reported: steady-state ms/step (median of the
rounds), images/s, process CPU ms/step (less sensitive to other load than wall time), compile time,
the speed-up, and a correctness check: both train for --check-steps steps of the preset's schedule on
the same batches, then the test loss (one z per image, fixed noise, 10,000 test images) is compared.

On the CPU the fast path's keep_memory (glibc keeps freed memory in the process) changes the allocator of
the whole process, so the eager reference runs with it too; --default-malloc leaves glibc's defaults for
both, to measure what the allocator setting itself gives (one invocation with and one without).

The table is printed and written into docs/SPEED.md between `<!-- speed:DEVICE:start/end -->` markers
(--no-write to skip). The default run takes a few minutes on 2 CPU cores.

--check-only runs the correctness check alone for the listed variants and prints how far apart their test
losses are; whether bf16 changes what the seed model learns, on a CPU:

    python benchmarks/speed.py --presets seed --variants fp32+cl+conv,bf16+cl+conv --check-steps 2000 --check-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Trainer, check_loss, load_data, machine, sync, write_block  # noqa: E402

import torch  # noqa: E402

from vaedraw import fastpath  # noqa: E402
from vaedraw.config import preset  # noqa: E402

VARIANTS = {  # name -> Plan fields over a float32 eager plan (the `auto` row is fastpath.AUTO's)
    "fp32": {},
    "fp32+cl": {"channels_last": True},
    "fp32+cl+conv": {"channels_last": True, "conv_as_conv": True},
    "bf16+cl+conv": {"precision": "bf16", "channels_last": True, "conv_as_conv": True},
    "bf16+conv": {"precision": "bf16", "conv_as_conv": True},
    "compile": {"compile": True},
    "bf16+compile": {"precision": "bf16", "compile": True},
    "graph": {"cuda_graph": True},
    "graph+bf16": {"cuda_graph": True, "precision": "bf16"},
    "graph+bf16+conv": {"cuda_graph": True, "precision": "bf16", "conv_as_conv": True},
    "graph+bf16+cl+conv": {"cuda_graph": True, "precision": "bf16", "channels_last": True, "conv_as_conv": True},
}


def plan_for(name: str, cfg, device: torch.device, default_malloc: bool = False) -> fastpath.Plan:
    if name == "auto":
        plan = fastpath.choose_plan(cfg.train, cfg.model.arch, device)
    else:
        plan = fastpath.Plan(reason=name, **VARIANTS[name])
    # keep_memory changes the whole process, the eager reference's steps included
    return replace(plan, conv_as_conv=plan.conv_as_conv and cfg.model.arch == "seed",
                   keep_memory=device.type == "cpu" and not default_malloc)


def time_rounds(trainers: dict[str, Trainer], x, y, steps: int, rounds: int) -> dict[str, dict]:
    """Alternate `rounds` rounds of `steps` steps over the trainers; per trainer the median ms/step."""
    device = x.device
    wall: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    lr = trainers[next(iter(trainers))].cfg.train.lr
    for _ in range(rounds):
        for name, tr in trainers.items():
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                out = tr.step(x, y, lr)
            out.sum().item()
            wall[name].append((time.perf_counter() - w0) / steps * 1000)
            cpu[name].append((time.process_time() - c0) / steps * 1000)
    return {k: {"ms": statistics.median(wall[k]), "ms_min": min(wall[k]), "cpu_ms": statistics.median(cpu[k])}
            for k in trainers}


def bench_preset(name: str, device: torch.device, variants: list[str], steps: int, rounds: int,
                 check_steps: int, data_dir, log=print, default_malloc: bool = False) -> list[dict]:
    cfg = preset(name)
    cfg.train.steps = max(cfg.train.steps, check_steps)
    data = load_data(cfg, device, data_dir)
    x, y = data.batcher.batch(0)

    trainers: dict[str, Trainer] = {"eager": Trainer(cfg, device, None)}
    errors: dict[str, str] = {}
    compile_s: dict[str, float | None] = {}
    for v in variants:
        try:
            tr = Trainer(cfg, device, plan_for(v, cfg, device, default_malloc))
            t0 = time.perf_counter()
            for _ in range(3):  # warm-up: compile, CUDA graph capture, allocator
                tr.step(x, y, cfg.train.lr).sum().item()
            compile_s[v] = tr.fast.compile_s if tr.plan.compile else None
            log(f"  {name} {v}: {tr.plan.describe()} (warm-up {time.perf_counter() - t0:.1f}s)")
            trainers[v] = tr
        except Exception as e:  # one broken variant must not lose the others
            errors[v] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            log(f"  {name} {v}: FAILED {errors[v]}")
    for _ in range(2):
        trainers["eager"].step(x, y, cfg.train.lr)
    timing = time_rounds(trainers, x, y, steps, rounds)

    ref_loss = None
    rows = []
    for v, tr in trainers.items():
        if check_steps:
            fresh = Trainer(cfg, device, tr.plan)
            loss, finite = check_loss(fresh, data, check_steps)
        else:
            loss, finite = float("nan"), True
        if v == "eager":
            ref_loss = loss
        t = timing[v]
        rows.append({"preset": name, "variant": v, "plan": tr.plan.describe() if tr.plan else "plain eager",
                     "ms_per_step": t["ms"], "ms_min": t["ms_min"], "cpu_ms_per_step": t["cpu_ms"],
                     "images_per_s": cfg.train.batch_size / t["ms"] * 1000,
                     "speedup": timing["eager"]["ms"] / t["ms"], "compile_s": compile_s.get(v),
                     "test_loss": loss, "rel_diff": abs(loss - ref_loss) / abs(ref_loss) if ref_loss else 0.0,
                     "finite": finite, "check_steps": check_steps,
                     "budget_s": preset(name).train.steps * t["ms"] / 1000})
        log(f"  {name} {v}: {t['ms']:.1f} ms/step, test loss after {check_steps} steps {loss:.3f}")
    rows += [{"preset": name, "variant": v, "error": e} for v, e in errors.items()]
    return rows


def check_only(name: str, device: torch.device, variants: list[str], steps: int, data_dir,
               default_malloc: bool = False) -> None:
    """Only the correctness check, for the fast-path variants alone (e.g. float32 against bf16, which differ
    in precision only: the same weights, batches and fast-path noise), and how far apart their losses are."""
    cfg = preset(name)
    cfg.train.steps = max(cfg.train.steps, steps)
    data = load_data(cfg, device, data_dir)
    loss = {}
    for v in variants:
        t0 = time.perf_counter()
        loss[v], finite = check_loss(Trainer(cfg, device, plan_for(v, cfg, device, default_malloc)), data, steps)
        print(f"{v}: test loss {loss[v]:.4f} after {steps} steps (finite: {finite}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    a = loss[variants[0]]
    for v in variants[1:]:
        print(f"{v} vs {variants[0]}: {100 * abs(loss[v] - a) / abs(a):.2f}% apart")


def table(rows: list[dict]) -> str:
    lines = ["| preset | variant | ms/step | images/s | CPU ms/step | vs eager | compile s | "
             "test loss (steps) | rel. diff | full budget |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | failed: {r['error']} |||||||| ")
            continue
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] else "-"
        flag = "" if r["finite"] else " NaN!"
        lines.append(
            f"| {r['preset']} | {r['variant']}: {r['plan']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['cpu_ms_per_step']:.1f} | {r['speedup']:.2f}x | {comp} | {r['test_loss']:.3f} ({r['check_steps']}){flag} "
            f"| {100 * r['rel_diff']:.2f}% | {r['budget_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--presets", default="seed,default")
    p.add_argument("--variants", default="auto", help=f"comma list: auto, {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--check-steps", type=int, default=200, help="steps of the correctness schedule (0: skip)")
    p.add_argument("--data-dir", default=None, help="MNIST IDX folder (else $VAEDRAW_DATA_DIR / cache)")
    p.add_argument("--doc", default=str(REPO / "docs" / "SPEED.md"))
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/SPEED.md alone")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator as it is (the fast path's keep_memory is otherwise in effect for "
                        "the whole process, the eager reference included)")
    p.add_argument("--check-only", action="store_true",
                   help="no timing and no eager reference: train each variant --check-steps steps and compare "
                        "their test losses with the first's (e.g. --variants fp32+cl+conv,bf16+cl+conv)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    if args.check_only:
        for name in presets:
            check_only(name, device, variants, args.check_steps, args.data_dir, args.default_malloc)
        return 0
    print(f"benchmarking on {machine(device)}", file=sys.stderr)
    rows: list[dict] = []
    for name in presets:
        rows += bench_preset(name, device, variants, args.steps, args.rounds, args.check_steps, args.data_dir,
                             log=lambda m: print(m, file=sys.stderr), default_malloc=args.default_malloc)
    malloc = " --default-malloc" if args.default_malloc else ""
    text = (f"{machine(device)}; `python benchmarks/speed.py --device {args.device} --presets {args.presets} "
            f"--variants {args.variants} --steps {args.steps} --rounds {args.rounds} --check-steps {args.check_steps}"
            f"{malloc}` ({time.strftime('%Y-%m-%d')}).\n\n" + table(rows))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        write_block(args.doc, f"speed:{args.device}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
