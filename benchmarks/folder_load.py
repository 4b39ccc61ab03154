"""How long `--dataset folder` takes to load N small PNGs: cold (decoding every file) and warm (the cache).

    python benchmarks/folder_load.py [--n 60000] [--data-dir MNIST_DIR] [--image-size 0]

Writes N MNIST digits (the official training files from --data-dir, else the bundled 9,000-digit subset,
repeated) as 28x28 grey PNGs into DIR/<label>/NNNNN.png in a temporary folder, then loads the folder
twice through `vaedraw.data.load_dataset("folder", DIR)` with an empty cache: cold (listing, decoding
in a pool of processes, the held-out split, writing the cache) and warm (a fresh process state: listing,
reading the cache). It checks that both give the same pixels, and prints the figures with the CPU model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

from PIL import Image  # noqa: E402

from vaedraw import data  # noqa: E402
from vaedraw.data import images as images_mod  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60_000, help="PNG files to write and load")
    ap.add_argument("--data-dir", help="folder with the MNIST IDX files (default: the bundled subset)")
    ap.add_argument("--image-size", type=int, default=0, help="data.image_size for the loads (0: their own 28)")
    args = ap.parse_args()

    src = data.load_split("mnist", "train", args.data_dir, download=False, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        os.environ["VAEDRAW_CACHE_DIR"] = str(cache)
        t0 = time.perf_counter()
        for label in range(10):
            (root / str(label)).mkdir(parents=True)
        pixels, labels = src.images.numpy(), src.labels.numpy()
        for i in range(args.n):
            j = i % len(pixels)
            Image.fromarray(pixels[j]).save(root / str(labels[j]) / f"{i:05d}.png")
        written = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in root.rglob("*.png"))

        options = {"image_size": args.image_size, "channels": 0}
        t0 = time.perf_counter()
        cold = data.load_dataset("folder", root, progress=False, options=options)
        t_cold = time.perf_counter() - t0
        data._reset_state()  # as a new process: only the cache on disk is left
        t0 = time.perf_counter()
        warm = data.load_dataset("folder", root, progress=False, options=options)
        t_warm = time.perf_counter() - t0
        assert all(a.images.equal(b.images) and a.labels.equal(b.labels) for a, b in zip(cold, warm))
        cached = sum(p.stat().st_size for p in cache.rglob("*.npz"))

    workers = images_mod._workers() if args.n >= images_mod.POOL_MIN_FILES else 1
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, {workers} decoding process(es)")
    print(f"wrote {args.n:,} PNGs ({size / 1e6:.1f} MB) from {src.name} in {written:.1f} s")
    print(f"cold load: {t_cold:.2f} s ({args.n / t_cold:,.0f} files/s): train {len(cold[0]):,} + test "
          f"{len(cold[1]):,} images of {cold[0].shape}")
    print(f"warm load: {t_warm:.2f} s (cache {cached / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
