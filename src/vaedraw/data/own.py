"""What the user's own data sets (a folder of images, an array file) share: the held-out test split, the
memory check, the digest of the decoded pixels, the Split and its provenance, and reloading what a run
recorded.

Without a given test split, a fixed one is held out: `n_test = min(10,000, max(1, N // 10))`
images, chosen by `numpy.random.default_rng(0).permutation(N)[:n_test]` over the images in their
defined order (sorted file names; an array's own order); both splits keep that order.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch

from vaedraw.data.pixels import Options
from vaedraw.data.spec import Split
from vaedraw.errors import DataError

TEST_DIVISOR, TEST_CAP, SPLIT_SEED = 10, 10_000, 0  # a tenth, at most 10,000, seed 0
MEMORY_SHARE = 0.5  # of the available memory: the images must leave room for training itself
MAX_CLASSES = 10_000  # model.n_classes' bound

_noted: set[str] = set()


def note(text: str) -> None:
    """One line on stderr, once per process (train and test loads share it)."""
    if text not in _noted:
        _noted.add(text)
        print(f"vaedraw: note: {text}", file=sys.stderr)


def held_out(n: int, where: str) -> np.ndarray:
    """bool [n], True for the images of the fixed held-out test split (module docstring)."""
    if n < 2:
        raise DataError(f"{where}: holds {n} usable image(s); a data set needs at least 2 (one to train on, "
                        "one to test on). Add images.")
    n_test = min(TEST_CAP, max(1, n // TEST_DIVISOR))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(SPLIT_SEED).permutation(n)[:n_test]] = True
    return mask


def available_memory() -> int:
    """Bytes the system can give without swapping: MemAvailable of /proc/meminfo, else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_fits(n: int, shape: tuple[int, int, int], where: str) -> None:
    """Refuse, before decoding, a data set whose uint8 pixels (n * C * H * W bytes) would not fit in memory."""
    c, h, w = shape
    need, avail = n * c * h * w, available_memory()
    if need <= MEMORY_SHARE * avail:
        return
    smaller = [s for s in (256, 128, 64, 32, 16) if s < max(h, w) and n * c * s * s <= MEMORY_SHARE * avail]
    fix = (f"set a smaller data.image_size (--set data.image_size={smaller[0]}: {_gb(n * c * smaller[0] ** 2)})"
           if smaller else "train on fewer images")
    if c == 3:
        fix += ", or data.channels=1 for grey (a third of it)"
    raise DataError(f"{where}: {n:,} images of {c}x{h}x{w} would take {_gb(need)} in memory, more than half of the "
                    f"{_gb(avail)} available; {fix}.")


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the uint8 pixels and the int64 labels: what a run records to know its data again."""
    h = hashlib.sha256()
    h.update(repr((images.shape, labels.shape)).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return h.hexdigest()


def image_shape(images: np.ndarray) -> tuple[int, int, int]:
    """uint8 [N, H, W] -> (1, H, W); [N, H, W, 3] -> (3, H, W)."""
    return (1, *images.shape[1:3]) if images.ndim == 3 else (images.shape[3], *images.shape[1:3])


def make_split(images: np.ndarray, labels: np.ndarray, n_classes: int, split: str, base: dict,
               pixels_digest: str | None = None) -> Split:
    """A Split of uint8 images [N, H, W(, 3)] and int64 labels [N], with the provenance `base` completed:
    split, files ({"pixels": sha256 of pixels and labels}), n_images, shape, n_classes, subset False."""
    shape = image_shape(images)
    prov = {**base, "split": split, "files": {"pixels": pixels_digest or digest(images, labels)},
            "n_images": int(len(images)), "shape": list(shape), "n_classes": n_classes, "subset": False,
            "pillow": PIL.__version__}
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                 f"{base['dataset']}/{split}", shape, n_classes, prov)


def describe(prov: dict) -> str:
    what = "the images in" if prov.get("source") == "folder" else "the array file"
    return f"{what} {prov.get('path')}"


def load_recorded(prov: dict, split: str, data_dir: str | Path | None, progress: bool,
                  load: Callable[..., Split]) -> Split:
    """The split a run recorded (`prov`), read again from its recorded path (or `data_dir`) with the recorded
    conversion; a DataError when it is gone or its decoded pixels differ (another digest)."""
    where = data_dir if data_dir is not None else prov.get("path")
    needs = f"this run was trained on {describe(prov)}"
    options = Options.of(prov.get("options"))
    try:
        got = load(prov["dataset"], split, where, options=options, progress=progress)
    except DataError as e:
        fix = "restore it, or pass --data-dir with a copy of it" if data_dir is None else "pass the original data"
        raise DataError(f"{needs}, which cannot be read now ({e}); {fix}.") from None
    if got.provenance["files"] == prov["files"]:
        return got
    was, now = prov.get("pillow"), got.provenance.get("pillow")
    why = f" (decoded with Pillow {was} then and {now} now, which may resize differently)" if was != now else ""
    then = prov.get("n_images")
    then = f"{then:,}" if isinstance(then, int) else "?"
    raise DataError(f"{where} holds other {split} images than the run was trained on: {len(got):,} images with "
                    f"digest {got.provenance['files']['pixels'][:12]} now, {then} with digest "
                    f"{str(prov['files'].get('pixels', '?'))[:12]} then{why}; {needs}: restore those images"
                    + (", or pass --data-dir with a copy of them." if data_dir is None else "."))


def _reset_state() -> None:
    _noted.clear()
