"""The training plan measured on the machine it runs on, once per model and machine, then cached.

`settle(static, model, cfg, ctx, train_split)` turns the plan `fastpath.choose_plan` read from the static
`fastpath.AUTO` table into the fastest correct plan for this run:

1. the cache (`cache_path()`, ~/.cache/vaedraw/plans.json; $VAEDRAW_CACHE_DIR or $XDG_CACHE_HOME/vaedraw
   like the data cache) is looked up under the run's key (`plan_key`: architecture, parameters, batch per
   process, image shape, likelihood, iwae_k, the asked precision and compile, device type, CPU or GPU
   model, threads, torch version, processes); a hit is used at once;
2. otherwise, for runs of at least MIN_STEPS steps, every candidate (`candidates`) takes a few steps on
   its own deep copy of the model with its own optimizer, on the first training batch: the first step's
   loss must lie within LOSS_TOLERANCE of float32 on the same batch and noise, the next WARMUP steps are
   not timed, then up to TIMED steps are (process CPU time on a CPU, wall time on CUDA), and a
   candidate stops early once it is SLOWER times the best so far. The plain float32 eager step comes
   first (and is timed again at the end when it lost), so the pick is never slower than it. Everything
   stays within BUDGET_S seconds (CPU) or BUDGET_CUDA_S (CUDA);
3. the pick is written to the cache atomically and returned with a record (timings, rejections, where it
   came from) that training prints in one line and keeps as the run's plan.json.

Only what is `auto` is decided: an asked --precision or --compile is every candidate's. The global RNG
(CPU and CUDA) is saved before and restored after, and the model and its optimizer are never touched, so a
run that measures trains bitwise as the same plan chosen statically does. In a data-parallel run rank 0
decides (cache or measurement) and broadcasts the plan; the other ranks wait for it.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import fastpath
from .fastpath import Plan

CACHE_VERSION = 1
MIN_STEPS = 500  # shorter runs take the static table (or the cache): measuring would not pay for itself
WARMUP = 2  # untimed steps after the checked first one (lazy allocations, oneDNN primitive caches)
TIMED = 8  # timed steps per candidate at most (median taken)
SLOWER = 1.5  # a candidate this many times slower than the best so far stops early
LOSS_TOLERANCE = 0.02  # |loss - float32 loss| / |float32 loss| at the first step, same batch and noise
BUDGET_S = 20.0  # seconds for all candidates on a CPU
BUDGET_CUDA_S = 90.0  # on CUDA: compiling candidates take tens of seconds each
SWITCHES = ("precision", "compile", "channels_last", "conv_as_conv", "cuda_graph")  # what a candidate sets

_clock = time.perf_counter  # wall time: the budget, and the step timer on CUDA (tests replace both clocks)
# On a CPU steps are timed in process CPU time: on a shared machine other processes' load stretches wall
# time by bursts, which would make whichever candidate ran during one look slow (docs/SPEED.md).
_cpu_clock = time.process_time


def _step_clock(device: torch.device):
    return _clock if device.type == "cuda" else _cpu_clock


# ----------------------------------------------------------------------------- the key and the cache
def cache_path() -> Path:
    """plans.json in the user's cache folder (the data cache's: $VAEDRAW_CACHE_DIR, $XDG_CACHE_HOME/vaedraw
    or ~/.cache/vaedraw)."""
    from .data import default_cache_dir

    return default_cache_dir() / "plans.json"


def device_model(device: torch.device) -> str:
    """The GPU's name, or the CPU's "model name" from /proc/cpuinfo (the platform's description elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.lower().startswith("model name")), "")
        if line:
            return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plan_key(cfg, device: torch.device, image_shape, params: int, world: int = 1) -> dict:
    """What the best plan depends on: the network (params: its parameter count) and its batch per process,
    the device and the software."""
    t = cfg.train
    return {"arch": cfg.model.arch, "parameters": params, "batch_size": t.batch_size // world,
            "image_shape": list(image_shape), "likelihood": cfg.model.likelihood, "iwae_k": t.iwae_k,
            "precision": t.precision, "compile": t.compile, "device": device.type, "model": device_model(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "processes": world}


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def read_cache(path: Path | None = None) -> dict:
    """{key text: entry} from the cache file; {} when it is missing, damaged or of another version."""
    path = path or cache_path()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION or not isinstance(doc.get("plans"), dict):
        return {}
    return doc["plans"]


def write_cache(key: dict, entry: dict, path: Path | None = None) -> str | None:
    """Add `entry` under `key` (re-reading the file first, so concurrent runs lose nothing but a race) and
    replace the file atomically. -> None, or why it could not be written (measuring again next time)."""
    from .checkpoint import atomic_write_text

    path = path or cache_path()
    plans = read_cache(path)
    plans[_key_text(key)] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "plans": plans}, indent=1) + "\n")
    except OSError as e:
        return e.strerror or str(e)
    return None


# ----------------------------------------------------------------------------- the candidates
def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and fastpath.cpu_has_bf16()


def candidates(static: Plan, train_cfg, arch: str, device: torch.device, distributed: bool = False) -> list[Plan]:
    """The plans worth timing, the plain step first (all switches off) and the static table's row second.

    precision: the asked one, else fp32 and (with native bf16) bf16; channels_last on/off; conv_as_conv on/off
    for seed; on CUDA a whole-step CUDA graph (one process) and, when compile is auto, torch.compile of the
    static row's settings (last: its compile time is the largest cost). On a CPU compile only when asked:
    its compile time does not pay back within a run.
    """
    cuda = device.type == "cuda"
    if train_cfg.precision != "auto":
        precisions = [train_cfg.precision]
    else:
        precisions = ["fp32", "bf16"] if native_bf16(device) else ["fp32"]
    asked_compile = None if train_cfg.compile == "auto" else train_cfg.compile == "on"
    graphs = [False, True] if cuda and not distributed and not asked_compile else [False]
    convs = [False, True] if arch == "seed" else [False]
    base = replace(static, reason="")
    out = [replace(base, precision=precisions[0], compile=bool(asked_compile), channels_last=False,
                   conv_as_conv=False, cuda_graph=False), base]
    for p in precisions:
        for graph in graphs:
            for conv in convs:
                for cl in (False, True):
                    out.append(replace(base, precision=p, compile=bool(asked_compile), channels_last=cl,
                                       conv_as_conv=conv, cuda_graph=graph))
    if cuda and asked_compile is None:
        out.append(replace(base, compile=True, cuda_graph=False))
    seen, unique = set(), []
    for c in out:
        fields = tuple(getattr(c, s) for s in SWITCHES)
        if fields not in seen:
            seen.add(fields)
            unique.append(c)
    return unique


def label(plan: Plan) -> str:
    """A plan's switches without its reason: 'bf16 + channels_last'."""
    return replace(plan, keep_memory=False, reason="").describe()


# ----------------------------------------------------------------------------- measuring
def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loss(model, cfg, x, y, noise, rng: dict) -> float:
    """The float32 loss of the plain model on (x, y) with the noise drawn from RNG state `rng`."""
    device = x.device
    plain = fastpath.prepare_model(copy.deepcopy(model), Plan(), noise).train()
    objective = fastpath.Objective(plain, cfg.data.binarize == "dynamic", Plan(), noise, iwae_k=cfg.train.iwae_k)
    objective.kl_weight = objective.kl_weight.to(device)
    _set_rng_state(rng, device)
    with torch.no_grad():
        return float(objective(x, y)[0])


def measure(plan: Plan, model, cfg, x, y, noise, rng: dict, ref: float, best_ms: float | None,
            deadline: float) -> dict:
    """Train `plan` for a few steps on a deep copy of `model`. -> {"ms": median ms/step or None, "loss",
    "note": why it was stopped or rejected, or ""}. The first step starts from RNG state `rng`."""
    device = x.device
    m = fastpath.prepare_model(copy.deepcopy(model), plan, noise).train()
    opt = fastpath.make_optimizer(m, cfg, device, plan)
    step = fastpath.FastStep(m, opt, cfg, plan, noise)
    lr = cfg.train.lr
    _set_rng_state(rng, device)
    try:
        loss = float(step(x, y, lr)[0])
    except RuntimeError as e:  # a kernel this device lacks, a failed compile or capture
        return {"ms": None, "loss": None, "note": f"failed: {str(e).splitlines()[0][:120]}"}
    rel = abs(loss - ref) / max(abs(ref), 1e-12)
    if not math.isfinite(loss) or rel > LOSS_TOLERANCE:
        return {"ms": None, "loss": loss, "note": f"rejected: loss {loss:.4g} is {100 * rel:.2f}% from float32 "
                                                  f"{ref:.4g} (limit {100 * LOSS_TOLERANCE:g}%)"}
    warm = WARMUP + (fastpath.GRAPH_WARMUP + 1 if plan.cuda_graph else 0)
    for _ in range(warm):
        step(x, y, lr)
    _sync(device)
    times: list[float] = []
    note = ""
    clock = _step_clock(device)
    for _ in range(TIMED):
        t0 = clock()
        step(x, y, lr)
        _sync(device)
        times.append(1000 * (clock() - t0))
        ms = statistics.median(times)
        if best_ms is not None and len(times) >= 2 and ms > SLOWER * best_ms:
            note = f"slower: stopped after {len(times)} steps, over {SLOWER:g}x the best"
            break
        if _clock() > deadline and len(times) >= 2:
            note = f"time budget: stopped after {len(times)} steps"
            break
    return {"ms": statistics.median(times), "loss": loss, "note": note}


def tune(static: Plan, model, cfg, x, y, noise, distributed: bool = False) -> dict:
    """Time every candidate; -> {"plan": the fastest correct Plan, "trials": [{"plan", "ms", "loss", "note"}],
    "reference_loss", "seconds"}. The global RNG is restored before returning."""
    device = x.device
    rng = _rng_state(device)
    t_start = _clock()
    deadline = t_start + (BUDGET_CUDA_S if device.type == "cuda" else BUDGET_S)
    trials: list[dict] = []
    best: tuple[float, Plan] | None = None
    try:
        ref = reference_loss(model, cfg, x, y, noise, rng)
        plans = candidates(static, cfg.train, cfg.model.arch, device, distributed)
        for plan in plans:
            if best is not None and _clock() > deadline:
                trials.append({"plan": label(plan), "ms": None, "loss": None, "note": "not measured: time budget"})
                continue
            r = measure(plan, model, cfg, x, y, noise, rng, ref, None if best is None else best[0], deadline)
            trials.append({"plan": label(plan), **r})
            if r["ms"] is not None and not r["note"].startswith("slower") and (best is None or r["ms"] < best[0]):
                best = (r["ms"], plan)
        first = trials[0]
        if best is not None and best[1] is not plans[0] and first["ms"] is not None:
            # the first candidate also paid for the process's first steps (allocator, kernel set-up): time
            # the plain step once more, so the pick is never slower than it
            again = measure(plans[0], model, cfg, x, y, noise, rng, ref, None, deadline + 5.0)
            if again["ms"] is not None and again["ms"] < first["ms"]:
                first.update(ms=again["ms"], note="timed twice, the second time kept")
            if first["ms"] < best[0]:
                best = (first["ms"], plans[0])
    finally:
        _set_rng_state(rng, device)
        _sync(device)
    chosen = static if best is None else best[1]  # nothing passed (not even float32): the static row
    return {"plan": chosen, "trials": trials, "reference_loss": ref, "seconds": _clock() - t_start}


# ----------------------------------------------------------------------------- the training run's entry
def _switches(plan: Plan) -> dict:
    return {s: getattr(plan, s) for s in SWITCHES}


def _summary(trials: list[dict]) -> str:
    parts = []
    for t in trials:
        if t["ms"] is not None and not t["note"].startswith("slower"):
            parts.append(f"{t['plan']} {t['ms']:.0f} ms")
        elif t["ms"] is not None:  # stopped early
            parts.append(f"{t['plan']} >{t['ms']:.0f} ms")
        else:
            parts.append(f"{t['plan']} {t['note'].split(':')[0]}")
    return ", ".join(parts)


def settle(static: Plan, model, cfg, ctx, train_split, remaining_steps: int | None = None,
           file=None) -> tuple[Plan, dict]:
    """The plan this run trains with, and its record for plan.json. See the module docstring.

    static: choose_plan's plan; model: the freshly built plain model on ctx.device (not modified);
    train_split: its first batch is what candidates train on. remaining_steps: the steps this run will
    train (default cfg.train.steps); shorter than MIN_STEPS and not cached, the static plan is kept.
    """
    record: dict = {"plan": _switches(static), "description": static.describe(), "source": "static"}
    if not cfg.train.autotune:
        record["why"] = "train.autotune is false: the static table fastpath.AUTO"
        return static, record
    device = ctx.device
    if ctx.enabled:
        import torch.distributed as dist

        box = [None]
        if ctx.is_main:
            box[0] = _settle_here(static, model, cfg, ctx, train_split, remaining_steps, file)
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        fields, record = box[0]
        return replace(static, **fields, reason=record["reason"]), record
    fields, record = _settle_here(static, model, cfg, ctx, train_split, remaining_steps, file)
    return replace(static, **fields, reason=record["reason"]), record


def _settle_here(static: Plan, model, cfg, ctx, train_split, remaining_steps, file) -> tuple[dict, dict]:
    """(the switches, the record) by cache or measurement on this process."""
    from . import data as data_mod

    device, world = ctx.device, ctx.world
    key = plan_key(cfg, device, train_split.shape, sum(p.numel() for p in model.parameters()), world)
    path = cache_path()
    record: dict = {"key": key, "cache": str(path)}
    hit = read_cache(path).get(_key_text(key))
    if hit is not None and isinstance(hit.get("plan"), dict) and set(hit["plan"]) == set(SWITCHES):
        fields = _constrain(hit["plan"], static, device, ctx.enabled)
        record.update(source="cache", plan=fields, timings=hit.get("trials", []), measured_at=hit.get("measured_at"),
                      reason=f"measured on this machine earlier, cached in {path}")
        return fields, record
    steps = cfg.train.steps if remaining_steps is None else remaining_steps
    if steps < MIN_STEPS:
        record.update(source="static", plan=_switches(static),
                      reason=f"{static.reason}; {steps} steps are too few to measure plans (>= {MIN_STEPS})")
        return _switches(static), record
    b = cfg.train.batch_size // world
    x = data_mod.to_float(train_split.images[:b]).to(device)
    y = train_split.labels[:b].to(device) if model.n_classes else None
    result = tune(static, model, cfg, x, y, fastpath.Noise(ctx.rank, world), ctx.enabled)
    fields = _switches(result["plan"])
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"plan": fields, "trials": result["trials"], "reference_loss": result["reference_loss"],
             "measured_at": stamp, "seconds": round(result["seconds"], 2)}
    failed = write_cache(key, entry, path)
    where = f"cached in {path}" if failed is None else f"not cached: {path}: {failed}"
    record.update(source="measured", plan=fields, timings=result["trials"], measured_at=stamp,
                  reference_loss=result["reference_loss"], seconds=entry["seconds"],
                  reason=f"measured on this machine in {result['seconds']:.0f} s")
    print(f"vaedraw: plan: {label(result['plan'])} (measured: {_summary(result['trials'])}; {where})",
          file=file or sys.stderr)
    return fields, record


def _constrain(fields: dict, static: Plan, device: torch.device, distributed: bool) -> dict:
    """A cached plan under this process's constraints (never a CUDA graph off CUDA or with several processes)."""
    out = {s: fields[s] for s in SWITCHES}
    if device.type != "cuda" or distributed or out["compile"]:
        out["cuda_graph"] = False
    return out

