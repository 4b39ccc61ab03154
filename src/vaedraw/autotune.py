"""The training plan measured on the machine it runs on, once per model and machine, then cached.

`settle(static, model, cfg, ctx, train_split)` turns the plan `fastpath.choose_plan` read from the static
`fastpath.AUTO` table into the fastest correct plan for this run:

1. the cache (`cache_path()`, ~/.cache/vaedraw/plans.json; $VAEDRAW_CACHE_DIR or $XDG_CACHE_HOME/vaedraw
   like the data cache) is looked up under the run's key (`plan_key`: architecture, parameters, batch per
   process, image shape, likelihood, iwae_k, the asked precision and compile, device type, CPU or GPU
   model, threads, torch version, processes); a hit is used at once, unless it was measured while other
   processes kept the machine busy (`contended`), which is measured again (at most MAX_TRIES times);
2. otherwise, for runs of at least MIN_STEPS steps, every candidate (`candidates`) is set up on its own
   deep copy of the model with its own optimizer and the first training batch (`measure`): its first
   step's loss must lie within LOSS_TOLERANCE of float32 on the same batch and noise, and WARMUP more
   steps are not timed. Then the candidates that passed race (`race`): ROUNDS rounds, each timing
   ROUND_STEPS steps of every candidate in turn (wall time, synchronized on CUDA), so that load from
   other processes falls on all of them alike instead of on whichever ran during a burst; after each
   round a candidate over SLOWER times the best median drops out. The plain float32 eager step is always
   a candidate, so the pick is never slower than it. Everything stays within BUDGET_S seconds (CPU) or
   BUDGET_CUDA_S (CUDA); torch.compile is a candidate on CUDA only for runs long enough to pay back its
   compile time (COMPILE_PAYBACK_S), on a CPU only when asked;
3. the pick is written to the cache atomically and returned with a record (timings, rejections, how busy
   the machine was, where it came from) that training prints in one line and keeps as the run's plan.json.

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
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import fastpath
from .fastpath import Plan

CACHE_VERSION = 2  # 2: plans raced in interleaved rounds, entries say how busy the machine was
MIN_STEPS = 500  # shorter runs take the static table (or the cache): measuring would not pay for itself
WARMUP = 2  # untimed steps after the checked first one (lazy allocations, oneDNN primitive caches)
ROUNDS = 4  # timing rounds at most; each times ROUND_STEPS steps of every candidate still in the race
ROUND_STEPS = 2
SLOWER = 1.5  # a candidate whose median is this many times the best one's drops out after a round
LOSS_TOLERANCE = 0.02  # |loss - float32 loss| / |float32 loss| at the first step, same batch and noise
BUDGET_S = 20.0  # seconds for all candidates on a CPU
BUDGET_CUDA_S = 30.0  # on CUDA (CUDA-graph capture and cuDNN's own search take a few seconds each)
COMPILE_BUDGET_S = 120.0  # more, for a torch.compile candidate on CUDA (tens of seconds to compile)
COMPILE_PAYBACK_S = 900.0  # torch.compile is a CUDA candidate only when the run would train longer than this
CONTENDED = 0.5  # cores' worth of other processes' CPU use during measuring above which it is measured again
MAX_TRIES = 3  # measurements of one key on a busy machine before its best result is kept for good
SWITCHES = ("precision", "compile", "channels_last", "conv_as_conv", "cuda_graph")  # what a candidate sets

# Wall time: the budget and the step timer (tests replace it). Interleaved rounds make wall time fair on a
# shared machine: a burst of other load slows one round of every candidate, and the median drops it.
_clock = time.perf_counter


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = [int(v) for v in fields]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """How many cores' worth of CPU other processes used since it was made: (machine busy time - our own CPU
    time) / wall time. `own`: our CPU seconds (default: this process's; a benchmark with worker processes
    counts theirs too). None where /proc/stat is unreadable."""

    def __init__(self, own=time.process_time):
        self.own = own
        self.t0, self.own0, self.busy0 = _clock(), own(), machine_busy_seconds()

    def other_cores(self) -> float | None:
        busy = machine_busy_seconds()
        wall = _clock() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (self.own() - self.own0)) / wall


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


def candidates(static: Plan, train_cfg, arch: str, device: torch.device, distributed: bool = False,
               long_run: bool = False) -> list[Plan]:
    """The plans worth timing, the plain step first (all switches off) and the static table's row second.

    precision: the asked one, else fp32 and (with native bf16) bf16; channels_last on/off; conv_as_conv on/off
    for seed; on CUDA a whole-step CUDA graph (one process) and, when compile is auto and the run is long
    enough to pay back the compile time (`long_run`), torch.compile of the static row's settings (last:
    its compile time is the largest cost). On a CPU compile only when asked: its compile time does not pay
    back within a run.
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
    if cuda and asked_compile is None and long_run:
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


class Trial:
    """One candidate in the race: its own model copy, optimizer and step, and its timings so far."""

    def __init__(self, plan: Plan, step=None, loss: float | None = None, note: str = ""):
        self.plan, self.step, self.loss, self.note = plan, step, loss, note
        self.rounds: list[float] = []  # mean ms/step of each timing round

    @property
    def ms(self) -> float | None:
        """The best round's ms/step: other processes' load only ever adds time, so the fastest round is the
        least disturbed one (as timeit takes the minimum of its repeats)."""
        return min(self.rounds) if self.rounds else None

    @property
    def racing(self) -> bool:
        return self.step is not None and not self.note

    def row(self) -> dict:
        return {"plan": label(self.plan), "ms": None if self.ms is None else round(self.ms, 3),
                "loss": self.loss, "note": self.note, "rounds_ms": [round(r, 3) for r in self.rounds]}


def measure(plan: Plan, model, cfg, x, y, noise, rng: dict, ref: float) -> Trial:
    """Set up `plan` on a deep copy of `model` and take its checked first step (from RNG state `rng`) and
    WARMUP untimed ones. -> a Trial ready to race, or one with a note saying why it was rejected."""
    device = x.device
    m = fastpath.prepare_model(copy.deepcopy(model), plan, noise).train()
    opt = fastpath.make_optimizer(m, cfg, device, plan)
    step = fastpath.FastStep(m, opt, cfg, plan, noise)
    lr = cfg.train.lr
    _set_rng_state(rng, device)
    try:
        loss = float(step(x, y, lr)[0])
        rel = abs(loss - ref) / max(abs(ref), 1e-12)
        if not math.isfinite(loss) or rel > LOSS_TOLERANCE:
            return Trial(plan, loss=loss, note=f"rejected: loss {loss:.4g} is {100 * rel:.2f}% from float32 "
                                               f"{ref:.4g} (limit {100 * LOSS_TOLERANCE:g}%)")
        for _ in range(WARMUP + (fastpath.GRAPH_WARMUP + 1 if plan.cuda_graph else 0)):
            step(x, y, lr)
        _sync(device)
    except RuntimeError as e:  # a kernel this device lacks, a failed compile or capture
        return Trial(plan, note=f"failed: {str(e).splitlines()[0][:120]}")
    return Trial(plan, step, loss)


def race(trials: list[Trial], x, y, lr: float, deadline: float) -> None:
    """Time the racing trials in interleaved rounds of ROUND_STEPS steps each (see the module docstring).
    From the second round on, a trial whose best round is over SLOWER times the best one drops out. Stops
    after ROUNDS rounds, or at the deadline once every trial has two rounds."""
    device = x.device
    for r in range(ROUNDS):
        racing = [t for t in trials if t.racing]
        if r > 0 and len(racing) < 2 or r > 1 and _clock() > deadline:
            break
        for t in racing:
            _sync(device)
            t0 = _clock()
            for _ in range(ROUND_STEPS):
                t.step(x, y, lr)
            _sync(device)
            t.rounds.append(1000 * (_clock() - t0) / ROUND_STEPS)
        if r == 0:
            continue  # one round may have met a burst of other load: judge from two on
        best = min(t.ms for t in racing)
        for t in racing:
            if t.ms > SLOWER * best:
                t.note = f"slower: dropped after {len(t.rounds)} rounds, over {SLOWER:g}x the best"


def tune(static: Plan, model, cfg, x, y, noise, distributed: bool = False, steps: int | None = None) -> dict:
    """Set up every candidate, race those that pass; -> {"plan": the fastest correct Plan, "trials": [{"plan",
    "ms", "loss", "note", "rounds_ms"}], "reference_loss", "seconds", "other_cores"}. The global RNG is
    restored before returning. `steps`: the run's length, for whether torch.compile can pay back."""
    device = x.device
    rng = _rng_state(device)
    load = LoadMeter()
    t_start = _clock()
    deadline = t_start + (BUDGET_CUDA_S if device.type == "cuda" else BUDGET_S)
    trials: list[Trial] = []
    best: Trial | None = None
    try:
        ref = reference_loss(model, cfg, x, y, noise, rng)
        plans = candidates(static, cfg.train, cfg.model.arch, device, distributed)
        for plan in plans:
            if trials and _clock() > deadline:
                trials.append(Trial(plan, note="not measured: time budget"))
                continue
            trials.append(measure(plan, model, cfg, x, y, noise, rng, ref))
        race(trials, x, y, cfg.train.lr, deadline)
        best = min((t for t in trials if t.racing), key=lambda t: t.ms, default=None)
        if best is not None and steps and _compile_pays(cfg.train, device, distributed, best.ms, steps):
            # one more candidate, raced against the best so far: it costs its compile time once
            plan = next(p for p in candidates(static, cfg.train, cfg.model.arch, device, distributed, True)
                        if p.compile)
            compiled = measure(plan, model, cfg, x, y, noise, rng, ref)
            trials.append(compiled)
            race([best, compiled], x, y, cfg.train.lr, _clock() + COMPILE_BUDGET_S)
            best = min((t for t in trials if t.racing), key=lambda t: t.ms)
    finally:
        for t in trials:
            t.step = None  # free the copies before training starts
        _set_rng_state(rng, device)
        _sync(device)
    chosen = static if best is None else best.plan  # nothing passed (not even float32): the static row
    return {"plan": chosen, "trials": [t.row() for t in trials], "reference_loss": ref,
            "seconds": _clock() - t_start, "other_cores": load.other_cores()}


def _compile_pays(train_cfg, device: torch.device, distributed: bool, best_ms: float, steps: int) -> bool:
    """torch.compile is worth measuring: auto on CUDA, and the run at the best plan's speed is long."""
    return (device.type == "cuda" and train_cfg.compile == "auto"
            and steps * best_ms / 1000 > COMPILE_PAYBACK_S)


# ----------------------------------------------------------------------------- the training run's entry
def _switches(plan: Plan) -> dict:
    return {s: getattr(plan, s) for s in SWITCHES}


def _summary(trials: list[dict]) -> str:
    parts = []
    for t in trials:
        if t["ms"] is not None and not t["note"].startswith("slower"):
            parts.append(f"{t['plan']} {t['ms']:.0f} ms")
        elif t["ms"] is not None:  # dropped out of the race
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


def _usable(hit) -> bool:
    return isinstance(hit, dict) and isinstance(hit.get("plan"), dict) and set(hit["plan"]) == set(SWITCHES)


def _settle_here(static: Plan, model, cfg, ctx, train_split, remaining_steps, file) -> tuple[dict, dict]:
    """(the switches, the record) by cache or measurement on this process."""
    from . import data as data_mod

    device, world = ctx.device, ctx.world
    key = plan_key(cfg, device, train_split.shape, sum(p.numel() for p in model.parameters()), world)
    path = cache_path()
    record: dict = {"key": key, "cache": str(path)}
    hit = read_cache(path).get(_key_text(key))
    hit = hit if _usable(hit) else None
    steps = cfg.train.steps if remaining_steps is None else remaining_steps
    tries = int(hit.get("tries", 1)) if hit is not None else 0
    if hit is not None and (not hit.get("contended") or tries >= MAX_TRIES or steps < MIN_STEPS):
        fields = _constrain(hit["plan"], static, device, ctx.enabled)
        record.update(source="cache", plan=fields, timings=hit.get("trials", []), measured_at=hit.get("measured_at"),
                      reason=f"measured on this machine earlier, cached in {path}")
        return fields, record
    if steps < MIN_STEPS:
        record.update(source="static", plan=_switches(static),
                      reason=f"{static.reason}; {steps} steps are too few to measure plans (>= {MIN_STEPS})")
        return _switches(static), record
    b = cfg.train.batch_size // world
    x = data_mod.to_float(train_split.images[:b]).to(device)
    y = train_split.labels[:b].to(device) if model.n_classes else None
    result = tune(static, model, cfg, x, y, fastpath.Noise(ctx.rank, world), ctx.enabled, steps)
    other = result["other_cores"]
    contended = other is not None and other > CONTENDED
    if hit is not None and contended and hit.get("other_cores") is not None and hit["other_cores"] < other:
        # measured again on a busy machine, busier than last time: the earlier, quieter result stands
        result.update(plan=replace(static, **_constrain(hit["plan"], static, device, ctx.enabled)),
                      trials=hit.get("trials", []), other_cores=hit["other_cores"])
    fields = _switches(result["plan"])
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"plan": fields, "trials": result["trials"], "reference_loss": result["reference_loss"],
             "measured_at": stamp, "seconds": round(result["seconds"], 2), "tries": tries + 1,
             "other_cores": None if result["other_cores"] is None else round(result["other_cores"], 2),
             "contended": bool(contended)}
    failed = write_cache(key, entry, path)
    where = f"cached in {path}" if failed is None else f"not cached: {path}: {failed}"
    busy = (f"; other processes used {other:.1f} cores meanwhile, so the next run measures again"
            if contended and tries + 1 < MAX_TRIES else "")
    record.update(source="measured", plan=fields, timings=result["trials"], measured_at=stamp,
                  reference_loss=result["reference_loss"], seconds=entry["seconds"],
                  other_cores=entry["other_cores"], contended=entry["contended"],
                  reason=f"measured on this machine in {result['seconds']:.0f} s")
    print(f"vaedraw: plan: {label(result['plan'])} (measured: {_summary(result['trials'])}; {where}{busy})",
          file=file or sys.stderr)
    return fields, record


def _constrain(fields: dict, static: Plan, device: torch.device, distributed: bool) -> dict:
    """A cached plan under this process's constraints (never a CUDA graph off CUDA or with several processes)."""
    out = {s: fields[s] for s in SWITCHES}
    if device.type != "cuda" or distributed or out["compile"]:
        out["cuda_graph"] = False
    return out

