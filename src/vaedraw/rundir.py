"""The run directory of one training run: what it holds, who may write it, and what a resume may change.

    config.json            the resolved RunConfig (the checkpoint holds it too)
    data.json              the data it was trained on: {"train": provenance, "test": provenance} (data.Split)
    command.txt            the command lines that trained it (one per start or resume)
    metrics.jsonl          one JSON object per log point: {"step", "split": "train"|"test", "loss", ...}
    checkpoint.safetensors weights, optimizer, RNG states, config, versions (checkpoint.py)
    plan.json              how the training step runs and why: the plan's switches, its source (static table,
                           cache, measured) and the timings behind it (autotune.py)
    pictures/step_*.png    the monitoring pictures; curves.png, progress.gif, samples.png, gmm.safetensors at the end

Reading comes first and writes nothing (`inspect`, `settle_config`); `prepare` writes the files above
only after everything the run needs has been checked, so a refused start leaves the directory as it
was. One trainer at a time: `lock` takes an exclusive flock on the directory itself, which the kernel
releases when the process ends however it ends (no lock file to clean up after a kill).
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import shlex
from dataclasses import replace
from pathlib import Path

from . import checkpoint as ckpt_io
from . import plots
from .config import RunConfig, diff
from .errors import CheckpointError, ConfigError, OutputError, RunLocked, VaedrawError
from .models import SEED_IMAGE_SHAPE
from .outputs import show
from .run import DATA_SOURCE_NAME, read_data_source

# Changing these on resume is harmless: they do not change the model or the optimization.
RESUME_FREE_KEYS = {"train.steps", "train.log_every", "train.eval_every", "train.picture_every",
                    "train.checkpoint_every", "train.eval_images", "sample.gmm_components", "sample.fit_gmm",
                    "sample.sampler", "sample.temperature", "train.compile", "train.precision",
                    "train.tensorboard", "train.autotune"}
# A write to the run directory that fails with one of these is the user's to fix (space, permissions), not a bug.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class RunDir:
    """One run directory: its files, its lock, its metrics log."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def checkpoint(self) -> Path:
        return self.path / ckpt_io.CHECKPOINT_NAME

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Hold the directory for this process (if it exists yet); RunLocked when another trainer holds it."""
        if self._lock_fd is not None or not self.path.is_dir():
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{show(self.path)} is being written by another `vaedraw train` (it holds the run's "
                            "lock); wait for it to finish or stop it, or choose another --out") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ reading (writes nothing)
    def inspect(self, resume: bool) -> ckpt_io.Checkpoint | None:
        """Check that the directory may be used as asked. -> the checkpoint to resume, or None for a new run.

        Never overwrites another run silently: a directory that already holds a run needs --resume, and any
        other non-empty directory is refused. A checkpoint is checked whole (header, shapes, finite weights).
        """
        out = self.path
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {show(out)} is a file, not a folder; choose a folder for the run")
        has_ckpt = self.checkpoint.exists()
        has_run = has_ckpt or (out / "config.json").exists()
        if not resume:
            if has_run and not has_ckpt:  # stopped before its first checkpoint: nothing to continue
                raise VaedrawError(f"{show(out)} holds a run that stopped before its first checkpoint; delete it or "
                                   "choose another --out")
            if has_run:
                raise VaedrawError(f"{show(out)} already holds a run; continue it with --resume, or choose another "
                                   "--out")
            if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
                raise VaedrawError(f"{show(out)} exists and is not empty; choose a new or empty --out directory")
            return None
        if not has_ckpt:
            hint = ("it stopped before its first checkpoint: delete it or choose another --out" if has_run
                    else "start a new run without --resume")
            raise VaedrawError(f"--resume: {show(out)} holds no checkpoint to resume; {hint}")
        ckpt = ckpt_io.load(self.checkpoint)
        ckpt_io.model_from_checkpoint(ckpt, self.checkpoint)  # tampered config or weights: refused here
        return ckpt

    def data_source(self) -> dict | None:
        """What data.json says the run was trained on (None for runs older than the record)."""
        return read_data_source(self.path)

    # ------------------------------------------------------------------ writing
    def prepare(self, cfg: RunConfig, data_source: dict, command: list[str], resume_step: int | None) -> None:
        """Create or refresh the directory's files at the start of training (after every check has passed)."""
        out = self.path
        out.mkdir(parents=True, exist_ok=True)
        self.lock()
        for stale in (*out.glob(".*.tmp"), *out.glob("pictures/.*.tmp")):  # a process killed mid-write left it
            stale.unlink(missing_ok=True)
        if resume_step is not None:
            self._truncate_metrics(resume_step)
        ckpt_io.atomic_write_text(out / "config.json", cfg.to_json() + "\n")
        ckpt_io.atomic_write_text(out / DATA_SOURCE_NAME, json.dumps(data_source, indent=1) + "\n")
        with open(out / "command.txt", "a") as f:
            f.write(shlex.join(command) + "\n")
        (out / "pictures").mkdir(exist_ok=True)

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    def write_plan(self, record: dict) -> None:
        """plan.json: the training plan of the latest start or resume (autotune.settle's record)."""
        ckpt_io.atomic_write_text(self.plan, json.dumps(record, indent=1, default=str) + "\n")

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint's step (they will be written again)."""
        rows = [r for r in plots.read_metrics(self.metrics) if r.get("step", 0) <= step]
        ckpt_io.atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))


def settle_config(ckpt: ckpt_io.Checkpoint, requested: RunConfig | None, changes: dict | None, keep: str | None,
                  path: Path) -> RunConfig:
    """The config a resumed run continues with.

    `requested` None: the stored config with `changes` applied (`--resume --steps N` asks for more steps,
    not for a preset's defaults). A requested config that differs from the stored one beyond
    RESUME_FREE_KEYS is refused unless `keep` says which to use ('stored' or 'new'); 'new' must still
    fit the stored weights (dropout may change, sizes may not).
    """
    from .config import apply_overrides

    stored = ckpt.config
    if requested is None:
        requested = apply_overrides(copy.deepcopy(stored), dict(changes or {}))
    changed = {k: v for k, v in diff(stored, requested).items() if k not in RESUME_FREE_KEYS}
    if changed and keep is None:
        lines = ", ".join(f"{k}: stored {a!r} vs requested {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume: the requested config disagrees with the stored one ({lines}); "
                          "pass --keep stored to continue as stored, or --keep new to use the requested values")
    if keep == "new":
        network_keys = [k for k in changed if k.startswith("model.")]
        if network_keys:
            try:
                ckpt_io.model_from_checkpoint(replace(ckpt, config=requested), path)
            except VaedrawError:
                raise ConfigError(f"--resume --keep new: the stored weights do not fit the requested network "
                                  f"({', '.join(network_keys)} changed); start a new run in another --out") from None
        return requested
    settled = copy.deepcopy(stored)
    for k in RESUME_FREE_KEYS:  # still honour harmless changes such as a longer run
        section, name = k.split(".")
        setattr(getattr(settled, section), name, getattr(getattr(requested, section), name))
    return settled


def check_checkpoint_fits(ckpt: ckpt_io.Checkpoint, image_shape, path: Path) -> None:
    """The data the run continues on must have the shape its network was built for."""
    stored = tuple(ckpt.image_shape or SEED_IMAGE_SHAPE)  # saved before shapes were recorded: 1x28x28
    if stored != tuple(image_shape):
        raise CheckpointError(f"{show(path)} holds a model for {stored} images but the data are {tuple(image_shape)}")
