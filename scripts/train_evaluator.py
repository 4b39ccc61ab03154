"""Train the evaluator classifier (vaedraw.evaluator.EvaluatorNet) and write its bundled weights.

    python scripts/train_evaluator.py --dataset mnist [--data-dir D] [--epochs 3]

Deterministic on the CPU: fixed seed, torch.use_deterministic_algorithms, a fixed number of epochs,
batch order and augmentation drawn from seeded generators. Trains on the full training split with
random shifts of up to 2 pixels, Adam with a cosine-decayed learning rate, then stores the weights in
float16 and measures the test accuracy of the stored (float16) weights, which goes into the metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from vaedraw import data as data_mod
from vaedraw.evaluate import as_float
from vaedraw.evaluator import EvaluatorNet, load_evaluator_file, save_evaluator, weights_path

SCRIPT_VERSION = 1  # bump when the recipe below changes


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, zero fill. [B, 1, 28, 28]."""
    b = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g)
    rows = (dy[:, None] + torch.arange(28)[None, :])  # [B, 28]
    cols = (dx[:, None] + torch.arange(28)[None, :])
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=data_mod.DATASETS)
    p.add_argument("--data-dir", help="folder with the four IDX files (else $VAEDRAW_DATA_DIR, cache, ...)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="weights file (default: the bundled path for the dataset)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train, test = data_mod.load_dataset(args.dataset, args.data_dir)
    if train.name.endswith("subset/train"):
        print("train_evaluator: refusing to train on the bundled subset; pass --data-dir", file=sys.stderr)
        return 2
    x_train, y_train = as_float(train.images), train.labels
    x_test, y_test = as_float(test.images), test.labels

    net = EvaluatorNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps_per_epoch = len(x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(net(shift(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        acc = accuracy(net, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, test accuracy {acc:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    out = args.out or weights_path(args.dataset)
    meta = {"dataset": args.dataset, "script_version": SCRIPT_VERSION, "seed": args.seed, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "train_images": len(x_train), "test_images": len(x_test),
            "storage": "float16", "torch": torch.__version__}
    save_evaluator(net, out, {**meta, "test_accuracy": float("nan")})
    # The recorded accuracy is that of the stored float16 weights, as users load them.
    ev = load_evaluator_file(out)
    acc = accuracy(ev.predict_proba, x_test, y_test)
    save_evaluator(ev.net, out, {**meta, "test_accuracy": acc})
    print(json.dumps({"out": str(out), "test_accuracy": acc, "seconds": round(time.perf_counter() - t0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
