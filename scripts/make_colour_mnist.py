"""Build Colour MNIST: 32x32 RGB digits on coloured backgrounds, labels kept, as an .npz array file.

    python scripts/make_colour_mnist.py --out colour-mnist.npz [--mnist-dir D | --subset]
                                        [--n-train N] [--n-test N] [--seed 0]

Each 28x28 MNIST digit becomes a 32x32 colour image (`colour_digits`): the digit's ink gets a random
hue (saturation and value 0.75..1), the background another one, at least a quarter of the hue circle
away (saturation 0.4..1, value 0.15..0.5), the digit placed at a random offset of 0..4 pixels in each
direction; a pixel is ink * (v / 255) + background * (1 - v / 255) for MNIST's grey level v. Every choice
comes from numpy's default_rng seeded with (seed, split), so the same arguments give the same bytes.
The file holds x_train, y_train, x_test, y_test (uint8 [N, 32, 32, 3] and [N]), which
`vaedraw train --dataset array --data-dir colour-mnist.npz` reads as it is (docs/DATA.md).

Source: `--mnist-dir` (the four official IDX files: 60,000 + 10,000 digits), `--subset` (the bundled
9,000 + 1,000; its test digits are official training images), else wherever vaedraw finds MNIST.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SIZE = 32  # side of the colour images
SPLIT_SEEDS = {"train": 0, "test": 1}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised colorsys.hsv_to_rgb: arrays [N] in [0, 1] -> float [N, 3] in [0, 1]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(len(h))]


def colour_digits(images: np.ndarray, seed: int, size: int = SIZE) -> np.ndarray:
    """uint8 grey digits [N, h, w] (h, w <= size) -> uint8 colour images [N, size, size, 3] (module docstring)."""
    n, h, w = images.shape
    if h > size or w > size:
        raise ValueError(f"digits of {h}x{w} do not fit in {size}x{size}")
    rng = np.random.default_rng(seed)
    hue = rng.random(n)
    ink = _hsv_to_rgb(hue, rng.uniform(0.75, 1, n), rng.uniform(0.75, 1, n))  # [N, 3]
    ground = _hsv_to_rgb((hue + rng.uniform(0.25, 0.75, n)) % 1, rng.uniform(0.4, 1, n), rng.uniform(0.15, 0.5, n))
    dy, dx = rng.integers(0, size - h + 1, n), rng.integers(0, size - w + 1, n)
    alpha = np.zeros((n, size, size), dtype=np.float32)
    for k in range(n):
        alpha[k, dy[k]:dy[k] + h, dx[k]:dx[k] + w] = images[k] / 255.0
    out = alpha[..., None] * ink[:, None, None, :] + (1 - alpha[..., None]) * ground[:, None, None, :]
    return np.round(out * 255).clip(0, 255).astype(np.uint8)


def build(train_images, train_labels, test_images, test_labels, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of the .npz: x_train, y_train, x_test, y_test (uint8), each split coloured with its own seed."""
    return {"x_train": colour_digits(np.asarray(train_images), seed * 2 + SPLIT_SEEDS["train"]),
            "y_train": np.asarray(train_labels).astype(np.uint8),
            "x_test": colour_digits(np.asarray(test_images), seed * 2 + SPLIT_SEEDS["test"]),
            "y_test": np.asarray(test_labels).astype(np.uint8)}


def load_mnist(mnist_dir: str | None, subset: bool):
    """(train, test) MNIST Splits from `mnist_dir`, the bundled subset, or wherever vaedraw finds them."""
    from vaedraw import data

    if subset:
        return data.mnist._bundled_split("train"), data.mnist._bundled_split("test")
    return data.load_dataset("mnist", mnist_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the .npz file to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mnist-dir", help="folder with the four official MNIST IDX files")
    src.add_argument("--subset", action="store_true", help="use the bundled 9,000 + 1,000-digit subset")
    p.add_argument("--n-train", type=int, help="first N training digits only (default: all)")
    p.add_argument("--n-test", type=int, help="first N test digits only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the colours and offsets")
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.suffix != ".npz":
        p.error(f"--out {out}: the file name must end in .npz")
    train, test = load_mnist(args.mnist_dir, args.subset)
    arrays = build(train.images[:args.n_train].numpy(), train.labels[:args.n_train].numpy(),
                   test.images[:args.n_test].numpy(), test.labels[:args.n_test].numpy(), args.seed)
    from vaedraw.checkpoint import atomic_write_bytes

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write_bytes(out, save)
    print(f"make_colour_mnist: {len(arrays['x_train']):,} + {len(arrays['x_test']):,} images of {SIZE}x{SIZE}x3 "
          f"from {train.name} and {test.name} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
