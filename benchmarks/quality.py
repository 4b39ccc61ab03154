"""Quality benchmark: train (or reuse) the benchmark runs, evaluate them, write the table into docs/RESULTS.md.

    python benchmarks/quality.py [--device auto] [--runs-dir runs/quality] [--data-dir D]
                                 [--rows seed,default,default-long] [--iwae-k 1000] [--n-samples 10000]
                                 [--gmm-sweep 10,25,50,100,200] [--json out.json]

Rows (a run directory per name under --runs-dir, reused when it already holds a finished run):
    seed          the article's model, full schedule (30,000 steps), each sampler
    default       the default preset at its default budget, each sampler
    default-long  the default preset trained LONG_STEPS steps, gmm sampler
Every row reports the likelihood on the full test split (ELBO and the IWAE bound with --iwae-k
samples) and the sample-quality figures of `vaedraw.evaluate` with --n-samples generated digits.
--gmm-sweep refits the mixture of the default run with several sizes (into a scratch file; the run's
own mixture is untouched) and measures sample quality for each. The table goes between the markers
<!-- quality:start --> and <!-- quality:end --> of docs/RESULTS.md (the rest of that file is left as is).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, device_name, write_block  # noqa: E402

import torch  # noqa: E402

from vaedraw import build_config  # noqa: E402
from vaedraw import data as data_mod  # noqa: E402
from vaedraw.checkpoint import CHECKPOINT_NAME  # noqa: E402
from vaedraw.config import parse_set  # noqa: E402
from vaedraw.evaluate import evaluate_run, quality_figures  # noqa: E402
from vaedraw.run import load_run, resolve_device  # noqa: E402
from vaedraw.sample import GaussianMixture, fit_gmm  # noqa: E402
from vaedraw.train import train  # noqa: E402

RESULTS = REPO / "docs" / "RESULTS.md"
LONG_STEPS = 30_000
ROWS = {  # name -> (preset, overrides, samplers)
    "seed": ("seed", {}, ("prior", "gmm")),
    "default": ("default", {}, ("prior", "gmm")),
    "default-long": ("default", {"train.steps": LONG_STEPS}, ("gmm",)),
}


def ensure_run(name: str, run_dir: Path, device: str, data_dir: str | None, extra: dict) -> float | None:
    """Train the row's run into run_dir unless a finished one is there. Returns training seconds (None if reused).

    `extra` overrides go after the row's own (for a quick smoke test of this script).
    """
    preset, overrides, _ = ROWS[name]
    cfg = build_config(preset, overrides={**overrides, **extra})
    if (run_dir / CHECKPOINT_NAME).exists() and (run_dir / "samples.png").exists():
        return None
    t0 = time.perf_counter()
    resume = (run_dir / CHECKPOINT_NAME).exists()  # an interrupted row continues as it was stored
    train(None if resume else cfg, run_dir, device=device, data_dir=data_dir, progress=False,
          argv=["benchmarks/quality.py", name], resume=resume)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def training_seconds(run_dir: Path) -> float | None:
    """Wall time of the training from its metrics log: steps / (images per second / batch size), summed."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train" and r.get("images_per_s")]
    total, last = 0.0, 0
    for r in train:
        total += (r["step"] - last) * cfg["train"]["batch_size"] / r["images_per_s"]
        last = r["step"]
    return total


def gmm_sweep(run_dir: Path, ks: list[int], device: str, data_dir: str | None, n_samples: int) -> list[dict]:
    """Refit the mixture with each size K and measure its samples. Returns [{k, fd, recognizable, ...}]."""
    run = load_run(run_dir, device)
    train = (data_mod.load_recorded(run.data_source["train"], "train", data_dir, progress=False) if run.data_source
             else data_mod.load_dataset(run.config.data.dataset, data_dir, progress=False)[0])  # the run's own images
    out = []
    scratch = run_dir / "gmm-sweep.safetensors"
    for k in ks:
        t0 = time.perf_counter()
        run.gmm = fit_gmm(run.model, train.images, train.labels if run.conditional else None, k,
                          run.config.train.seed, scratch)
        fit_s = time.perf_counter() - t0
        q = quality_figures(run, n_samples=n_samples, sampler="gmm", data_dir=data_dir)
        if not q["quality_available"]:
            print(f"gmm sweep skipped: {q['quality_note']}", file=sys.stderr)
            break
        s = q["samples"]
        out.append({"k": k, "fd": s["fd"], "recognizable": s["recognizable"], "coverage_bits": s["coverage_bits"],
                    "fit_seconds": fit_s, "fd_floor": q["fd_floor"]})
        print(f"gmm K={k}: FD {s['fd']:.2f}, recognizable {s['recognizable']:.3f}, coverage {s['coverage_bits']:.3f} "
              f"bits (fit {fit_s:.0f} s)", file=sys.stderr)
    scratch.unlink(missing_ok=True)
    run.gmm = GaussianMixture.load(run_dir / "gmm.safetensors") if (run_dir / "gmm.safetensors").exists() else None
    return out


def _f(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict], sweep: list[dict], command: str) -> str:
    head = ("| preset | sampler | steps | wall time | device | ELBO | IWAE bound | FD | FD floor | recognizable "
            "| coverage (bits) |\n|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    lines = [f"Measured with `{command}`. Likelihoods in nats per test image (10,000 MNIST test images, "
             "binarized once with a fixed seed, for the Bernoulli models; the seed preset's Gaussian figures "
             "are log-densities of grayscale pixels and are not comparable). FD: Frechet distance of our "
             "evaluator's features, 10,000 generated digits vs the 10,000 test images; the floor is 10,000 "
             "real training images vs the same. Recognizable: share classified with probability >= 0.9. "
             "Coverage: entropy of predicted labels (uniform = 3.32 bits). Wall time is the training time "
             "only; on a shared CPU it is indicative.", "", head]
    for r in rows:
        s = r["samples"] or {}
        wall = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "-"
        lines.append(
            f"| {r['preset']}{' (long)' if r['row'] == 'default-long' else ''} | {r['sampler']} "
            f"| {r['step']:,} | {wall} | {r['device_name']} | {r['elbo']:.2f} | {r['iwae']:.2f} (k={r['iwae_k']}) "
            f"| {_f(s.get('fd'))} | {_f(r['fd_floor'])} | {_f(s.get('recognizable'), '.3f')} "
            f"| {_f(s.get('coverage_bits'), '.3f')} |")
    if sweep:
        lines += ["", "Mixture size for the gmm sampler (default preset at its default budget, 10,000 samples):", "",
                  "| K | FD | recognizable | coverage (bits) | fit time |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['k']} | {s['fd']:.2f} | {s['recognizable']:.3f} | {s['coverage_bits']:.3f} "
                  f"| {s['fit_seconds']:.0f} s |" for s in sweep]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir", default="runs/quality", help="one run directory per row (reused if finished)")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files")
    p.add_argument("--rows", default="seed,default,default-long", help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--n-samples", type=int, default=10000)
    p.add_argument("--n-images", type=int, help="test images for the likelihood (default all)")
    p.add_argument("--gmm-sweep", default="", help="comma list of mixture sizes to try on the default run")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="config override for every row (smoke tests only: the table's budgets assume none)")
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--results", default=str(RESULTS), help="markdown file to update (default docs/RESULTS.md)")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    runs_dir = Path(args.runs_dir)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    rows: list[dict] = []
    sweep: list[dict] = []
    for name in names:
        run_dir = runs_dir / name
        took = ensure_run(name, run_dir, str(dev), args.data_dir, parse_set(args.set))
        print(f"{name}: {'trained in %.0f s' % took if took else 'reused'} ({run_dir})", file=sys.stderr)
        run = load_run(run_dir, str(dev))
        base = None
        for sampler in ROWS[name][2]:
            if base is None:
                base = evaluate_run(run, iwae_k=args.iwae_k, n_samples=args.n_samples, sampler=sampler,
                                    data_dir=args.data_dir, n_images=args.n_images)
                r = base
            else:
                q = quality_figures(run, n_samples=args.n_samples, sampler=sampler, data_dir=args.data_dir)
                r = {**base, **q, "seconds": {**base["seconds"], **q.get("seconds", {})}}
            r.update(row=name, sampler=sampler, device_name=device_name(dev), train_seconds=training_seconds(run_dir))
            rows.append(r)
            s = r["samples"] or {}
            print(f"{name} [{sampler}]: ELBO {r['elbo']:.2f}, IWAE(k={r['iwae_k']}) {r['iwae']:.2f} "
                  f"({r['seconds']['iwae']:.0f} s), FD {_f(s.get('fd'))} (floor {_f(r['fd_floor'])}), "
                  f"recognizable {_f(s.get('recognizable'), '.3f')}, coverage {_f(s.get('coverage_bits'), '.3f')}",
                  file=sys.stderr)
        if name == "default" and args.gmm_sweep:
            ks = [int(k) for k in args.gmm_sweep.split(",")]
            sweep = gmm_sweep(run_dir, ks, str(dev), args.data_dir, args.n_samples)
        if args.json:  # after every row, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"rows": rows, "gmm_sweep": sweep}, indent=2) + "\n")
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(rows, sweep, command.strip())
    print(text)
    write_block(args.results, "quality", text, heading="## Quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
