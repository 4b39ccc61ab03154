"""Training: the loop, its monitoring, checkpoints, resume and interruption.

A run directory holds everything about one run:
    config.json            the resolved RunConfig (the checkpoint holds it too)
    command.txt            the command lines that trained it (one per start or resume)
    metrics.jsonl          one JSON object per log point: {"step", "split": "train"|"test", "loss", ...}
    checkpoint.safetensors weights, optimizer, RNG states, config, versions (see checkpoint.py)
    pictures/step_*.png    fixed test inputs, their reconstructions, and decodes of fixed codes
    curves.png, progress.gif, samples.png, gmm.safetensors   written at the end

Batches are drawn by index from the whole dataset held as one uint8 tensor on the training device.
The order is a fresh permutation per epoch, seeded by (seed, epoch), so it needs no saved state; the
global RNG (dropout, reparameterization noise, dynamic binarization) is saved in each checkpoint, so a
resumed run on the CPU ends with the same weights as an uninterrupted one (on the CPU's default fast path;
torch.compile and CUDA graphs give up bitwise exactness, see docs/SPEED.md).

The step itself (precision, compile, CUDA graphs, fused Adam) comes from fastpath.py. Under torchrun the
loop is data-parallel (distributed.py): each process draws its rows of every global batch and of the
global batch's noise, DistributedDataParallel averages the gradients, and rank 0 alone logs, shows the
progress bar and writes the run directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from . import checkpoint as ckpt_io
from . import data as data_mod
from . import distributed as dist_mod
from . import fastpath
from . import plots
from .config import RunConfig, diff
from .errors import ConfigError, VaedrawError
from .evaluate import eval_inputs, test_loss
from .models import build_model, count_parameters
from .objectives import vae_loss
from .run import resolve_device
from .sample import GMM_NAME, decode_means, fit_gmm

# Changing these on resume is harmless: they do not change the model or the optimization.
RESUME_FREE_KEYS = {"train.steps", "train.log_every", "train.eval_every", "train.picture_every",
                    "train.checkpoint_every", "train.eval_images", "sample.gmm_components", "sample.fit_gmm",
                    "sample.sampler", "sample.temperature", "train.compile", "train.precision"}
N_FIXED = 10  # fixed test inputs (and codes per row) in the monitoring picture
# A write to the run directory that fails with one of these is the user's to fix (space, permissions), not a bug.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class TrainingInterrupted(VaedrawError):
    """SIGINT/SIGTERM arrived: a checkpoint was saved; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(VaedrawError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


# ----------------------------------------------------------------------------- batches
class Batcher:
    """Draw the batch for global step s by index from device-resident data.

    images: uint8 [N, 28, 28] on the device; labels: int64 [N]. Each epoch is a permutation seeded by
    (seed, epoch); step s takes slice s mod (N // B) of it (the last partial batch is dropped). With
    `world` processes, rank r takes its contiguous share of every global batch.
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
        """-> x float [B, 1, 28, 28] in [0, 1], y int64 [B]."""
        idx = self.indices(step)
        return self.images[idx].unsqueeze(1).float().div_(255), self.labels[idx]


def learning_rate(step: int, cfg: RunConfig) -> float:
    """constant, or cosine from lr down to lr_min_ratio * lr at the last step."""
    t = cfg.train
    if t.lr_schedule == "constant":
        return t.lr
    frac = min(step / max(1, t.steps), 1.0)
    return t.lr * (t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model, cfg: RunConfig, device: torch.device) -> torch.optim.Adam:
    """The plain optimizer of `train_step` (the training loop uses fastpath.make_optimizer)."""
    t = cfg.train
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **fast)


def train_step(model, opt, x, y, cfg: RunConfig) -> torch.Tensor:
    """One plain eager optimizer step on a batch; returns [loss, recon, kl] detached (no host sync).

    The straightforward reference (benchmarks/speed.py measures the fast path against it); the training
    loop runs fastpath.FastStep.
    """
    if cfg.data.binarize == "dynamic":
        x = torch.bernoulli(x)
    logits, mu, logvar, _ = model(x, y if model.n_classes else None)
    loss, recon, kl = vae_loss(x, logits.float(), mu.float(), logvar.float(), cfg.model.likelihood)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([loss, recon, kl]).detach()


# ----------------------------------------------------------------------------- run directory
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].to(torch.uint8).cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu(), device)


def prepare_run_dir(out: Path, cfg: RunConfig, resume: bool, keep: str | None,
                    overrides_given: bool) -> tuple[RunConfig, ckpt_io.Checkpoint | None]:
    """Check the run directory and settle the config. Returns (config to use, checkpoint to resume or None).

    Never overwrites another run silently: a directory that already holds a run needs --resume, and any
    other non-empty directory is refused. On resume, a requested config that differs from the stored one
    (beyond RESUME_FREE_KEYS) is refused unless `keep` says which to use ('stored' or 'new').
    """
    ckpt_path = out / ckpt_io.CHECKPOINT_NAME
    has_run = ckpt_path.exists() or (out / "config.json").exists()
    if not resume:
        if has_run and not ckpt_path.exists():  # stopped before its first checkpoint: nothing to continue
            raise VaedrawError(f"{out} holds a run that stopped before its first checkpoint; delete it or choose "
                               "another --out")
        if has_run:
            raise VaedrawError(f"{out} already holds a run; continue it with --resume, or choose another --out")
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise VaedrawError(f"{out} exists and is not empty; choose a new or empty --out directory")
        return cfg, None
    if not ckpt_path.exists():
        hint = ("it stopped before its first checkpoint: delete it or choose another --out" if has_run
                else "start a new run without --resume")
        raise VaedrawError(f"--resume: {out} holds no checkpoint to resume; {hint}")
    ckpt = ckpt_io.load(ckpt_path)
    ckpt_io.model_from_checkpoint(ckpt, ckpt_path)  # tampered config or weights: refused here, not mid-load
    stored = ckpt.config
    if not overrides_given:
        return stored, ckpt
    changed = {k: v for k, v in diff(stored, cfg).items() if k not in RESUME_FREE_KEYS}
    if changed and keep is None:
        lines = ", ".join(f"{k}: stored {a!r} vs requested {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume: the requested config disagrees with the stored one ({lines}); "
                          "pass --keep stored to continue as stored, or --keep new to use the requested values")
    if keep == "stored":
        for k in RESUME_FREE_KEYS:  # still honour harmless changes such as a longer run
            section, name = k.split(".")
            setattr(getattr(stored, section), name, getattr(getattr(cfg, section), name))
        return stored, ckpt
    network_keys = [k for k in changed if k.startswith("model.")]
    if keep == "new" and network_keys:
        from dataclasses import replace

        try:  # the stored weights must fit the requested network (dropout may change, sizes may not)
            ckpt_io.model_from_checkpoint(replace(ckpt, config=cfg), ckpt_path)
        except VaedrawError:
            raise ConfigError(f"--resume --keep new: the stored weights do not fit the requested network "
                              f"({', '.join(network_keys)} changed); start a new run in another --out") from None
    return cfg, ckpt


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag checked after each step, so the loop can save and exit cleanly."""
    received: list[int] = []

    def handler(signum, frame):
        if received:  # a second Ctrl-C while saving: leave immediately; the old checkpoint is intact
            raise KeyboardInterrupt
        received.append(signum)

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint's step (they will be written again)."""
    rows = [r for r in plots.read_metrics(path) if r.get("step", 0) <= step]
    ckpt_io.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- the loop
@dataclass
class Monitor:
    """Fixed test inputs and fixed codes, decoded at every picture step so pictures compare across time."""

    x: torch.Tensor  # [N_FIXED, 1, 28, 28]
    y: torch.Tensor  # [N_FIXED]
    z: torch.Tensor  # [3 * N_FIXED, D]
    zy: torch.Tensor | None  # labels for the fixed codes (conditional runs): 0..9 per row

    @torch.no_grad()
    def picture(self, model) -> torch.Tensor:
        was = model.training
        model.eval()
        mu, _ = model.encode(self.x, self.y if model.n_classes else None)
        rec = decode_means(model, mu, self.y if model.n_classes else None).to(self.x.device)
        gen = decode_means(model, self.z, self.zy).to(self.x.device)
        model.train(was)
        return torch.cat([self.x.float(), rec, gen]).cpu()


def train(cfg: RunConfig, out: str | Path, *, device: str = "auto", data_dir: str | Path | None = None,
          resume: bool = False, keep: str | None = None, overrides_given: bool = True, progress: bool = True,
          epochs: float | None = None, argv: list[str] | None = None) -> Path:
    """Train a VAE per `cfg` into the run directory `out` and return it. See the module docstring.

    `epochs`, if given, sets cfg.train.steps to ceil(epochs * training images / batch size). Under torchrun
    every process calls this; rank 0 alone writes `out`.
    """
    out = Path(out)
    ctx = dist_mod.setup(resolve_device(device))
    try:
        return _train(cfg, out, ctx, data_dir, resume, keep, overrides_given, progress, epochs, argv)
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise VaedrawError(f"cannot write to the run directory {out}: {e.strerror}{where}; free some space or fix "
                           f"its permissions, then continue with `vaedraw train --out {out} --resume` (the last "
                           "checkpoint written there is intact)") from e
    finally:
        dist_mod.teardown(ctx)


def _train(cfg: RunConfig, out: Path, ctx: dist_mod.Context, data_dir, resume: bool, keep: str | None,
           overrides_given: bool, progress: bool, epochs: float | None, argv: list[str] | None) -> Path:
    cfg, ckpt = prepare_run_dir(out, cfg, resume, keep, overrides_given)
    dist_mod.barrier(ctx)  # every process has read the directory before rank 0 writes to it
    dev, main = ctx.device, ctx.is_main
    t = cfg.train
    plan = fastpath.choose_plan(t, cfg.model.arch, dev, distributed=ctx.enabled)

    train_split, test_split = data_mod.load_dataset(cfg.data.dataset, data_dir, progress=progress and main)
    if epochs is not None:
        t.steps = math.ceil(epochs * len(train_split) / t.batch_size)
    images, labels = train_split.images.to(dev), train_split.labels.to(dev)
    n_eval = min(t.eval_images, len(test_split))
    x_test = eval_inputs(test_split.images[:n_eval], cfg.model.likelihood == "bernoulli").to(dev)
    y_test = test_split.labels[:n_eval].to(dev)

    torch.manual_seed(t.seed)
    noise = fastpath.Noise(ctx.rank, ctx.world)
    model = fastpath.prepare_model(build_model(cfg.model).to(dev), plan, noise)
    opt = fastpath.make_optimizer(model, cfg, dev, plan)
    start = 0
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        fresh = fastpath.make_optimizer(model, cfg, dev, plan)
        opt.load_state_dict(ckpt.optim_state)
        fastpath.restore_optimizer_flags(opt, fresh)
        _set_rng_state(ckpt.rng, dev)
        start = ckpt.step
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (*out.glob(".*.tmp"), *out.glob("pictures/.*.tmp")):  # a process killed mid-write left it
            stale.unlink(missing_ok=True)
        if ckpt is not None:
            _truncate_metrics(metrics_path, start)
        ckpt_io.atomic_write_text(out / "config.json", cfg.to_json() + "\n")
        with open(out / "command.txt", "a") as f:
            f.write(shlex.join(argv if argv is not None else sys.argv) + "\n")
        (out / "pictures").mkdir(exist_ok=True)

    batcher = Batcher(images, labels, t.batch_size, t.seed, ctx.rank, ctx.world)
    step_fn = fastpath.FastStep(model, opt, cfg, plan, noise, ddp=ctx.enabled)
    g_fixed = torch.Generator().manual_seed(t.seed + 1)
    zy = torch.arange(10).repeat(3) if cfg.model.n_classes else None
    monitor = Monitor(
        x=eval_inputs(test_split.images[:N_FIXED], False).to(dev), y=test_split.labels[:N_FIXED].to(dev),
        z=torch.randn(3 * N_FIXED, cfg.model.latent_dim, generator=g_fixed), zy=zy,
    )

    saved_step = start if ckpt is not None else None  # the step the checkpoint on disk holds

    def diverged(step: int, what: str) -> TrainingDiverged:
        path = out / ckpt_io.CHECKPOINT_NAME
        if saved_step is None:
            kept = f"no checkpoint had been saved yet: delete {out} or choose another --out, and start again"
        else:
            kept = (f"stopped without saving, so {path} still holds the last good state (step {saved_step}); "
                    f"continue from it with `vaedraw train --out {out} --resume --keep new --lr SMALLER`")
        return TrainingDiverged(f"{what} near step {step}; {kept}. Likely causes: a learning rate too high for "
                                "this model (try a smaller --lr), or bad input data")

    def save_checkpoint(step: int, metrics: dict) -> None:
        nonlocal saved_step
        # The loss is checked at log points only: never let a non-finite state since then replace the
        # last good checkpoint. Weights can be finite yet overflow the forward pass (after a huge step),
        # so the loss of a few fixed test images is checked too (one host sync per checkpoint).
        finite = torch.stack([torch.isfinite(window).all(), *(torch.isfinite(p).all() for p in model.parameters())])
        probe = test_loss(model, x_test[:N_FIXED], y_test[:N_FIXED], cfg.model.likelihood)["loss"]
        if not (bool(finite.all()) and math.isfinite(probe)):
            raise diverged(step, "the training loss or the weights became non-finite")
        path = out / ckpt_io.CHECKPOINT_NAME
        try:
            ckpt_io.save(path, ckpt_io.Checkpoint(
                config=cfg, model_state=model.state_dict(), step=step,
                optim_state=fastpath.optimizer_state_for_saving(opt), rng=_rng_state(dev), metrics=metrics))
        except SafetensorError as e:  # safetensors reports its own write failures (a full disk) this way
            kept = "no checkpoint had been saved yet" if saved_step is None else \
                f"the checkpoint of step {saved_step} is intact"
            raise VaedrawError(f"could not write {path} ({e}); {kept}: free some space or fix the folder's "
                               f"permissions, then continue with `vaedraw train --out {out} --resume`") from None
        saved_step = step

    def log(row: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    if main:
        procs = f", {ctx.world} processes" if ctx.enabled else ""
        print(f"vaedraw: training preset {cfg.preset!r} ({count_parameters(model):,} parameters) on "
              f"{train_split.name} ({len(train_split):,} images), device {dev}{procs}, steps {start}->{t.steps}",
              file=sys.stderr)
        fastpath.announce(plan, dev)
    last_metrics: dict = dict(ckpt.metrics) if ckpt else {}
    model.train()
    window = torch.zeros(3, device=dev)
    window_steps, window_t0 = 0, time.perf_counter()
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and main), unit="step", dynamic_ncols=True,
               file=sys.stderr)
    step = start
    with _stop_on_signals() as signals:
        try:
            while step < t.steps:
                x, y = batcher.batch(step)
                window += step_fn(x, y, learning_rate(step, cfg))
                window_steps += 1
                step += 1
                bar.update(1)
                at_log = step % t.log_every == 0 or step == t.steps
                if at_log:
                    # the only regular host sync (and, with several processes, the only extra collective)
                    loss, recon, kl = dist_mod.all_mean(window / window_steps, ctx).tolist()
                    now = time.perf_counter()
                    ips = window_steps * t.batch_size / (now - window_t0)
                    if not all(math.isfinite(v) for v in (loss, recon, kl)):
                        raise diverged(step, f"the training loss became {loss}")
                    row = {"step": step, "split": "train", "loss": loss, "recon": recon, "kl": kl,
                           "lr": learning_rate(step - 1, cfg), "images_per_s": ips}
                    if main:
                        log(row)
                        bar.set_postfix(loss=f"{loss:.2f}", recon=f"{recon:.2f}", kl=f"{kl:.2f}", img_s=f"{ips:.0f}")
                    window.zero_()
                    window_steps, window_t0 = 0, time.perf_counter()
                    last_metrics["train"] = row
                if main and (step % t.eval_every == 0 or step == t.steps):
                    ev = test_loss(model, x_test, y_test, cfg.model.likelihood)
                    row = {"step": step, "split": "test", **ev}
                    log(row)
                    last_metrics["test"] = row
                    bar.write(f"step {step}: test loss {ev['loss']:.3f} (recon {ev['recon']:.3f}, kl {ev['kl']:.3f})")
                if main and (step % t.picture_every == 0 or step == t.steps):
                    plots.save_grid(monitor.picture(model), out / "pictures" / f"step_{step:07d}.png", nrow=N_FIXED)
                if main and (step % t.checkpoint_every == 0 or step == t.steps):
                    save_checkpoint(step, last_metrics)
                # one process alone may have been signalled: with several, agree at log points only (a
                # collective per step would cost a host sync per step)
                stop = bool(signals) if not ctx.enabled else (at_log and dist_mod.any_flag(bool(signals), ctx, dev))
                if stop:
                    if main:
                        save_checkpoint(step, last_metrics)
                    name = signal.Signals(signals[0]).name if signals else "SIGTERM"
                    raise TrainingInterrupted(
                        f"{name} received: saved a checkpoint at step {step}; continue with "
                        f"`vaedraw train --out {out} --resume`", 128 + (signals[0] if signals else signal.SIGTERM))
        finally:
            bar.close()

    # No barrier after this: rank 0's mixture fit can outlast a collective's timeout, and torchrun waits for
    # every process anyway.
    if main:
        finish_run(out, model, cfg, train_split, dev)
    return out


def finish_run(out: Path, model, cfg: RunConfig, train_split, dev: torch.device) -> None:
    """End-of-training artifacts: curves, the progress GIF, the gmm sampler, a sample grid."""
    from PIL import Image

    plots.plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"{cfg.preset} on {cfg.data.dataset}")
    frames = [Image.open(p).convert("L") for p in sorted((out / "pictures").glob("step_*.png"))]
    if frames:
        plots.save_gif(frames, out / "progress.gif")
    model.eval()
    if cfg.sample.fit_gmm:
        fit_gmm(model, train_split.images, train_split.labels if cfg.model.n_classes else None,
                cfg.sample.gmm_components, cfg.train.seed, out / GMM_NAME)
    from .run import load_run

    run = load_run(out, device=str(dev))
    n = 100
    y = torch.arange(10).repeat_interleave(10) if run.conditional else None
    plots.save_grid(run.sample(n, seed=0, y=y), out / "samples.png", nrow=10)
