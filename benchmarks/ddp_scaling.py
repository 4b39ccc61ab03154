"""Data-parallel scaling: 2 CPU processes (gloo) against 1, measured, and N GPUs on paper.

    python benchmarks/ddp_scaling.py [--presets seed,default,hierarchical] [--steps N] [--rounds N]
        [--warmup N] [--gpu-ms seed=0.973,default=0.588,hierarchical=3.34] [--data-dir DIR] [--no-write]

Measured, per preset, on this machine: two processes joined by gloo on 127.0.0.1 (a free port), each with
one thread (torch.set_num_threads(1)), so that on 2 cores the one-process run and each of the two get a
core alike. In the same two-process group, timed in alternating rounds so that other load on the machine
slows every variant alike:

- 1 process: rank 0 alone trains on the preset's global batch (fastpath.FastStep with the plan
  fastpath.choose_plan gives, no DistributedDataParallel: what `vaedraw train` runs with one process)
  while rank 1 waits at a barrier;
- 2 processes: each trains on its half of the global batch and its rows of the global batch's noise
  (fastpath.Noise(rank, 2)), with the plan choose_plan(distributed=True) gives and FastStep(ddp=True):
  what `vaedraw train --nproc 2` runs;
- 2 processes without gradient sync: the same step under DistributedDataParallel.no_sync(), i.e. the
  compute of a half batch with both processes busy, no all-reduce;
- all-reduce alone: dist.all_reduce over float32 tensors of DDP's gradient bucket sizes (read from the
  DDP logger after warm-up), one after the other, as many times as there are timed steps.

Reported: median ms per global step over the rounds (the slower rank's time for the two-process rows),
the speed-up of 2 processes, the all-reduce's time as a share of the 2-process step, the gradient bytes
all-reduced per step (float32: 4 bytes per trainable parameter) and how busy the rest of the machine was
meanwhile (/proc/stat's busy time less this benchmark's own CPU time, in cores).

On paper, per preset: the ring all-reduce time per step for N = 2, 4, 8 GPUs,
t_ar = buckets * latency + 2 (N - 1) / N * gradient bytes / bus bandwidth, at NVLink and at 100 Gb/s
Ethernet (LINKS below, assumptions stated in the output), set against the single-GPU step time t of
--gpu-ms (by default those measured on one H200), as the speed-up bounds t / (t / N + t_ar) with the global batch
fixed and N t / (t + t_ar) with the batch grown N-fold.

Both tables are printed and written into docs/SPEED.md between `<!-- ddp:start/end -->` markers
(--no-write to skip). The default run takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pools; the workers inherit it

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Trainer, free_port, image_shape, load_data, machine, write_block  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from vaedraw import autotune, fastpath  # noqa: E402
from vaedraw.config import preset  # noqa: E402
from vaedraw.models import build_model  # noqa: E402
from vaedraw.train import Batcher  # noqa: E402

PRESETS = ("seed", "default", "hierarchical")
WORLD = 2
# single-GPU ms/step of `vaedraw train` on one H200 (whole-step CUDA graph, bf16; docs/SPEED.md, GPU)
GPU_MS = {"seed": 0.973, "default": 0.588, "hierarchical": 3.34}
GPU_COUNTS = (2, 4, 8)


@dataclass(frozen=True)
class Link:
    name: str
    bus_gb_s: float  # effective bus bandwidth, GB/s (10^9 bytes)
    latency_us: float  # fixed cost per all-reduce call (one per DDP bucket)
    note: str


LINKS = (
    Link("NVLink", 370.0, 10.0, "H100/H200 NVLink 4, 450 GB/s per direction per GPU; ~370 GB/s bus bandwidth "
         "as NCCL's all-reduce typically measures on large messages"),
    Link("100 Gb/s Ethernet", 11.0, 50.0, "12.5 GB/s line rate, ~11 GB/s effective; every GPU behind its own "
         "100 Gb/s link (e.g. one GPU per machine)"),
)


# ----------------------------------------------------------------------------- the measured part
def ddp_step(cfg, device: torch.device, rank: int, world: int) -> fastpath.FastStep:
    """What `vaedraw train` builds in each of `world` processes: the preset's initial weights, this rank's
    rows of the global batch's noise, DistributedDataParallel around the objective."""
    plan = fastpath.choose_plan(cfg.train, cfg.model.arch, device, distributed=True)
    torch.manual_seed(cfg.train.seed)
    noise = fastpath.Noise(rank, world)
    model = fastpath.prepare_model(build_model(cfg.model, image_shape(cfg)).to(device), plan, noise)
    opt = fastpath.make_optimizer(model, cfg, device, plan)
    model.train()
    return fastpath.FastStep(model, opt, cfg, plan, noise, ddp=True)


def _timed(fn, steps: int) -> tuple[float, float]:
    """Run fn() `steps` times; -> (wall ms, process CPU ms) per call. fn returns a tensor (read at the end)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = None
    for _ in range(steps):
        out = fn()
    if out is not None:
        out.sum().item()
    return (time.perf_counter() - w0) / steps * 1000, (time.process_time() - c0) / steps * 1000


def worker(rank: int, world: int, port: int, name: str, steps: int, rounds: int, warmup: int, data_dir,
           results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cpu")
        cfg = preset(name)
        data = load_data(cfg, device, data_dir)
        lr = cfg.train.lr

        fast = ddp_step(cfg, device, rank, world)
        local = Batcher(data.train.images, data.train.labels, cfg.train.batch_size, cfg.train.seed, rank, world)
        x, y = local.batch(0)
        single = None
        if rank == 0:
            single = Trainer(cfg, device, fastpath.choose_plan(cfg.train, cfg.model.arch, device))
            gx, gy = data.batcher.batch(0)
            for _ in range(warmup):
                single.step(gx, gy, lr).sum().item()
        for _ in range(warmup):  # the first DDP steps also rebuild the gradient buckets in backward order
            fast(x, y, lr).sum().item()
        with fast.objective.no_sync():
            for _ in range(warmup):
                fast(x, y, lr).sum().item()
        sizes = [int(s) for s in str(fast.objective._get_ddp_logging_data()["bucket_sizes"]).split(",") if s]
        buckets = [torch.zeros(s // 4) for s in sizes]  # float32 gradients
        grad_bytes = sum(p.numel() * 4 for p in fast.model.parameters() if p.requires_grad)
        for b in buckets:
            dist.all_reduce(b)

        def sync_step():
            return fast(x, y, lr)

        def nosync_step():
            with fast.objective.no_sync():
                return fast(x, y, lr)

        def allreduce():
            for b in buckets:
                dist.all_reduce(b)
            return None

        wall: dict[str, list[float]] = {k: [] for k in ("one", "two", "nosync", "allreduce")}
        cpu: dict[str, list[float]] = {k: [] for k in wall}
        for _ in range(rounds):
            dist.barrier()
            if rank == 0:
                w, c = _timed(lambda: single.step(gx, gy, lr), steps)
            else:
                w, c = 0.0, 0.0  # waits at the barrier below (its CPU time while waiting is recorded)
                c0 = time.process_time()
            dist.barrier()
            if rank != 0:
                c = (time.process_time() - c0) / steps * 1000
            wall["one"].append(w)
            cpu["one"].append(c)
            for key, fn in (("two", sync_step), ("nosync", nosync_step), ("allreduce", allreduce)):
                dist.barrier()
                w, c = _timed(fn, steps)
                wall[key].append(w)
                cpu[key].append(c)
        # per round the slower rank's time (rank 1 has no "one" time: max keeps rank 0's)
        t = torch.tensor([wall[k] for k in wall], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        mine = torch.tensor([cpu[k] for k in cpu], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        if rank == 0:
            per_rank_cpu = [dict(zip(cpu, (statistics.median(r) for r in g.tolist()))) for g in every]
            ms = {k: statistics.median(r) for k, r in zip(wall, t.tolist())}
            results.put({
                "preset": name, "batch": cfg.train.batch_size, "grad_bytes": grad_bytes,
                "params": grad_bytes // 4, "buckets": sizes,
                "plan_one": single.plan.describe(), "plan_two": fast.plan.describe(),
                "ms": ms, "ms_min": {k: min(r) for k, r in zip(wall, t.tolist())}, "cpu_ms": per_rank_cpu,
            })
    finally:
        dist.destroy_process_group()


def own_cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the workers, once joined)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def measure(name: str, steps: int, rounds: int, warmup: int, data_dir) -> dict:
    """One preset in 2 spawned worker processes; -> rank 0's record, with `other_load`: the cores' worth of
    CPU time other processes on the machine used meanwhile (None where /proc/stat is missing)."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    load = autotune.LoadMeter(own=own_cpu_s)
    mp.spawn(worker, args=(WORLD, free_port(), name, steps, rounds, warmup, data_dir, results), nprocs=WORLD,
             join=True)
    r = results.get()
    r["other_load"] = load.other_cores()
    return r


def measured_table(rows: list[dict]) -> str:
    lines = ["| preset | parameters | gradient MB/step (buckets) | 1 process, global batch | "
             "2 processes, half batch each | speed-up | 2 processes, no gradient sync | sync cost in the step "
             "(with - without) | all-reduce alone | all-reduce share of the 2-process step | other load (cores) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        load = "-" if r["other_load"] is None else f"{r['other_load']:.2f}"
        lines.append(
            f"| {r['preset']} (batch {r['batch']}) | {r['params'] / 1e6:.2f} M | {r['grad_bytes'] / 1e6:.1f} "
            f"({len(r['buckets'])}) | {ms['one']:.1f} | {ms['two']:.1f} | {ms['one'] / ms['two']:.2f}x | "
            f"{ms['nosync']:.1f} | {ms['two'] - ms['nosync']:.1f} | {ms['allreduce']:.1f} | "
            f"{100 * ms['allreduce'] / ms['two']:.0f}% | {load} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the part on paper
def allreduce_ms(grad_bytes: int, buckets: int, n: int, link: Link) -> float:
    """Ring all-reduce over n GPUs: each bucket pays the latency once; 2 (n-1)/n of the bytes cross each link."""
    return buckets * link.latency_us / 1000 + 2 * (n - 1) / n * grad_bytes / (link.bus_gb_s * 1e9) * 1000


def paper_table(models: list[dict], gpu_ms: dict[str, float]) -> str:
    lines = ["| preset | link | N | all-reduce ms/step | compute ms/GPU (t/N) | speed-up, global batch fixed: "
             "t / (t/N + t_ar) | speed-up, batch x N: N t / (t + t_ar) | bound by |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for m in models:
        t = gpu_ms[m["preset"]]
        for link in LINKS:
            for n in GPU_COUNTS:
                ar = allreduce_ms(m["grad_bytes"], m["n_buckets"], n, link)
                fixed = t / (t / n + ar)
                grown = n * t / (t + ar)
                bound = "all-reduce" if ar > t / n else "compute"
                lines.append(f"| {m['preset']} (t = {t:g} ms, {m['grad_bytes'] / 1e6:.1f} MB) | {link.name} | {n} | "
                             f"{ar:.3f} | {t / n:.3f} | {fixed:.2f}x{_slower(fixed)} | {grown:.2f}x{_slower(grown)} "
                             f"| {bound} |")
    return "\n".join(lines)


def _slower(speedup: float) -> str:
    return " (slower than 1 GPU)" if speedup < 1 else ""


def bound_summary(models: list[dict], gpu_ms: dict[str, float]) -> str:
    """One sentence per link: from which N on each preset's all-reduce outlasts its per-GPU compute."""
    parts = []
    for link in LINKS:
        where = []
        for m in models:
            t = gpu_ms[m["preset"]]
            ns = [n for n in GPU_COUNTS if allreduce_ms(m["grad_bytes"], m["n_buckets"], n, link) > t / n]
            if ns:
                where.append(f"{m['preset']} from N = {ns[0]}")
        parts.append(f"{link.name}: " + (", ".join(where) if where else f"none up to N = {GPU_COUNTS[-1]}"))
    return "All-reduce bound (t_ar > t/N), with these t: " + "; ".join(parts) + "."


def paper_notes(gpu_ms: dict[str, float], given: bool) -> str:
    links = "; ".join(f"{lk.name}: {lk.bus_gb_s:g} GB/s bus bandwidth and {lk.latency_us:g} us per all-reduce "
                      f"call ({lk.note})" for lk in LINKS)
    ts = ", ".join(f"{k} {v:g} ms" for k, v in gpu_ms.items())
    origin = ("as given with --gpu-ms" if given else
              "the training ms/step `vaedraw train` measured on one H200 (docs/SPEED.md, GPU)")
    return (f"Assumed: t_ar = buckets x latency + 2 (N-1)/N x gradient bytes / bus bandwidth (ring all-reduce, "
            f"float32 gradients, one all-reduce call per DDP bucket as measured above); {links}. "
            f"Single-GPU step times t: {ts}, {origin}. With the global batch fixed each GPU computes 1/N of "
            f"it; a small batch does not run N times faster on a GPU (kernel launches and latency, and several "
            f"processes also turn the whole-step CUDA graph off), so t/N and the speed-ups from it are upper "
            f"bounds. No overlap of the all-reduce with the backward pass is counted (DDP overlaps them in "
            f"part). \"all-reduce\" in the last column: t_ar exceeds the per-GPU compute t/N.")


def parse_gpu_ms(text: str) -> dict[str, float]:
    out = dict(GPU_MS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in PRESETS:
            raise SystemExit(f"--gpu-ms: expected PRESET=MS with PRESET in {', '.join(PRESETS)}, got {part!r}")
        out[key.strip()] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=6, help="alternating timing rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first")
    p.add_argument("--gpu-ms", default="", help="single-GPU ms/step per preset, e.g. seed=1.2,default=1.0 "
                   "(default: GPU_MS, measured on one H200)")
    p.add_argument("--data-dir", default=None, help="MNIST IDX folder (else $VAEDRAW_DATA_DIR / cache)")
    p.add_argument("--doc", default=str(REPO / "docs" / "SPEED.md"))
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/SPEED.md alone")
    args = p.parse_args(argv)
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    for name in presets:
        if name not in PRESETS:
            p.error(f"--presets: {name!r} is not one of {', '.join(PRESETS)}")
    gpu_ms = parse_gpu_ms(args.gpu_ms)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    where = f"{machine(device)}, {os.cpu_count()} cores"
    print(f"measuring on {where}", file=sys.stderr)

    rows = []
    for name in presets:
        t0 = time.perf_counter()
        r = measure(name, args.steps, args.rounds, args.warmup, args.data_dir)
        rows.append(r)
        cpu1 = r["cpu_ms"][1]["one"]
        print(f"  {name}: {r['ms']['one']:.1f} ms/step alone, {r['ms']['two']:.1f} with 2 processes "
              f"({r['ms']['nosync']:.1f} without sync, all-reduce {r['ms']['allreduce']:.1f}); plans: "
              f"{r['plan_one']} / {r['plan_two']}; rank 1 used {cpu1:.2f} CPU ms per step while waiting"
              f"; other load {r['other_load'] if r['other_load'] is not None else float('nan'):.2f} cores "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    models = [{"preset": r["preset"], "grad_bytes": r["grad_bytes"], "n_buckets": len(r["buckets"])} for r in rows]

    steps = args.steps * args.rounds
    cmd = " ".join(["python benchmarks/ddp_scaling.py", f"--presets {','.join(presets)}", f"--steps {args.steps}",
                    f"--rounds {args.rounds}", f"--warmup {args.warmup}"]
                   + ([f"--gpu-ms {args.gpu_ms}"] if args.gpu_ms else [])
                   + (["--data-dir DIR"] if args.data_dir else []))  # DIR: the MNIST IDX folder
    plans = "; ".join(f"{r['preset']}: {r['plan_one']} (1 process), {r['plan_two']} (2)" for r in rows)
    text = (f"{where}; `{cmd}` ({time.strftime('%Y-%m-%d')}).\n\n"
            f"Measured: ms per global step, median of {args.rounds} alternating rounds of {args.steps} steps "
            f"({steps} timed steps per variant, after {args.warmup} of warm-up), gloo on 127.0.0.1, 1 thread "
            f"per process; for 2 processes the slower rank. Other load: the cores' worth of CPU time the rest of the "
            f"machine used while a preset was measured (/proc/stat, less this benchmark's own). Plans: {plans}.\n\n"
            + measured_table(rows) +
            "\n\nOn paper: N GPUs, ring all-reduce of the same gradients per step.\n\n"
            + paper_table(models, gpu_ms) + "\n\n" + bound_summary(models, gpu_ms) + " "
            + paper_notes(gpu_ms, bool(args.gpu_ms)))
    print(text)
    if not args.no_write:
        write_block(args.doc, "ddp", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
