"""Training speed of the fast path against a plain eager loop, per preset, on one device.

    python benchmarks/speed.py [--device cpu|cuda] [--presets seed,default,hierarchical] [--steps N] [--check-steps N]

For each preset: the plain eager reference (common.plain_step: the model's ELBO terms, backward, foreach
Adam, one batch at a time) and the fast path are built from the same initial weights and timed in
alternating rounds, so a busy machine slows both alike. The fast path is `measured` by default: the plan
`vaedraw train` picks on this machine (autotune.tune, measured afresh in the worker, no cache); `auto` is
the static table's row (fastpath.choose_plan), and --variants names others. Each variant runs in a process
of its own (a worker this script starts and drives round by round over a pipe), because the fast path's
keep_memory changes the allocator of the whole process: the plain loop then runs as a user's own loop
would, with glibc's defaults. --in-process times them all in this process instead (the reference then
gets the fast path's allocator too). Reported: steady-state ms/step (median of the rounds), images/s,
process CPU ms/step, compile time, the speed-up, and a correctness check: both train for --check-steps
steps of the preset's schedule on the same batches, then the test loss (one z per image, fixed noise,
10,000 test images) is compared.

The table is printed and written into docs/SPEED.md between `<!-- speed:DEVICE:start/end -->` markers
(--no-write to skip). With the 2,000-step check of all three presets it takes about 25 minutes on 2 CPU
cores; timing only (--check-steps 0), a few minutes.

--check-only runs the correctness check alone for the listed variants and prints how far apart their test
losses are; whether bf16 changes what the seed model learns, on a CPU:

    python benchmarks/speed.py --presets seed --variants fp32+cl+conv,bf16+cl+conv --check-steps 2000 --check-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Trainer, check_loss, load_data, machine, sync, write_block  # noqa: E402

import torch  # noqa: E402

from vaedraw import autotune, fastpath  # noqa: E402
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


def plan_for(name: str, cfg, device: torch.device, default_malloc: bool = False, data=None) -> fastpath.Plan:
    if name == "auto":
        plan = fastpath.choose_plan(cfg.train, cfg.model.arch, device)
    elif name == "measured":
        plan = measured_plan(cfg, device, data)
    else:
        plan = fastpath.Plan(reason=name, **VARIANTS[name])
    return replace(plan, conv_as_conv=plan.conv_as_conv and cfg.model.arch == "seed",
                   keep_memory=device.type == "cpu" and not default_malloc)


def measured_plan(cfg, device: torch.device, data) -> fastpath.Plan:
    """The plan `vaedraw train` measures on this machine (autotune.tune on the first training batch, as
    autotune.settle does, without the cache)."""
    from vaedraw.models import build_model

    from common import image_shape

    static = fastpath.choose_plan(cfg.train, cfg.model.arch, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, image_shape(cfg)).to(device)
    from vaedraw.data import to_float

    x = to_float(data.train.images[:cfg.train.batch_size]).to(device)
    y = data.train.labels[:len(x)].to(device) if model.n_classes else None
    result = autotune.tune(static, model, cfg, x, y, fastpath.Noise(), steps=cfg.train.steps)
    print(f"  measured: {autotune.label(result['plan'])} ({autotune._summary(result['trials'])}; "
          f"{result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return replace(result["plan"], reason="measured")


def time_rounds(trainers: dict[str, Trainer], x, y, steps: int, rounds: int) -> dict[str, dict]:
    """Alternate `rounds` rounds of `steps` steps over the trainers; per trainer the median ms/step."""
    wall: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(rounds):
        for name, tr in trainers.items():
            ms, cpu_ms = time_round(tr, x, y, steps)
            wall[name].append(ms)
            cpu[name].append(cpu_ms)
    return summarize(wall, cpu)


def summarize(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, dict]:
    """Per variant: the median and minimum wall ms/step over the rounds, the median CPU ms/step."""
    return {k: {"ms": statistics.median(wall[k]), "ms_min": min(wall[k]), "cpu_ms": statistics.median(cpu[k])}
            for k in wall}


def build_trainers(name: str, device: torch.device, variants: list[str], data, log, default_malloc: bool):
    """{variant: warmed-up Trainer} ('eager' first) and {variant: error} for those that failed to build."""
    cfg = preset(name)
    x, y = data.batcher.batch(0)
    trainers: dict[str, Trainer] = {}
    errors: dict[str, str] = {}
    for v in variants:
        try:
            tr = Trainer(cfg, device, None if v == "eager" else plan_for(v, cfg, device, default_malloc, data))
            t0 = time.perf_counter()
            for _ in range(3):  # warm-up: compile, CUDA graph capture, allocator
                tr.step(x, y, cfg.train.lr).sum().item()
            log(f"  {name} {v}: {tr.plan.describe() if tr.plan else 'plain eager'} "
                f"(warm-up {time.perf_counter() - t0:.1f}s)")
            trainers[v] = tr
        except Exception as e:  # one broken variant must not lose the others
            errors[v] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            log(f"  {name} {v}: FAILED {errors[v]}")
    return trainers, errors


def time_round(tr: Trainer, x, y, steps: int) -> tuple[float, float]:
    """(wall ms/step, process CPU ms/step) over `steps` steps on the same batch."""
    sync(x.device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = tr.step(x, y, tr.cfg.train.lr)
    out.sum().item()
    return (time.perf_counter() - w0) / steps * 1000, (time.process_time() - c0) / steps * 1000


def worker(name: str, variant: str, device: torch.device, steps: int, data_dir, default_malloc: bool) -> int:
    """One variant in a process of its own: build and warm it up, print its plan as JSON, then time one round
    for every line read from stdin, answering each with one JSON line."""
    cfg = preset(name)
    cfg.train.steps = max(cfg.train.steps, 1)
    data = load_data(cfg, device, data_dir)
    # the plain loop keeps glibc's allocator defaults: the fast path's keep_memory is its own
    trainers, errors = build_trainers(name, device, [variant], data, lambda m: print(m, file=sys.stderr, flush=True),
                                      default_malloc or variant == "eager")
    tr = trainers.get(variant)
    fields = dataclasses.asdict(tr.plan) if tr and tr.plan else None
    print(json.dumps({"plan": tr.plan.describe() if tr and tr.plan else "plain eager", "fields": fields,
                      "error": errors.get(variant),
                      "compile_s": tr.fast.compile_s if tr and tr.fast and tr.plan.compile else None}), flush=True)
    if tr is None:
        return 1
    x, y = data.batcher.batch(0)
    for _ in sys.stdin:
        ms, cpu_ms = time_round(tr, x, y, steps)
        print(json.dumps({"ms": ms, "cpu_ms": cpu_ms}), flush=True)
    return 0


def time_isolated(name: str, variants: list[str], args) -> tuple[dict, dict, dict, dict, dict]:
    """Every variant in its own worker process, timed in alternating rounds (one worker runs at a time).
    -> ({variant: timing}, {variant: plan text}, {variant: Plan fields or None}, {variant: compile s},
    {variant: error})."""
    procs: dict[str, subprocess.Popen] = {}
    plans, fields, compile_s, errors = {}, {}, {}, {}
    try:
        for v in variants:
            argv = [sys.executable, __file__, "--worker", f"{name}:{v}", "--device", args.device,
                    "--steps", str(args.steps)] + (["--data-dir", args.data_dir] if args.data_dir else [])
            argv += ["--default-malloc"] if args.default_malloc else []
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            head = json.loads(p.stdout.readline() or '{"error": "the worker died"}')
            if head.get("error"):
                errors[v] = head["error"]
                p.kill()
                continue
            procs[v], plans[v], compile_s[v] = p, head["plan"], head.get("compile_s")
            fields[v] = head.get("fields")
        wall: dict[str, list[float]] = {v: [] for v in procs}
        cpu: dict[str, list[float]] = {v: [] for v in procs}
        # idle workers are stopped outright: threads still spinning after their round (OpenMP, inductor's
        # compile pool) would otherwise take the cores from the one being timed
        pause = getattr(signal, "SIGSTOP", None)
        for p in procs.values():
            if pause:
                p.send_signal(pause)
        for _ in range(args.rounds):
            for v, p in procs.items():
                if pause:
                    p.send_signal(signal.SIGCONT)
                p.stdin.write("go\n")
                p.stdin.flush()
                r = json.loads(p.stdout.readline())
                if pause:
                    p.send_signal(pause)
                wall[v].append(r["ms"])
                cpu[v].append(r["cpu_ms"])
    finally:
        for p in procs.values():
            if getattr(signal, "SIGCONT", None):
                p.send_signal(signal.SIGCONT)
            p.stdin.close()
            p.wait(timeout=60)
    return summarize(wall, cpu), plans, fields, compile_s, errors


def bench_preset(name: str, device: torch.device, variants: list[str], args, log=print) -> list[dict]:
    cfg = preset(name)
    cfg.train.steps = max(cfg.train.steps, args.check_steps)
    data = load_data(cfg, device, args.data_dir)
    variants = ["eager"] + [v for v in variants if v != "eager"]
    if args.in_process:
        trainers, errors = build_trainers(name, device, variants, data, log, args.default_malloc)
        x, y = data.batcher.batch(0)
        timing = time_rounds(trainers, x, y, args.steps, args.rounds)
        plans = {v: tr.plan for v, tr in trainers.items()}
        texts = {v: p.describe() if p else "plain eager" for v, p in plans.items()}
        compile_s = {v: tr.fast.compile_s if tr.plan and tr.plan.compile else None for v, tr in trainers.items()}
    else:
        timing, texts, fields, compile_s, errors = time_isolated(name, variants, args)
        plans = {v: None if fields[v] is None else fastpath.Plan(**fields[v]) for v in timing}  # what each timed
    if "eager" not in timing:
        return [{"preset": name, "variant": v, "error": e} for v, e in errors.items()]

    ref_loss = None
    rows = []
    for v in timing:
        if args.check_steps:
            loss, finite = check_loss(Trainer(cfg, device, plans[v]), data, args.check_steps)
        else:
            loss, finite = float("nan"), True
        if v == "eager":
            ref_loss = loss
        t = timing[v]
        rows.append({"preset": name, "variant": v, "plan": texts[v],
                     "ms_per_step": t["ms"], "ms_min": t["ms_min"], "cpu_ms_per_step": t["cpu_ms"],
                     "images_per_s": cfg.train.batch_size / t["ms"] * 1000,
                     "speedup": timing["eager"]["ms"] / t["ms"], "compile_s": compile_s.get(v),
                     "test_loss": loss, "rel_diff": abs(loss - ref_loss) / abs(ref_loss) if ref_loss else 0.0,
                     "finite": finite, "check_steps": args.check_steps,
                     "budget_s": preset(name).train.steps * t["ms"] / 1000})
        log(f"  {name} {v}: {t['ms']:.1f} ms/step ({rows[-1]['speedup']:.2f}x), test loss after "
            f"{args.check_steps} steps {loss:.3f}")
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
        loss[v], finite = check_loss(Trainer(cfg, device, plan_for(v, cfg, device, default_malloc, data)), data, steps)
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
    p.add_argument("--presets", default="seed,default,hierarchical")
    p.add_argument("--variants", default="measured",
                   help=f"comma list: measured (what vaedraw train picks here), auto (the static row), {', '.join(VARIANTS)}")
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
    p.add_argument("--in-process", action="store_true",
                   help="time every variant in this process (the reference then shares the fast path's allocator)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # PRESET:VARIANT, started by this script itself
    p.add_argument("--check-only", action="store_true",
                   help="no timing and no eager reference: train each variant --check-steps steps and compare "
                        "their test losses with the first's (e.g. --variants fp32+cl+conv,bf16+cl+conv)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.worker:
        name, _, variant = args.worker.partition(":")
        return worker(name, variant, device, args.steps, args.data_dir, args.default_malloc)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    if args.check_only:
        for name in presets:
            check_only(name, device, variants, args.check_steps, args.data_dir, args.default_malloc)
        return 0
    print(f"benchmarking on {machine(device)}", file=sys.stderr)
    rows: list[dict] = []
    for name in presets:
        rows += bench_preset(name, device, variants, args, log=lambda m: print(m, file=sys.stderr))
    malloc = (" --default-malloc" if args.default_malloc else "") + (" --in-process" if args.in_process else "")
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
