"""Train a shipped evaluator classifier and write it into the package (`src/vaedraw/bundled/`).

    python scripts/train_evaluator.py --dataset mnist --data-dir D [--epochs 3] [--out FILE]

A thin wrapper over `vaedraw.evaluator.train_evaluator` (the recipe, documented there and in
docs/EVALUATION.md), which `vaedraw train-evaluator` also calls; this one writes the bundled path by
default and refuses the bundled MNIST subset, on which a shipped evaluator must not be trained.
"""

from __future__ import annotations

import argparse
import json
import sys

from vaedraw import data as data_mod
from vaedraw.evaluator import RECIPE, load_training_data, train_evaluator, weights_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=[n for n, s in data_mod.DATASETS.items() if not s.own_data])
    p.add_argument("--data-dir", help="folder with the four IDX files (else $VAEDRAW_DATA_DIR, cache, ...)")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--out", help="weights file (default: the bundled path for the dataset)")
    args = p.parse_args(argv)

    train, test = load_training_data(dataset=args.dataset, data_dir=args.data_dir)
    if train.provenance.get("subset"):
        print("train_evaluator: refusing to train on the bundled subset; pass --data-dir", file=sys.stderr)
        return 2
    meta = train_evaluator(train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, out=args.out or weights_path(args.dataset))
    print(json.dumps({"out": meta["out"], "test_accuracy": meta["test_accuracy"], "seconds": round(meta["seconds"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
