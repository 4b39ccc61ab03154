"""Experiment tracking: TensorBoard event files of a training run, in RUN_DIR/tensorboard/.

Training calls a few hooks on a `Tracker`; the no-op `Tracker` is used when `train.tensorboard` is off
and on every data-parallel rank but 0, so the loop never asks whether tracking is on.

What `TensorBoardTracker` writes (torch.utils.tensorboard.SummaryWriter, needing the `tensorboard`
package: `pip install 'vaedraw[tensorboard]'`):

    train/loss, train/recon, train/kl, train/lr, train/images_per_s   at every log point (metrics.jsonl rows)
    test/loss, test/recon, test/kl                                    at every held-out evaluation
    monitor (image)                                                   every monitoring picture: inputs,
                                                                      reconstructions, decodes of fixed codes
    samples (image), the hparams plugin's record                      at the end: the flattened config as
                                                                      hyperparameters, the last held-out and
                                                                      training terms as its metrics

A resumed run appends to the same folder; its writer purges the events after the checkpoint's step
(`purge_step`), as metrics.jsonl is cut back to the checkpoint, so the curves do not double.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import VaedrawError

TENSORBOARD_DIR = "tensorboard"  # inside the run directory
INSTALL_HINT = "pip install 'vaedraw[tensorboard]'"
# metrics.jsonl keys that are not figures
_NOT_SCALARS = {"step", "split"}


def require_tensorboard() -> None:
    """A VaedrawError naming the install command unless TensorBoard's writer can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError:
        raise VaedrawError(f"--tensorboard (train.tensorboard=true) needs the tensorboard package, which is not "
                           f"installed; install it with `{INSTALL_HINT}`, or train without it") from None


class Tracker:
    """The hooks training calls; this one does nothing (tracking off, or a rank that writes nothing)."""

    def log(self, row: dict) -> None:
        """A metrics.jsonl row: {"step", "split": "train" | "test", "loss", "recon", "kl", ...}."""

    def picture(self, step: int, x: torch.Tensor, nrow: int) -> None:
        """A monitoring picture: images [N, C, H, W] in [0, 1], `nrow` a row."""

    def finish(self, cfg, run_dir: Path) -> None:
        """The end of a completed run: the config and final figures."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Writes the events described in the module docstring into `log_dir`."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.last: dict[str, dict] = {}  # the latest row of each split, for the hparams record

    def log(self, row: dict) -> None:
        split, step = row["split"], int(row["step"])
        for key, value in row.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.last[split] = row

    def picture(self, step: int, x: torch.Tensor, nrow: int) -> None:
        from .plots import image_grid

        self.writer.add_image("monitor", _pixels(image_grid(x, nrow, scale=1)), step, dataformats="HWC")

    def finish(self, cfg, run_dir: Path) -> None:
        from PIL import Image

        from .config import flatten

        samples = Path(run_dir) / "samples.png"
        step = int(cfg.train.steps)
        if samples.exists():
            with Image.open(samples) as im:
                self.writer.add_image("samples", _pixels(im), step, dataformats="HWC")
        figures = {f"hparam/{split}_{key}": float(value) for split, row in self.last.items()
                   for key, value in row.items() if key in ("loss", "recon", "kl")}
        _write_hparams(self.writer, {k: _hparam(v) for k, v in flatten(cfg.to_dict()).items()}, figures, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(cfg, run_dir: Path, is_main: bool, resume_step: int | None) -> Tracker:
    """The tracker of this process: TensorBoard on rank 0 when train.tensorboard is on, else the no-op one.

    resume_step: the checkpoint's step on resume (events after it are purged), None for a new run."""
    if not (cfg.train.tensorboard and is_main):
        return Tracker()
    require_tensorboard()
    return TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR, None if resume_step is None else resume_step + 1)


def _pixels(im) -> np.ndarray:
    """A PIL picture as uint8 [H, W, C] (grey pictures get C = 1)."""
    a = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    return a[..., None] if a.ndim == 2 else a


def _hparam(value):
    """Values the hparams plugin takes: bool, int, float, str (None and lists as text)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _write_hparams(writer, hparams: dict, figures: dict[str, float], step: int) -> None:
    """The hparams plugin's record into the writer's own event file (SummaryWriter.add_hparams would
    start another run folder), with its metrics as scalars beside it."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    experiment, start, end = hparams_summary(hparams, figures)
    file_writer = writer.file_writer
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)
    for tag, value in figures.items():
        writer.add_scalar(tag, value, step)
