"""An array file of the user's images as a data set (`--dataset array --data-dir FILE`).

- `.npy`: one uint8 array of images, unlabelled;
- `.npz`: the images under `x`, `images` or `x_train`; optional labels under `y`, `labels` or `y_train`;
  optional given test split `x_test` (with `y_test` when the training images are labelled). Keras'
  `mnist.npz` (x_train, y_train, x_test, y_test) is read as it is.

Images are uint8 [N, H, W] or [N, H, W, C] with C = 1 (grey), 3 (RGB) or 4 (RGBA, composited on black);
labels are integers 0..K-1, [N] or [N, 1]. Without a given test split one is held out (`own.held_out`),
the images keeping their order. Pixels are converted like a folder's (`pixels.convert_batch`). Labels of
one value only are read as unlabelled (a note says so). The headers are checked before anything is read:
a wrong dtype, a wrong rank, channels first or labels of the wrong length are errors naming the file
and the key; pickled (object) arrays are never loaded.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from vaedraw.data import own
from vaedraw.data.pixels import Options, convert_batch
from vaedraw.data.spec import Split
from vaedraw.errors import DataError

IMAGE_KEYS, LABEL_KEYS = ("x", "images", "x_train"), ("y", "labels", "y_train")
TEST_KEYS = ("x_test", "y_test")

_memo: dict[tuple, tuple[Split, Split]] = {}  # (file, size, mtime, options) -> (train, test)


def _path(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise DataError("--dataset array needs --data-dir FILE: an .npz or .npy file of uint8 images.")
    path = Path(os.path.abspath(Path(data_dir).expanduser()))
    if path.is_dir():
        raise DataError(f"{path} is a folder; --dataset array reads an .npz or .npy file (for a folder of images "
                        "use --dataset folder).")
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass --data-dir an .npz or .npy file.")
    if path.suffix.lower() not in (".npz", ".npy"):
        raise DataError(f"{path}: expected an .npz or .npy file (numpy.savez / numpy.save).")
    return path


def _header(fp) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fp)
    return tuple(shape), dtype


class _File:
    """The arrays of one .npy or .npz file: headers first, contents on demand (never pickles)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix.lower() == ".npy":
                with open(path, "rb") as f:
                    self.headers = {"x": _header(f)}
            else:
                with zipfile.ZipFile(path) as z:
                    self.headers = {}
                    for name in z.namelist():
                        if name.endswith(".npy"):
                            with z.open(name) as f:
                                self.headers[name[:-4]] = _header(f)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{path}: not a readable {path.suffix} file ({e}); write it with numpy.save or "
                            "numpy.savez.") from None

    def key(self, keys: tuple[str, ...], what: str, required: bool) -> str | None:
        found = [k for k in keys if k in self.headers]
        if len(found) > 1:
            raise DataError(f"{self.path}: holds {' and '.join(found)}; keep one array of {what}.")
        if not found and required:
            raise DataError(f"{self.path}: no array of {what}: name it {', '.join(keys)} (it holds: "
                            f"{', '.join(self.headers) or 'nothing'}).")
        return found[0] if found else None

    def load(self, key: str) -> np.ndarray:
        try:
            if self.path.suffix.lower() == ".npy":
                return np.load(self.path, allow_pickle=False)
            with np.load(self.path, allow_pickle=False) as f:
                return f[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{self.path}: cannot read {key} ({e}); write the file again.") from None


def _check_images(f: _File, key: str) -> tuple[int, ...]:
    shape, dtype = f.headers[key]
    where = f"{f.path}: {key}"
    if dtype != np.uint8:
        fix = " (from floats in [0, 1]: (x * 255).round().astype(numpy.uint8))" if dtype.kind == "f" else ""
        raise DataError(f"{where} is {dtype}; vaedraw takes uint8 pixels 0..255{fix}.")
    if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        raise DataError(f"{where} is {shape}, channels first; save it as (N, H, W, C): x.transpose(0, 2, 3, 1).")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)) or min(shape) < 1:
        raise DataError(f"{where} has shape {shape}; expected images (N, H, W) or (N, H, W, C) with C = 1, 3 or 4.")
    return shape


def _check_labels(f: _File, key: str, n: int, images_key: str) -> None:
    shape, dtype = f.headers[key]
    where = f"{f.path}: {key}"
    if dtype.kind not in "iu":
        raise DataError(f"{where} is {dtype}; labels must be integers 0..K-1.")
    if shape not in ((n,), (n, 1)):
        raise DataError(f"{where} has shape {shape}: {shape[0] if shape else 0:,} labels for the {n:,} images in "
                        f"{images_key}; give one label per image.")


def _labels(f: _File, key: str) -> np.ndarray:
    y = f.load(key).reshape(-1).astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= own.MAX_CLASSES):
        bad = int(y.min() if y.min() < 0 else y.max())
        raise DataError(f"{f.path}: {key} holds the label {bad}; labels must be 0..K-1 (K at most "
                        f"{own.MAX_CLASSES:,}).")
    return y


def _read(path: Path, opts: Options) -> tuple[Split, Split]:
    f = _File(path)
    xk = f.key(IMAGE_KEYS, "images", required=True)
    yk = f.key(LABEL_KEYS, "labels", required=False)
    xt, yt = (k if k in f.headers else None for k in TEST_KEYS)
    if yt and not xt:
        raise DataError(f"{path}: holds y_test but no x_test; add the test images or drop y_test.")
    if xt and yk and not yt:
        raise DataError(f"{path}: x_test has no labels but the training images have ({yk}); add y_test.")
    if yt and not yk:
        raise DataError(f"{path}: y_test labels the test images but the training images have no labels; add "
                        f"{LABEL_KEYS[0]} (or drop y_test).")
    shapes = {k: _check_images(f, k) for k in (xk, xt) if k}
    for ik, lk in ((xk, yk), (xt, yt)):
        if lk:
            _check_labels(f, lk, shapes[ik][0], ik)
    if xt and shapes[xt][1:] != shapes[xk][1:]:
        raise DataError(f"{path}: x_test images are {shapes[xt][1:]}, {xk} images {shapes[xk][1:]}; store both "
                        "the same way.")
    n, (h, w) = sum(s[0] for s in shapes.values()), shapes[xk][1:3]
    c_in = shapes[xk][3] if len(shapes[xk]) == 4 else 1
    c_out = opts.channels or (1 if c_in == 1 else 3)
    side = (opts.image_size, opts.image_size) if opts.image_size else (h, w)
    own.check_fits(n, (max(c_in, c_out), *side), str(path))
    x = convert_batch(f.load(xk), opts)
    y = _labels(f, yk) if yk else np.zeros(len(x), np.int64)
    if xt:
        x_test = convert_batch(f.load(xt), opts)
        if x_test.ndim != x.ndim:  # data.channels=0 with one part grey and the other colour: colour
            x, x_test = (np.repeat(a[..., None], 3, axis=3) if a.ndim == 3 else a for a in (x, x_test))
        y_test = _labels(f, yt) if yt else np.zeros(len(x_test), np.int64)
    else:
        test = own.held_out(len(x), str(path))
        x, x_test, y, y_test = x[~test], x[test], y[~test], y[test]
    n_classes = int(max(y.max(), y_test.max())) + 1 if yk else 0
    if yk and len(np.unique(np.concatenate([y, y_test]))) < 2:
        own.note(f"{path}: {yk} holds one label only: the images are read as unlabelled (model.n_classes must "
                 "stay 0).")
        n_classes, y, y_test = 0, np.zeros_like(y), np.zeros_like(y_test)
    base = {"dataset": "array", "source": "array", "path": str(path), "options": opts.as_dict(), "classes": [],
            "layout": "x_test" if xt else "held out", "keys": [k for k in (xk, yk, xt, yt) if k]}
    return (own.make_split(x, y, n_classes, "train", base), own.make_split(x_test, y_test, n_classes, "test", base))


def load_array(split: str, data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True,
               options: object = None) -> Split:
    """The loader of `--dataset array`: split "train" or "test" of the array file `data_dir` (module docstring)."""
    path, opts = _path(data_dir), Options.of(options)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, opts)
    if key not in _memo:
        _memo.clear()
        _memo[key] = _read(path, opts)
    train, test = _memo[key]
    return train if split == "train" else test


def _reset_state() -> None:
    _memo.clear()
