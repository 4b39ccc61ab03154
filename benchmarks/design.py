"""Design comparison for a preset: train variants for the same number of steps and compare.

    python benchmarks/design.py --data-dir DIR [--steps 2000] [--variants base,small,wide,lr2e-3]
    python benchmarks/design.py --data-dir DIR --preset hierarchical --variants base,c64g2,c64g1,c48g1,c32g1

Each variant is the preset (`default` unless --preset says) with a few overrides, trained from the same seed for --steps steps
(cosine schedule over those steps) on full MNIST; reported: parameters, training ms/step on this
machine, and the final test loss (negative ELBO, nats per image, test images binarized once). The
quality of the chosen default at its full budget is in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import image_shape  # noqa: E402

from vaedraw.config import build_config  # noqa: E402
from vaedraw.models import build_model, count_parameters  # noqa: E402
from vaedraw.plots import read_metrics  # noqa: E402
from vaedraw.train import train  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "base": {},  # the default: channels 32, hidden 256, latent 16, lr 1e-3, batch 128
    "small": {"model.conv.channels": 16, "model.conv.hidden": 128},
    "wide": {"model.conv.channels": 64, "model.conv.hidden": 512},
    "lr2e-3": {"train.lr": 2e-3},
    "batch64": {"train.batch_size": 64},
    "latent32": {"model.latent_dim": 32},
}
# the hierarchical preset's variants (base: channels 32, two groups per resolution)
HIERARCHICAL_VARIANTS: dict[str, dict[str, object]] = {
    "base": {},
    "c64g2": {"model.hierarchical.channels": 64},
    "c64g1": {"model.hierarchical.channels": 64, "model.hierarchical.groups": 1},
    "c48g1": {"model.hierarchical.channels": 48, "model.hierarchical.groups": 1},
    "c32g1": {"model.hierarchical.groups": 1},
}
PRESET_VARIANTS = {"default": VARIANTS, "hierarchical": HIERARCHICAL_VARIANTS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--preset", default="default", choices=tuple(PRESET_VARIANTS))
    p.add_argument("--variants", default="base,small,wide,lr2e-3")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    variants = PRESET_VARIANTS[args.preset]
    for name in args.variants.split(","):
        over = {**variants[name], "train.steps": args.steps, "train.eval_every": args.steps,
                "train.picture_every": args.steps, "train.checkpoint_every": args.steps, "sample.fit_gmm": False}
        cfg = build_config(args.preset, overrides=over)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train(cfg, Path(tmp) / name, data_dir=args.data_dir, progress=False)
            seconds = time.perf_counter() - t0
            metrics = read_metrics(Path(tmp) / name / "metrics.jsonl")
        test = [r for r in metrics if r["split"] == "test"][-1]
        ips = [r["images_per_s"] for r in metrics if r["split"] == "train"]
        ms = 1000 * cfg.train.batch_size / (sorted(ips)[len(ips) // 2])
        params = count_parameters(build_model(cfg.model, image_shape(cfg)))
        row = {"variant": name, "overrides": variants[name], "parameters": params, "ms_per_step": ms,
               "seconds": seconds, "test_loss": test["loss"], "recon": test["recon"], "kl": test["kl"]}
        rows.append(row)
        print(f"{name}: {row['parameters']:,} parameters, {ms:.1f} ms/step, test loss {test['loss']:.2f} "
              f"(recon {test['recon']:.2f}, KL {test['kl']:.2f}), {seconds:.0f} s", flush=True)
    print(f"\n| variant | overrides | parameters | ms/step | test loss after {args.steps} steps |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['overrides'] or 'the preset'} | {r['parameters']:,} | {r['ms_per_step']:.1f} | "
              f"{r['test_loss']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
