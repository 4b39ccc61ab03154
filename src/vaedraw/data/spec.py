"""What a data set and a loaded split are, and the one conversion of their pixels for a model."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLITS: tuple[str, ...] = ("train", "test")
# "folder": a --data-dir folder (IDX files, or the images of --dataset folder); "array": --dataset array's file.
SOURCES: tuple[str, ...] = ("folder", "cache", "download", "bundled", "system", "generated", "array")
# How pixels become training targets: dynamic (x ~ Bernoulli(pixel), resampled every batch) | none (as they are).
BINARIZE: tuple[str, ...] = ("dynamic", "none")


@dataclass(frozen=True)
class Split:
    """One split of a data set. Tensors are shared with the in-process memo: treat them as read-only.

    `provenance` = {"dataset", "split", "source" (one of SOURCES), "path" (the folder, or None),
    "files" ({file name: md5 of the file as stored}), "subset" (True for the bundled MNIST subset)}.
    The user's own data (own.py) record {"pixels": sha256 of the decoded images and labels} as "files",
    and also "options" (the conversion), "shape", "n_classes", "n_images", "classes", "layout", "pillow".
    """

    images: torch.Tensor  # uint8 [N, H, W] (grey) or [N, H, W, C] (colour), CPU
    labels: torch.Tensor  # int64 [N], CPU (zeros for an unlabelled data set)
    name: str  # "mnist/train", "mnist-subset/test", ...
    shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one image as the model sees it
    n_classes: int = 10  # 0 = unlabelled
    provenance: dict = field(default_factory=dict, compare=False, hash=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


Loader = Callable[..., Split]  # loader(split, data_dir, *, download: bool, progress: bool) -> Split


@dataclass(frozen=True)
class DatasetSpec:
    """A data set the library can train on: what its images are and how to get them.

    `shape` and `n_classes` are None for data known only once loaded (the user's own images, `own_data`):
    the loaded Split says them. Such a loader also takes `options` (`pixels.Options`: data.image_size,
    data.channels) and needs `data_dir`, the folder or file the user names.
    """

    name: str
    shape: tuple[int, int, int] | None  # (C, H, W); None: from the data (Split.shape)
    n_classes: int | None  # 0 = unlabelled; None: from the data (Split.n_classes)
    loader: Loader
    likelihood: str = "bernoulli"  # the decoder's default pixel model for this data
    binarize: str = "dynamic"  # dynamic (x ~ Bernoulli(pixel) per batch, for MNIST-like data) | none
    description: str = ""
    # reload(provenance, split, progress) -> Split, or a reason it cannot: the split from where a run found it.
    # None: the loader is called again (data that is generated, or found in one place only).
    reload: Callable[[dict, str, bool], Split | str] | None = None
    own_data: bool = False  # the user's files named by --data-dir, converted by `options`, reloaded by digest


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] (grey) or [B, H, W, C] (colour) -> float32 [B, C, H, W] in [0, 1], on the same device.

    The one pixel conversion: everything that feeds images to a model goes through it.
    """
    x = images.float().div_(255)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def default_cache_dir() -> Path:
    """$VAEDRAW_CACHE_DIR, else $XDG_CACHE_HOME/vaedraw, else ~/.cache/vaedraw."""
    if os.environ.get("VAEDRAW_CACHE_DIR"):
        return Path(os.environ["VAEDRAW_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vaedraw"
    return Path.home() / ".cache" / "vaedraw"
