"""Training time until a preset's samples beat the seed preset's final Frechet distance.

    python benchmarks/fd_time.py [--device cpu] [--data-dir D] [--preset default] [--every 250]
                                 [--seed-fd-prior 33.99] [--seed-fd-gmm 17.62] [--gmm-codes 10000]
                                 [--n-samples 10000] [--set KEY=VALUE]

Trains the preset as `vaedraw train` does (the same fast step with the plan `auto` picks, the same
batches and learning-rate schedule) for its whole budget. Every --every steps the clock stops and the
FD of --n-samples (10,000) generated digits to the 10,000 test images is measured with our evaluator
(as `vaedraw eval` does), for the prior sampler and for the mixture sampler. The mixture has the preset's number of
components and is fitted to the encoder means of the first --gmm-codes training images (the run's own
fit at the end uses all 60,000; a smaller fit keeps the checks short). A sampler is no longer checked
once its FD has fallen below the seed preset's final FD for the same sampler (docs/RESULTS.md, seed row:
prior 33.99, gmm 17.62, full 30,000-step schedule).

Printed: for each sampler the training seconds (and step) at which its FD first fell below the seed's,
and the training seconds of the whole budget. Training seconds exclude the checks. Last, the final
model's decoding time for --n-samples digits and its prior-sampler FD, with pictures decoded as `auto`
picks (bf16 on CPUs with AVX512-BF16) and in float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Trainer, load_data, sync  # noqa: E402

import torch  # noqa: E402

from vaedraw import build_config, fastpath  # noqa: E402
from vaedraw.config import parse_set  # noqa: E402
from vaedraw.data import to_float  # noqa: E402
from vaedraw.evaluate import frechet_distance  # noqa: E402
from vaedraw.evaluator import load_evaluator  # noqa: E402
from vaedraw.run import Run, resolve_device  # noqa: E402
from vaedraw.sample import GaussianMixture, decode_means, encode_means  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="MNIST IDX folder (else $VAEDRAW_DATA_DIR / cache)")
    p.add_argument("--every", type=int, default=250, help="steps between FD checks")
    p.add_argument("--seed-fd-prior", type=float, default=33.99, help="the seed preset's final FD, prior sampler")
    p.add_argument("--seed-fd-gmm", type=float, default=17.62, help="the seed preset's final FD, gmm sampler")
    p.add_argument("--gmm-codes", type=int, default=10_000, help="training images whose codes the mixture is fitted to")
    p.add_argument("--n-samples", type=int, default=10_000, help="generated digits per FD (the seed's FD used 10,000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as for train")
    args = p.parse_args(argv)
    cfg = build_config(args.preset, overrides=parse_set(args.set))
    t = cfg.train
    dev = resolve_device(args.device)
    plan = fastpath.choose_plan(t, cfg.model.arch, dev)
    fastpath.announce(plan, dev)
    data = load_data(cfg, dev, args.data_dir)
    train_split, test_split = data.train, data.test
    trainer = Trainer(cfg, dev, plan)
    model = trainer.model

    evaluator = load_evaluator(cfg.data.dataset, device=dev)
    ref = evaluator.features(to_float(test_split.images))
    targets = {"prior": args.seed_fd_prior, "gmm": args.seed_fd_gmm}
    crossed: dict[str, tuple[int, float, float]] = {}
    train_s = 0.0
    y_gen = torch.arange(args.n_samples) % model.n_classes if model.n_classes else None  # classes in turn

    def check(step: int) -> None:
        model.eval()
        run = Run(run_dir=Path("."), config=cfg, model=model, step=step, metrics={})
        line = [f"step {step:5d}  train {train_s:7.1f} s"]
        for sampler, target in targets.items():
            if sampler in crossed:
                continue
            t0 = time.perf_counter()
            if sampler == "gmm":
                codes = encode_means(model, train_split.images[:args.gmm_codes],
                                     train_split.labels[:args.gmm_codes] if model.n_classes else None)
                y = train_split.labels[:args.gmm_codes].numpy() if model.n_classes else None
                run.gmm = GaussianMixture.fit(codes.numpy(), cfg.sample.gmm_components, t.seed, y)
            x = run.sample(args.n_samples, sampler=sampler, seed=0, y=y_gen)
            fd = frechet_distance(evaluator.features(x), ref)
            line.append(f"{sampler} FD {fd:6.2f} (seed {target:.2f}; check {time.perf_counter() - t0:.0f} s)")
            if fd < target:
                crossed[sampler] = (step, train_s, fd)
        print("  ".join(line), file=sys.stderr, flush=True)
        model.train()

    model.train()
    for start in range(0, t.steps, args.every):
        t0 = time.perf_counter()
        trainer.train(data.batcher, start, min(start + args.every, t.steps))
        sync(dev)
        train_s += time.perf_counter() - t0
        if len(crossed) < len(targets):
            check(min(start + args.every, t.steps))

    print(f"{args.preset} on {dev} ({plan.describe()}): the whole budget, {t.steps:,} steps, trained in "
          f"{train_s:.1f} s ({train_s / t.steps * 1000:.1f} ms/step, checks excluded)")
    # Pictures are decoded in bf16 where the device has it (fastpath.inference_autocast): the final
    # model's FD with float32 decoding shows what that changes.
    model.eval()
    run = Run(run_dir=Path("."), config=cfg, model=model, step=t.steps, metrics={})
    z = run.codes(args.n_samples, sampler="prior", seed=0)
    decoded, seconds = {}, {}
    for precision in ("auto", "fp32"):
        decode_means(model, z[:1000], None if y_gen is None else y_gen[:1000], precision=precision)  # warm-up
        t0 = time.perf_counter()
        decoded[precision] = decode_means(model, z, y_gen, precision=precision)
        seconds[precision] = time.perf_counter() - t0
    x_auto, x_fp32 = decoded["auto"], decoded["fp32"]
    print(f"  decoding {args.n_samples:,} digits: {seconds['auto']:.2f} s as `auto` picks, {seconds['fp32']:.2f} s in "
          f"float32")
    print(f"  final prior-sampler FD: {frechet_distance(evaluator.features(x_auto), ref):.3f} decoded as "
          f"`auto` picks, {frechet_distance(evaluator.features(x_fp32), ref):.3f} decoded in float32 "
          f"(pixel means at most {(x_auto - x_fp32).abs().max().item():.4f} apart)")
    for sampler, target in targets.items():
        if sampler in crossed:
            step, secs, fd = crossed[sampler]
            print(f"  {sampler}: FD {fd:.2f} < the seed preset's final {target:.2f} first at step {step:,}, "
                  f"after {secs:.1f} s of training")
        else:
            print(f"  {sampler}: FD never fell below the seed preset's final {target:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
