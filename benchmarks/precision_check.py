"""Does bf16 change what the seed model learns? The CPU fast path in float32 and in bf16, same noise stream.

    python benchmarks/precision_check.py --data-dir DIR [--steps 2000] [--preset seed]

Both variants use the fast path's own noise (so they differ only in precision), start from the same
weights, train --steps steps of the preset's schedule on the same batches, and report the test loss
(the preset's objective, dropout off, one z per image with fixed noise, all test images).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import Trainer, check_loss, plan_for  # noqa: E402

from vaedraw import data as data_mod  # noqa: E402
from vaedraw.config import preset  # noqa: E402
from vaedraw.evaluate import eval_inputs  # noqa: E402
from vaedraw.train import Batcher  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--preset", default="seed")
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    train, test = data_mod.load_dataset(cfg.data.dataset, args.data_dir, progress=False)
    device = torch.device("cpu")
    batcher = Batcher(train.images, train.labels, cfg.train.batch_size, cfg.train.seed)
    x_test, y_test = eval_inputs(test.images, cfg.model.likelihood == "bernoulli"), test.labels
    loss = {}
    for variant in ("fp32+cl+conv", "bf16+cl+conv"):
        t0 = time.perf_counter()
        trainer = Trainer(cfg, device, plan_for(variant, cfg, device))
        loss[variant], finite = check_loss(trainer, batcher, x_test, y_test, args.steps)
        print(f"{variant}: test loss {loss[variant]:.4f} after {args.steps} steps (finite: {finite}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    a, b = loss["fp32+cl+conv"], loss["bf16+cl+conv"]
    print(f"bf16 vs fp32: {100 * abs(b - a) / abs(a):.2f}% apart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
