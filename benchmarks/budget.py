"""Train a preset within a budget of steps or of minutes, then evaluate it: the rows of docs/RESULTS.md.

    python benchmarks/budget.py --preset hierarchical --minutes 10 --device cuda --iwae-k 1000,5000 --data-dir DIR
    python benchmarks/budget.py --preset default --iwae-k 1000 --data-dir DIR        (the preset's own steps)
    python benchmarks/budget.py --preset hierarchical --minutes 0.3 --device cpu --iwae-k 5,10 \\
        --n-images 100 --n-samples 500 --data-dir DIR                                  (a dry run of the logic)

With --minutes the step budget is measured on this machine first: a short `vaedraw train` of --calibrate
steps gives the steady images per second (its last logged window), and steps = minutes * 60 / step time,
less --reserve of the time for start-up, held-out evaluations, pictures and the mixture fit. The run itself
is a plain `vaedraw train` (so its wall time is the end-to-end figure), followed by `vaedraw eval` once per
k (the first also measures sample quality at --temperature, when given). Writes budget.json and the run to
--out (default $OUT/budget or runs/budget; its calibration/ and run/ folders are replaced) and prints one
markdown row per k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, vaedraw_command  # noqa: E402

import torch  # noqa: E402


def vaedraw(*args: str, log: Path) -> float:
    """Run `vaedraw ARGS` to completion (its output appended to `log`); -> wall seconds. Fails loudly."""
    argv, env = vaedraw_command(*args)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ vaedraw {' '.join(args)}\n")
        f.flush()
        code = subprocess.call(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"budget: `vaedraw {' '.join(args)}` failed with exit {code}; see {log}")
    return time.perf_counter() - t0


def step_seconds(run_dir: Path) -> float:
    """Seconds per step of the last logged training window (metrics.jsonl's images_per_s)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    cfg = json.loads((run_dir / "config.json").read_text())
    return cfg["train"]["batch_size"] / train[-1]["images_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="hierarchical")
    p.add_argument("--minutes", type=float, help="training budget in minutes (default: the preset's steps)")
    p.add_argument("--steps", type=int, help="a fixed step budget instead")
    p.add_argument("--reserve", type=float, default=0.1, help="share of --minutes kept for everything but steps")
    p.add_argument("--calibrate", type=int, default=300, help="steps of the timing run")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iwae-k", default="1000", help="comma-separated importance-sample counts")
    p.add_argument("--n-images", type=int, help="test images (default: all)")
    p.add_argument("--n-samples", type=int, default=10000)
    p.add_argument("--temperature", type=float, help="sampling temperature for the quality figures")
    p.add_argument("--sampler", help="sampler for the quality figures (prior when the run fits no mixture)")
    p.add_argument("--data-dir")
    p.add_argument("--out", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    a = p.parse_args()

    out = a.out or Path(os.environ.get("OUT", "runs")) / "budget"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "budget.log"
    common = ["--device", a.device, "--seed", str(a.seed), "--no-progress"]
    common += ["--data-dir", a.data_dir] if a.data_dir else []
    common += [x for kv in a.set for x in ("--set", kv)]
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    result: dict = {"preset": a.preset, "machine": machine(torch.device(device)), "seed": a.seed, "overrides": a.set}

    steps = a.steps
    if a.minutes is not None and steps is None:
        calib = out / "calibration"
        shutil.rmtree(calib, ignore_errors=True)  # this script's own folders, from an earlier call
        vaedraw("train", "--preset", a.preset, "--out", str(calib), "--steps", str(a.calibrate),
                "--set", f"train.log_every={max(1, a.calibrate // 3)}", "--set", "sample.fit_gmm=false",
                "--set", f"train.eval_every={10 * a.calibrate}", "--set", f"train.picture_every={10 * a.calibrate}",
                *common, log=log)
        step_s = step_seconds(calib)
        steps = max(100, int(a.minutes * 60 * (1 - a.reserve) / step_s) // 100 * 100)
        result.update(step_ms=1000 * step_s, budget_minutes=a.minutes)
        print(f"budget: {1000 * step_s:.2f} ms/step -> {steps:,} steps in {a.minutes:g} min", flush=True)
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    train_args = ["train", "--preset", a.preset, "--out", str(run), *common]
    train_args += ["--steps", str(steps)] if steps else []
    result["train_wall_s"] = vaedraw(*train_args, log=log)
    result["steps"] = json.loads((run / "config.json").read_text())["train"]["steps"]
    print(f"budget: trained {result['steps']:,} steps in {result['train_wall_s']:.0f} s end to end", flush=True)

    result["eval"] = []
    for i, k in enumerate(int(s) for s in a.iwae_k.split(",")):
        path = out / f"eval_k{k}.json"
        args = ["eval", str(run), "--iwae-k", str(k), "--json", str(path), "--device", a.device, "--no-save",
                "--n-samples", str(a.n_samples if i == 0 else 1)]
        args += ["--n-images", str(a.n_images)] if a.n_images else []
        args += ["--data-dir", a.data_dir] if a.data_dir else []
        args += ["--temperature", str(a.temperature)] if a.temperature is not None else []
        args += ["--sampler", a.sampler] if a.sampler else []
        wall = vaedraw(*args, log=log)
        r = json.loads(path.read_text())
        row = {"k": k, "iwae": r["iwae"], "elbo": r["elbo"], "n_images": r["n_images"], "eval_wall_s": wall,
               "active_units": r.get("active_units")}
        if i == 0 and r.get("samples"):
            row.update(fd=r["samples"]["fd"], recognizable=r["samples"]["recognizable"],
                       coverage_bits=r["samples"]["coverage_bits"], sampler=r["samples"]["sampler"])
        result["eval"].append(row)
        print(f"| {a.preset} | {result['steps']:,} | {result['train_wall_s'] / 60:.1f} min | k={k:,} | "
              f"{-r['iwae']:.2f} | {-r['elbo']:.2f} | " + (f"FD {row['fd']:.2f}, recognizable "
              f"{row['recognizable']:.3f}, coverage {row['coverage_bits']:.2f} |" if "fd" in row else "|"), flush=True)
    (out / "budget.json").write_text(json.dumps(result, indent=2))
    print(f"budget: {result['machine']}; written to {out / 'budget.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
