"""Speed and agreement of the IWAE pass of `vaedraw eval`: float32 against the fast path, on a trained run.

    python benchmarks/eval_speed.py RUN_DIR [--n-images 500] [--k 1000] [--max-decodes N,...] [--data-dir DIR]

For each precision (fp32, then auto: bf16 autocast and channels-last where the CPU has native bf16) the
bound L_k of the first --n-images images of the run's test split is computed with the same seed, as
`vaedraw eval` computes it (evaluate.iwae, the same decode batches), and timed. Printed: the mean bound
of each, their difference (the fast path must stay within 0.05 nats per image), seconds per image and
the time extrapolated to the 10,000 MNIST test images. --max-decodes times the fast path with other
decode batch sizes too (same bound up to noise; for choosing evaluate.MAX_DECODES).
Keep --n-images small on a shared machine: 500 images at k=1000 take about a minute per precision
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import torch  # noqa: E402

from vaedraw import evaluate  # noqa: E402
from vaedraw.run import load_run  # noqa: E402

FULL_TEST = 10_000  # images of the MNIST test split


def run_pass(model, x, y, k: int, precision: str, max_decodes: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    lk = evaluate.iwae(model, x, y, k, seed=evaluate.EVAL_SEED, max_decodes=max_decodes, precision=precision)
    return lk, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--max-decodes", default="", help="comma-separated extra decode batch sizes for the fast path")
    ap.add_argument("--data-dir")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    run = load_run(args.run_dir, args.device)
    part = run.load_split("test", args.data_dir, progress=False)
    lik = run.config.model.likelihood
    x = evaluate.eval_inputs(part.images[:args.n_images], lik == "bernoulli").to(run.device)
    y = part.labels[:args.n_images].to(run.device) if run.conditional else None
    print(f"{machine(run.device)}; run {args.run_dir} (preset {run.config.preset}, step {run.step:,}); "
          f"first {len(x):,} test images, k={args.k:,}")
    default_decodes = evaluate.decode_batch(run.model, x, y, args.k)
    evaluate.iwae(run.model, x[:2], y if y is None else y[:2], 50, precision="auto")  # warm the kernels
    results = {}
    for precision in ("fp32", "auto"):
        lk, sec = run_pass(run.model, x, y, args.k, precision, default_decodes)
        results[precision] = lk
        per = sec / len(x)
        print(f"  {precision:<5} max_decodes {default_decodes:>6}: L_k {lk.mean().item():10.4f} nats, "
              f"{1000 * per:7.1f} ms/image, {FULL_TEST:,} images: {FULL_TEST * per / 60:5.1f} min")
    diff = (results["auto"] - results["fp32"])
    print(f"  auto - fp32: mean {diff.mean().item():+.4f} nats per image (limit 0.05), "
          f"max |per image| {diff.abs().max().item():.4f}")
    for md in (int(v) for v in args.max_decodes.split(",") if v):
        lk, sec = run_pass(run.model, x, y, args.k, "auto", md)
        per = sec / len(x)
        print(f"  auto  max_decodes {md:>6}: L_k {lk.mean().item():10.4f} nats, {1000 * per:7.1f} ms/image, "
              f"{FULL_TEST:,} images: {FULL_TEST * per / 60:5.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
