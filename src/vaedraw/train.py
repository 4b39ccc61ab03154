"""Training: set-up (everything checked before the run directory is touched), the loop, its monitoring,
the checkpointer, interruption and the end-of-run artifacts.

The run directory and what a resume may change are rundir.py's; the checkpoint file format is
checkpoint.py's; the step itself (precision, compile, CUDA graphs, fused Adam) is fastpath.py's.

Batches are drawn by index from the whole dataset held as one uint8 tensor on the training device.
The order is a fresh permutation per epoch, seeded by (seed, epoch), so it needs no saved state; the
global RNG (dropout, reparameterization noise, dynamic binarization) is saved in each checkpoint, so a
resumed run on the CPU ends with the same weights as an uninterrupted one (on the CPU's default fast path;
torch.compile and CUDA graphs give up bitwise exactness, see docs/SPEED.md).

Under torchrun the loop is data-parallel (distributed.py): each process draws its rows of every global
batch and of the global batch's noise, DistributedDataParallel averages the gradients, and rank 0 alone
logs, shows progress and writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from .progress import Progress

from . import checkpoint as ckpt_io
from . import data as data_mod
from . import distributed as dist_mod
from . import autotune
from . import fastpath
from . import plots
from . import tracking
from .config import RunConfig, build_config, steps_for_epochs, value_range
from .errors import ConfigError, OutputError, TrainingDiverged, TrainingInterrupted, WorkerFailed
from .evaluate import eval_inputs, heldout_loss
from .models import build_model, count_parameters
from .rundir import DISK_ERRNOS, RESUME_FREE_KEYS, RunDir, check_checkpoint_fits, settle_config
from .run import load_run, resolve_device
from .sample import GMM_NAME, decode_means, fit_gmm, reconstruct_means

__all__ = ["Batcher", "Checkpointer", "Monitor", "RESUME_FREE_KEYS", "TrainingDiverged", "TrainingInterrupted",
           "finish_run", "learning_rate", "train"]

N_FIXED = 10  # fixed test inputs (and codes per row) in the monitoring picture
# The mixture fit's time per training image: encoding it, plus EM per component for a 32-d code (full
# covariances: the EM work grows as the code's dimension squared). Measured on 2 CPU cores: 60,000 images
# take about 5 s with 3 components and about 140 s with 100 for a 32-d code, 36 s for a 16-d one.
GMM_SECONDS_PER_IMAGE = 7e-5
GMM_SECONDS_PER_IMAGE_COMPONENT = 2.4e-5
GMM_REFERENCE_DIM = 32


# ----------------------------------------------------------------------------- batches
class Batcher:
    """Draw the batch for global step s by index from device-resident data.

    images: uint8 [N, H, W] or [N, H, W, C] on the device; labels: int64 [N]. Each epoch is a permutation
    seeded by (seed, epoch); step s takes slice s mod (N // B) of it (the last partial batch is dropped).
    With `world` processes, rank r takes its contiguous share of every global batch.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size > len(images):
            raise ConfigError(f"train.batch_size={batch_size} is larger than the training set ({len(images)} images)")
        if batch_size % world:
            raise ConfigError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.steps_per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
            self._epoch = epoch
        local = self.batch_size // self.world
        start = i * self.batch_size + self.rank * local
        return self._perm[start:start + local]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x float [B, C, H, W] in [0, 1], y int64 [B]."""
        idx = self.indices(step)
        return data_mod.to_float(self.images[idx]), self.labels[idx]


LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")  # train.lr_schedule; learning_rate reads them


def kl_weight(step: int, cfg: RunConfig) -> float:
    """The KL term's weight at a step: rises linearly from 0 to 1 over train.kl_warmup steps (then 1)."""
    warmup = cfg.train.kl_warmup
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)


def learning_rate(step: int, cfg: RunConfig) -> float:
    """constant, or cosine from lr down to lr_min_ratio * lr at the last step."""
    t = cfg.train
    if t.lr_schedule == "constant":
        return t.lr
    frac = min(step / max(1, t.steps), 1.0)
    return t.lr * (t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].to(torch.uint8).cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu(), device)


# ----------------------------------------------------------------------------- monitoring
@dataclass
class Monitor:
    """Fixed test inputs and fixed codes, decoded at every picture step so pictures compare across time."""

    x: torch.Tensor  # [N_FIXED, C, H, W] on the CPU
    y: torch.Tensor  # [N_FIXED] on the CPU
    z: torch.Tensor  # [3 * N_FIXED, D]
    zy: torch.Tensor | None  # labels for the fixed codes (conditional runs): 0, 1, ... per row

    @classmethod
    def for_run(cls, test_split, model, seed: int) -> Monitor:
        g = torch.Generator().manual_seed(seed + 1)
        zy = (torch.arange(N_FIXED) % model.n_classes).repeat(3) if model.n_classes else None
        return cls(x=eval_inputs(test_split.images[:N_FIXED], False), y=test_split.labels[:N_FIXED],
                   z=torch.randn(3 * N_FIXED, model.code_dim, generator=g), zy=zy)

    @torch.no_grad()
    def picture(self, model) -> torch.Tensor:
        """-> [5 * N_FIXED, C, H, W] on the CPU: the inputs, their reconstructions, decodes of the fixed codes."""
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        y = self.y.to(dev) if model.n_classes else None
        rec = reconstruct_means(model, self.x, y)
        gen = decode_means(model, self.z, self.zy)
        model.train(was)
        return torch.cat([self.x, rec, gen])


# ----------------------------------------------------------------------------- signals
class _Stopped(BaseException):
    """A signal during a phase that cannot pause at a step boundary (the mixture fit)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals(immediate: bool = False):
    """SIGINT/SIGTERM become a flag checked after each step (so the loop saves and exits cleanly), or with
    `immediate` a _Stopped raised where the program is."""
    received: list[int] = []

    def handler(signum, frame):
        if immediate:
            raise _Stopped(signum)
        if signum in received:  # a second Ctrl-C while saving: leave immediately; the old checkpoint is intact
            raise KeyboardInterrupt
        # (a SIGTERM after a SIGINT is torchrun passing the same stop on to its workers: keep saving)
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Writes the run's checkpoint atomically, and only a finite state: a state that went non-finite since
    the last log point never replaces the last good checkpoint. Knows what to tell the user when it cannot."""

    def __init__(self, rundir: RunDir, session: _Session):
        self.rundir, self.s = rundir, session
        self.saved_step: int | None = session.start if session.ckpt is not None else None

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        s = self.s
        if self.saved_step is None:
            kept = (f"no checkpoint had been saved yet: delete {self.rundir.path} or choose another --out, "
                    "and start again")
        else:
            kept = (f"stopped without saving, so {self.rundir.checkpoint} still holds the last good state (step "
                    f"{self.saved_step}); continue from it with `{s.resume_command()} --keep new --lr SMALLER`")
        return TrainingDiverged(f"{what} near step {step}; {kept}. Likely causes: a learning rate too high for "
                                "this model (try a smaller --lr), or bad input data")

    def _finite(self, window: torch.Tensor) -> bool:
        # Weights can be finite yet overflow the forward pass (after a huge step), so the loss of a few fixed
        # test images is checked too (one host sync per checkpoint).
        s = self.s
        finite = torch.stack([torch.isfinite(window).all(), *(torch.isfinite(p).all() for p in s.model.parameters())])
        probe = heldout_loss(s.model, s.x_test[:N_FIXED], s.y_test[:N_FIXED])["loss"]
        return bool(finite.all()) and math.isfinite(probe)

    def save(self, step: int, metrics: dict, window: torch.Tensor) -> None:
        s = self.s
        if not self._finite(window):
            raise self.diverged(step, "the training loss or the weights became non-finite")
        path = self.rundir.checkpoint
        try:
            ckpt_io.save(path, ckpt_io.Checkpoint(
                config=s.cfg, model_state=s.model.state_dict(), step=step,
                optim_state=fastpath.optimizer_state_for_saving(s.opt), rng=_rng_state(s.dev), metrics=metrics,
                image_shape=tuple(s.model.image_shape)))
        except SafetensorError as e:  # safetensors reports its own write failures (a full disk) this way
            kept = "no checkpoint had been saved yet" if self.saved_step is None else \
                f"the checkpoint of step {self.saved_step} is intact"
            raise OutputError(f"could not write {path} ({e}); {kept}: free some space or fix the folder's "
                              f"permissions, then continue with `{s.resume_command()}`") from None
        self.saved_step = step


# ----------------------------------------------------------------------------- set-up
@dataclass
class _Session:
    """Everything a run needs, built and checked before the run directory is written."""

    cfg: RunConfig
    ctx: dist_mod.Context
    rundir: RunDir
    ckpt: ckpt_io.Checkpoint | None
    train_split: data_mod.Split
    test_split: data_mod.Split
    model: torch.nn.Module
    opt: torch.optim.Adam
    step_fn: fastpath.FastStep
    plan: fastpath.Plan
    batcher: Batcher
    x_test: torch.Tensor
    y_test: torch.Tensor
    start: int
    continue_argv: list[str]
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)  # opened by _run

    @property
    def dev(self) -> torch.device:
        return self.ctx.device

    def resume_command(self) -> str:
        """The exact command that continues this run (every option it needs to find its data and device)."""
        return shlex.join(["vaedraw", "train", *self.continue_argv])


def _settle(rundir: RunDir, cfg: RunConfig | None, changes: dict | None, resume: bool, keep: str | None):
    """-> (the config to train with, the checkpoint to resume or None). Reads only."""
    ckpt = rundir.inspect(resume)
    if ckpt is None:
        cfg = build_config("default", None, dict(changes or {})) if cfg is None else cfg
        return cfg, None
    return settle_config(ckpt, cfg, changes, keep, rundir.checkpoint), ckpt


def _load_data(cfg: RunConfig, rundir: RunDir, ckpt, data_dir, progress: bool):
    """A new run: the data set the config names. A resumed run: exactly the data it recorded, or a refusal."""
    recorded = rundir.data_source() if ckpt is not None else None
    if recorded is None:  # a new run, or one saved before runs recorded their data
        return data_mod.load_dataset(cfg.data.dataset, data_dir, progress=progress, options=cfg.data)
    if recorded["train"].get("dataset") != cfg.data.dataset:
        raise ConfigError(f"--resume: this run was trained on {recorded['train'].get('dataset')!r}, not "
                          f"{cfg.data.dataset!r}; a resumed run keeps its data: start a new run in another --out")
    return tuple(data_mod.load_recorded(recorded[split], split, data_dir, progress=progress)
                 for split in ("train", "test"))


def _check_classes(cfg: RunConfig, train_split) -> None:
    """A conditional model needs labels, as many classes as the data has (a ConfigError naming the fix)."""
    k, have = cfg.model.n_classes, train_split.n_classes
    if k and not have:
        raise ConfigError(f"model.n_classes={k} makes a conditional model, but {train_split.name} has no labels "
                          "(put the images in one subfolder per class, or set model.n_classes=0)")
    if k and k != have:
        raise ConfigError(f"model.n_classes={k}, but {train_split.name} has {have} classes: set "
                          f"model.n_classes={have}")


def _set_steps(cfg: RunConfig, epochs: float | None, n_train: int) -> None:
    t = cfg.train
    if epochs is not None:
        t.steps = steps_for_epochs(epochs, n_train, t.batch_size)
    if t.steps not in value_range("train.steps"):  # a config built in code skips the checks of --set
        raise ConfigError(f"train.steps={t.steps:,} is out of range {value_range('train.steps')}")


def _build(cfg: RunConfig, ctx: dist_mod.Context, train_split, ckpt, tune: bool = False):
    """The model, optimizer and step for this run, the checkpoint's state loaded. Same order of random draws
    as always (seed, then the model's initialization), so a run from a seed is reproducible. `tune`: let
    autotune.settle measure or look up the plan (it leaves the RNG and the model as they were); else the
    static table. The plan's record (for plan.json) is `step.plan_record`."""
    dev, t = ctx.device, cfg.train
    fastpath.use_fixed_shape_kernels(dev)
    plan = fastpath.choose_plan(t, cfg.model.arch, dev, distributed=ctx.enabled)
    torch.manual_seed(t.seed)
    noise = fastpath.Noise(ctx.rank, ctx.world)
    model = build_model(cfg.model, train_split.shape).to(dev)
    record = {"plan": {k: getattr(plan, k) for k in autotune.SWITCHES}, "source": "static"}
    if tune:
        remaining = t.steps - (ckpt.step if ckpt is not None else 0)
        plan, record = autotune.settle(plan, model, cfg, ctx, train_split, remaining)
    model = fastpath.prepare_model(model, plan, noise)
    opt = fastpath.make_optimizer(model, cfg, dev, plan)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        fresh = fastpath.make_optimizer(model, cfg, dev, plan)
        opt.load_state_dict(ckpt.optim_state)
        fastpath.restore_optimizer_flags(opt, fresh)
        _set_rng_state(ckpt.rng, dev)
    step = fastpath.FastStep(model, opt, cfg, plan, noise, ddp=ctx.enabled)
    step.plan_record = {**record, "description": plan.describe()}
    return model, opt, step, plan


def _continue_argv(out: Path, opts: dict, ctx: dist_mod.Context) -> list[str]:
    """The options of `vaedraw train` that continue this run: its directory, its data folder, its device."""
    argv = ["--out", str(out), "--resume"]
    if opts["data_dir"] is not None:
        argv += ["--data-dir", str(opts["data_dir"])]
    return argv + ["--device", opts["device"]] + (["--nproc", str(ctx.world)] if ctx.enabled else [])


def _set_up(cfg, out: Path, ctx, rundir: RunDir, opts: dict) -> _Session:
    """Check and build everything; nothing is written (the directory lock is taken if it exists)."""
    if ctx.is_main:
        rundir.lock()
    cfg, ckpt = _settle(rundir, cfg, opts["changes"], opts["resume"], opts["keep"])
    if cfg.train.tensorboard:
        tracking.require_tensorboard()  # before any data is loaded or file written
    train_split, test_split = _load_data(cfg, rundir, ckpt, opts["data_dir"], opts["progress"] and ctx.is_main)
    cfg.data.subset = bool(train_split.provenance.get("subset"))  # config.json says when it is the bundled subset
    _check_classes(cfg, train_split)
    if ckpt is not None:
        check_checkpoint_fits(ckpt, train_split.shape, rundir.checkpoint)
    _set_steps(cfg, opts["epochs"], len(train_split))
    dev, t = ctx.device, cfg.train
    batcher = Batcher(train_split.images.to(dev), train_split.labels.to(dev), t.batch_size, t.seed, ctx.rank,
                      ctx.world)
    model, opt, step_fn, plan = _build(cfg, ctx, train_split, ckpt, tune=True)
    n_eval = min(cfg.train.eval_images, len(test_split))
    return _Session(
        cfg=cfg, ctx=ctx, rundir=rundir, ckpt=ckpt, train_split=train_split, test_split=test_split, model=model,
        opt=opt, step_fn=step_fn, plan=plan, batcher=batcher, start=ckpt.step if ckpt is not None else 0,
        continue_argv=_continue_argv(out, opts, ctx),
        x_test=eval_inputs(test_split.images[:n_eval], model.likelihood == "bernoulli").to(dev),
        y_test=test_split.labels[:n_eval].to(dev))


# ----------------------------------------------------------------------------- the API
def train(cfg: RunConfig | None, out: str | Path, *, device: str = "auto", data_dir: str | Path | None = None,
          resume: bool = False, keep: str | None = None, changes: dict | None = None, progress: bool = True,
          epochs: float | None = None, argv: list[str] | None = None) -> Path:
    """Train a VAE per `cfg` into the run directory `out` and return it. See the module docstring.

    `cfg` None: on --resume the stored config, else the default preset, with `changes` (config keys ->
    values, as `--set` takes them) applied. A given `cfg` on resume is reconciled with the stored one
    (rundir.settle_config; `keep` 'stored' or 'new'). `epochs`, if given, sets cfg.train.steps to
    ceil(epochs * training images / batch size). Under torchrun every process calls this; rank 0 alone
    writes `out`.
    """
    out, rundir = Path(out), RunDir(out)
    opts = {"changes": changes, "resume": resume, "keep": keep, "data_dir": data_dir, "progress": progress,
            "epochs": epochs, "device": device}
    ctx = dist_mod.setup(resolve_device(device))
    try:
        session = _set_up(cfg, out, ctx, rundir, opts)
        dist_mod.barrier(ctx)  # every process has read the directory before rank 0 writes to it
        _run(session, argv, progress)
        return out
    except OSError as e:
        if e.errno not in DISK_ERRNOS or not str(e.filename or out).startswith(str(out)):
            raise
        where = f" ({e.filename})" if e.filename else ""
        again = shlex.join(["vaedraw", "train", *_continue_argv(out, opts, ctx)])
        raise OutputError(f"cannot write to the run directory {out}: {e.strerror}{where}; free some space or fix "
                          f"its permissions, then continue with `{again}` (the last checkpoint written there is "
                          "intact)") from e
    except RuntimeError as e:
        if not (ctx.enabled and dist_mod.is_peer_failure(e)):
            raise
        raise WorkerFailed(f"worker {ctx.rank}: lost contact with another worker (it ended or was killed); the last "
                           f"checkpoint in {out} is intact: continue with "
                           f"`{shlex.join(['vaedraw', 'train', *_continue_argv(out, opts, ctx)])}`") from None
    finally:
        rundir.unlock()
        dist_mod.teardown(ctx)


def _run(s: _Session, argv: list[str] | None, progress: bool) -> None:
    cfg, main = s.cfg, s.ctx.is_main
    if main:
        s.rundir.prepare(cfg, {"train": s.train_split.provenance, "test": s.test_split.provenance},
                         argv if argv is not None else sys.argv, s.start if s.ckpt is not None else None)
        procs = f", {s.ctx.world} processes" if s.ctx.enabled else ""
        done = "; training is complete, finishing the run" if s.start >= cfg.train.steps else ""
        print(f"vaedraw: training preset {cfg.preset!r} ({count_parameters(s.model):,} parameters) on "
              f"{s.train_split.name} ({len(s.train_split):,} images), device {s.dev}{procs}, "
              f"steps {s.start}->{cfg.train.steps}{done}", file=sys.stderr)
        fastpath.announce(s.plan, s.dev)
        s.rundir.write_plan(s.step_fn.plan_record)
        s.tracker = tracking.open_tracker(cfg, s.rundir.path, main, s.start if s.ckpt is not None else None)
    try:
        _run_and_finish(s, progress)
    finally:
        s.tracker.close()


def _run_and_finish(s: _Session, progress: bool) -> None:
    cfg, main = s.cfg, s.ctx.is_main
    step = _loop(s, Progress(cfg.train.steps, "training", "steps", initial=s.start, enabled=progress and main))
    # No barrier after this: rank 0's mixture fit can outlast a collective's timeout, and torchrun waits for
    # every process anyway.
    if main:
        with _signals(immediate=True):
            try:
                finish_run(s.rundir.path, s.model, cfg, s.train_split, s.dev)
                s.tracker.finish(cfg, s.rundir.path)
            except _Stopped as stop:
                raise TrainingInterrupted(
                    f"stopped while finishing the run (training is complete and saved at step {step}); finish it "
                    f"with: {s.resume_command()}", stop.signum) from None


# ----------------------------------------------------------------------------- the loop
class _Window:
    """Sums of [loss, recon, kl] on the device since the last log point (no host sync per step)."""

    def __init__(self, dev: torch.device):
        self.sums, self.steps, self.t0 = torch.zeros(3, device=dev), 0, time.perf_counter()

    def add(self, stats: torch.Tensor) -> None:
        self.sums += stats
        self.steps += 1

    def reset(self) -> None:
        self.sums.zero_()
        self.steps, self.t0 = 0, time.perf_counter()


def _loop(s: _Session, bar: Progress) -> int:
    """Train from s.start to cfg.train.steps; -> the last step. Logs, evaluates, draws and saves as configured."""
    t, ctx = s.cfg.train, s.ctx
    saver = Checkpointer(s.rundir, s)
    monitor = Monitor.for_run(s.test_split, s.model, t.seed)
    metrics: dict = dict(s.ckpt.metrics) if s.ckpt else {}
    window = _Window(s.dev)
    s.model.train()
    step = s.start
    with _signals() as signals:
        try:
            while step < t.steps:
                x, y = s.batcher.batch(step)
                window.add(s.step_fn(x, y, learning_rate(step, s.cfg), kl_weight(step, s.cfg)))
                step += 1
                bar.update(1)
                at_log = step % t.log_every == 0 or step == t.steps
                if at_log:
                    metrics["train"] = _log_train(s, step, window, saver, bar)
                if ctx.is_main:
                    _periodic(s, step, metrics, window, saver, monitor, bar)
                # one process alone may have been signalled: with several, agree at log points only (a
                # collective per step would cost a host sync per step)
                if bool(signals) if not ctx.enabled else (at_log and dist_mod.any_flag(bool(signals), ctx, s.dev)):
                    if ctx.is_main and saver.saved_step != step:  # _periodic may have just saved it
                        saver.save(step, metrics, window.sums)
                    signum = signals[0] if signals else signal.SIGTERM
                    raise TrainingInterrupted(f"stopped at step {step}, checkpoint saved; continue with: "
                                              f"{s.resume_command()}", signum)
        finally:
            bar.close()
    return step


def _log_train(s: _Session, step: int, window: _Window, saver: Checkpointer, bar: Progress) -> dict:
    """The mean training terms since the last log point: the only regular host sync (and, with several
    processes, the only extra collective)."""
    t = s.cfg.train
    loss, recon, kl = dist_mod.all_mean(window.sums / window.steps, s.ctx).tolist()
    ips = window.steps * t.batch_size / (time.perf_counter() - window.t0)
    if not all(math.isfinite(v) for v in (loss, recon, kl)):
        raise saver.diverged(step, f"the training loss became {loss}")
    row = {"step": step, "split": "train", "loss": loss, "recon": recon, "kl": kl,
           "lr": learning_rate(step - 1, s.cfg), "images_per_s": ips}
    if s.ctx.is_main:
        s.rundir.log(row)
        s.tracker.log(row)
        bar.set_stats(f", loss {loss:.2f} (recon {recon:.2f}, kl {kl:.2f}), {ips:.0f} images/s",
                      loss=f"{loss:.2f}", recon=f"{recon:.2f}", kl=f"{kl:.2f}", img_s=f"{ips:.0f}")
    window.reset()
    return row


def _periodic(s: _Session, step: int, metrics: dict, window: _Window, saver: Checkpointer, monitor: Monitor,
              bar: Progress) -> None:
    """Rank 0's held-out evaluation, monitoring picture and checkpoint, each on its own schedule."""
    t = s.cfg.train
    last = step == t.steps
    if step % t.eval_every == 0 or last:
        ev = heldout_loss(s.model, s.x_test, s.y_test)
        metrics["test"] = row = {"step": step, "split": "test", **ev}
        s.rundir.log(row)
        s.tracker.log(row)
        bar.write(f"step {step}: test loss {ev['loss']:.3f} (recon {ev['recon']:.3f}, kl {ev['kl']:.3f})")
    if step % t.picture_every == 0 or last:
        picture = monitor.picture(s.model)
        plots.save_grid(picture, s.rundir.path / "pictures" / f"step_{step:07d}.png", nrow=N_FIXED)
        s.tracker.picture(step, picture, N_FIXED)
    if step % t.checkpoint_every == 0 or last:
        saver.save(step, metrics, window.sums)


# ----------------------------------------------------------------------------- the end of a run
def finish_run(out: Path, model, cfg: RunConfig, train_split, dev: torch.device) -> None:
    """End-of-training artifacts: curves, the progress GIF, the gmm sampler, a sample grid."""
    subset = " (the bundled subset)" if train_split.provenance.get("subset") else ""
    plots.plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"{cfg.preset} on {cfg.data.dataset}{subset}")
    plots.save_progress_gif(sorted((out / "pictures").glob("step_*.png")), out / "progress.gif")
    model.eval()
    if cfg.sample.fit_gmm:
        _fit_mixture(out, model, cfg, train_split)
    run = load_run(out, device=str(dev))
    n, nrow = 100, 10
    y = (torch.arange(nrow) % run.n_classes).repeat_interleave(n // nrow) if run.conditional else None
    plots.save_grid(run.sample(n, seed=0, y=y), out / "samples.png", nrow=nrow)


def _fit_mixture(out: Path, model, cfg: RunConfig, train_split) -> None:
    k, n = cfg.sample.gmm_components, len(train_split)
    d = model.code_dim
    estimate = n * (GMM_SECONDS_PER_IMAGE + GMM_SECONDS_PER_IMAGE_COMPONENT * k * (d / GMM_REFERENCE_DIM) ** 2)
    print(f"vaedraw: fitting the gmm sampler: encoding {n:,} training images, then a {k}-component Gaussian "
          f"mixture to their codes (roughly {estimate:.0f} s on 2 CPU cores; Ctrl-C is safe, --resume redoes it)",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    fit_gmm(model, train_split.images, train_split.labels if model.n_classes else None, k, cfg.train.seed,
            out / GMM_NAME)
    print(f"vaedraw: gmm sampler fitted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
