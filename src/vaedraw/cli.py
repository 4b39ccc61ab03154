"""The `vaedraw` command line: a thin shell over the Python API.

Every user-facing failure is a VaedrawError, printed as one line (`vaedraw: error: ...`) with exit
status 2; an interrupted training run exits with 128 + the signal number after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .config import PRESETS, build_config, parse_set
from .errors import VaedrawError


MAX_SAMPLES = 100_000  # one PNG grid of this many 28x28 digits is already ~8,000 pixels a side


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def parse_digits(text: str) -> list[int] | str:
    """'7' -> [7]; '1,2,3' -> [1, 2, 3]; 'all' -> 'all'."""
    if text.strip().lower() == "all":
        return "all"
    try:
        digits = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--digit takes 0-9, a comma list such as 1,4,7, or all; got {text!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise argparse.ArgumentTypeError(f"--digit takes digits 0-9, a comma list such as 1,4,7, or all; got {text!r}")
    return digits


def digit_labels(digits: list[int] | str, n: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid of n images and its row length: 'all' -> one row per digit 0-9."""
    if digits == "all":
        per = max(1, -(-n // 10))
        return torch.arange(10).repeat_interleave(per), per
    per = max(1, -(-n // len(digits)))
    return torch.tensor(digits).repeat_interleave(per)[: max(n, len(digits))], per if len(digits) > 1 else 0


# ----------------------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a VAE and write a run directory")
    p.add_argument("--preset", default=None, help=f"named config: {', '.join(PRESETS)} (default: default)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of overrides ([model], [train], ... tables)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set model.latent_dim=2 (repeatable)")
    p.add_argument("--dataset", help="mnist | fashion-mnist")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, help="optimizer steps")
    g.add_argument("--epochs", type=_positive_float, help="passes over the training set (converted to steps)")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", choices=("auto", "on", "off"))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--data-dir", help="folder with the four IDX files (else $VAEDRAW_DATA_DIR, cache, download)")
    p.add_argument("--out", help="run directory (default runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--keep", choices=("stored", "new"),
                   help="on --resume with a differing config: which config to keep")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=_positive_int,
                   help="data-parallel processes on this machine (starts torchrun; one per GPU, or gloo on CPUs)")
    p.set_defaults(func=cmd_train)


def train_overrides(args) -> dict[str, object]:
    """The config changes the command line asks for (named flags, then --set)."""
    named = {"data.dataset": args.dataset, "train.steps": args.steps, "train.batch_size": args.batch_size,
             "train.lr": args.lr, "train.seed": args.seed, "train.precision": args.precision,
             "train.compile": args.compile}
    out: dict[str, object] = {k: v for k, v in named.items() if v is not None}
    out.update(parse_set(args.set))
    return out


def cmd_train(args) -> int:
    from . import distributed
    from .checkpoint import CHECKPOINT_NAME, read_header
    from .config import RunConfig, apply_overrides
    from .train import train

    if args.nproc and args.nproc > 1 and not distributed.launched_by_torchrun():
        import subprocess

        argv = list(getattr(args, "argv", sys.argv[1:]))
        i = next((i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc=")), None)
        if i is None:
            raise VaedrawError("spell the option out as --nproc N")
        del argv[i:i + (1 if "=" in argv[i] else 2)]
        return subprocess.call(distributed.torchrun_command(args.nproc, argv))

    overrides = train_overrides(args)
    cfg = build_config(args.preset or "default", args.config, overrides)
    given = bool(overrides or args.config or args.preset or args.epochs)
    out = Path(args.out or f"runs/{cfg.preset}")
    if args.resume and not (args.preset or args.config) and (out / CHECKPOINT_NAME).is_file():
        # `--resume --steps N` asks for more steps, not for the preset's defaults: apply the named
        # changes to the stored config, so only they can disagree with it
        cfg = apply_overrides(RunConfig.from_dict(read_header(out / CHECKPOINT_NAME)["config"]), overrides)
    run_dir = train(cfg, out, device=args.device, data_dir=args.data_dir, resume=args.resume, keep=args.keep,
                    overrides_given=given, progress=not args.no_progress, epochs=args.epochs,
                    argv=["vaedraw", *getattr(args, "argv", sys.argv[1:])])
    if distributed.launched_by_torchrun() and os.environ.get("RANK") != "0":
        return 0  # rank 0 speaks for the run
    print(f"vaedraw: run written to {run_dir} (samples.png, curves.png, progress.gif, checkpoint.safetensors)")
    return 0


# ----------------------------------------------------------------------------- sample / reconstruct
def _add_run(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `vaedraw train`")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw new digits from a trained run")
    _add_run(p)
    p.add_argument("-n", type=_positive_int, default=64, help=f"how many (default 64, at most {MAX_SAMPLES:,})")
    p.add_argument("--out", default="samples.png", help="grid picture (default samples.png)")
    p.add_argument("--npz", help="also write x: uint8 [n, 28, 28] = round(255 * pixel mean) to this .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("prior", "gmm"), help="default: the run's preset's best")
    p.add_argument("--temperature", type=_positive_float, help="prior sampler: z ~ N(0, T^2 I)")
    p.add_argument("--digit", type=parse_digits, help="conditional runs: 7, a list 1,4,7, or all (a row per digit)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from . import plots
    from .run import load_run
    from .sample import save_npz

    if args.n > MAX_SAMPLES:
        raise VaedrawError(f"-n {args.n:,} is more than one grid picture can hold (at most {MAX_SAMPLES:,}); "
                           "draw several batches with different --seed values")
    run = load_run(args.run_dir, args.device)
    y, nrow = None, 0
    if args.digit is not None:
        y, nrow = digit_labels(args.digit, args.n)
    elif run.conditional:
        y, nrow = digit_labels("all", args.n)
    n = args.n if y is None else len(y)
    x = run.sample(n, sampler=args.sampler, seed=args.seed, temperature=args.temperature, y=y)
    plots.save_grid(x, args.out, nrow=nrow or None)
    print(f"vaedraw: {n} samples ({args.sampler or run.default_sampler} sampler) -> {args.out}")
    if args.npz:
        save_npz(args.npz, x, **({"y": y.numpy()} if y is not None else {}))
        print(f"vaedraw: uint8 array x {tuple(x.shape[:1]) + (28, 28)} -> {args.npz}")
    return 0


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="test images above, their reconstructions below")
    _add_run(p)
    p.add_argument("-n", type=_positive_int, default=16, help="how many test images (default 16)")
    p.add_argument("--out", default="recon.png")
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args) -> int:
    from . import data, plots
    from .evaluate import as_float
    from .run import load_run

    run = load_run(args.run_dir, args.device)
    test = data.load_split(run.config.data.dataset, "test", args.data_dir)
    n = min(args.n, len(test))
    x = as_float(test.images[:n])
    y = test.labels[:n] if run.conditional else None
    rec = run.reconstruct(x, y)
    plots.save_grid(torch.cat([x, rec]), args.out, nrow=n)
    print(f"vaedraw: {n} test images and their reconstructions -> {args.out}")
    return 0


def add_fit_gmm(sub) -> None:
    p = sub.add_parser("fit-gmm", help="(re)fit the gmm sampler of a run to its training set")
    _add_run(p)
    p.add_argument("--components", type=_positive_int, help="mixture size (default: the run's config)")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_fit_gmm)


def cmd_fit_gmm(args) -> int:
    from . import data
    from .run import load_run
    from .sample import GMM_NAME, fit_gmm

    run = load_run(args.run_dir, args.device)
    train = data.load_split(run.config.data.dataset, "train", args.data_dir)
    k = args.components or run.config.sample.gmm_components
    fit_gmm(run.model, train.images, train.labels if run.conditional else None, k, run.config.train.seed,
            run.run_dir / GMM_NAME)
    print(f"vaedraw: fitted a {k}-component mixture -> {run.run_dir / GMM_NAME}")
    return 0


# ----------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="likelihood bounds and sample quality of a trained run")
    _add_run(p)
    p.add_argument("--split", choices=("test", "train"), default="test", help="images for the likelihood (default test)")
    p.add_argument("--iwae-k", type=_positive_int, default=1000, help="importance samples per image (default 1000)")
    p.add_argument("--n-samples", type=_positive_int, default=10000, help="generated digits judged (default 10000)")
    p.add_argument("--n-images", type=_positive_int, help="use only the first N images of the split (default all)")
    p.add_argument("--sampler", choices=("prior", "gmm"), help="default: the run's preset's best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT.json", help="also write the figures as JSON")
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json

    from .checkpoint import atomic_write_text
    from .evaluate import evaluate_run, format_report
    from .run import load_run

    run = load_run(args.run_dir, args.device)
    result = evaluate_run(run, split=args.split, iwae_k=args.iwae_k, n_samples=args.n_samples, sampler=args.sampler,
                          data_dir=args.data_dir, seed=args.seed, n_images=args.n_images)
    print(format_report(result))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
        print(f"vaedraw: figures -> {args.json}")
    return 0


# ----------------------------------------------------------------------------- latent-space pictures
def _digit(text: str) -> int:
    try:
        d = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a digit 0-9, got {text!r}") from None
    if not 0 <= d <= 9:
        raise argparse.ArgumentTypeError(f"expected a digit 0-9, got {d}")
    return d


def add_interpolate(sub) -> None:
    p = sub.add_parser("interpolate", help="decode the path between two test images (linear and spherical)")
    _add_run(p)
    g = p.add_argument_group("endpoints (default: the first test 3 and the first test 8)")
    g.add_argument("--from-index", type=int, help="index of the first test image")
    g.add_argument("--to-index", type=int, help="index of the second test image")
    g.add_argument("--from-digit", type=_digit, help="the first test image of this digit")
    g.add_argument("--to-digit", type=_digit, help="the first test image of this digit")
    p.add_argument("--steps", type=_positive_int, default=10, help="points on each path, endpoints included")
    p.add_argument("--out", default="interp.png", help="strip: linear row above, spherical row below")
    p.add_argument("--gif", help="also write an animated GIF (linear | spherical), there and back")
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.set_defaults(func=cmd_interpolate)


def cmd_interpolate(args) -> int:
    from . import latent, plots
    from .run import load_run

    if (args.from_index is None) != (args.to_index is None):
        raise VaedrawError("give both --from-index and --to-index")
    if (args.from_index is not None) and (args.from_digit is not None or args.to_digit is not None):
        raise VaedrawError("choose endpoints by --from-index/--to-index or by --from-digit/--to-digit, not both")
    run = load_run(args.run_dir, args.device)
    test = latent.load_test_split(run, args.data_dir)
    if args.from_index is not None:
        ends = [args.from_index, args.to_index]
        bad = [i for i in ends if not 0 <= i < len(test)]
        if bad:
            raise VaedrawError(f"test image index {bad[0]} is out of range 0..{len(test) - 1}")
    else:
        digits = [3 if args.from_digit is None else args.from_digit, 8 if args.to_digit is None else args.to_digit]
        ends = [latent.first_index_of(test.labels, d) for d in digits]
    x = test.images[ends].unsqueeze(1).float().div(255)
    y0, y1 = (int(test.labels[i]) for i in ends)
    path = latent.interpolate(run, x[0], x[1], args.steps, y0, y1)
    plots.save_strip([path.linear, path.spherical], args.out)
    print(f"vaedraw: test images {ends[0]} ({y0}) -> {ends[1]} ({y1}), {args.steps} steps, linear and spherical "
          f"-> {args.out}")
    if args.gif:
        frames = plots.animation_frames([latent.there_and_back(path.linear), latent.there_and_back(path.spherical)])
        plots.save_gif(frames, args.gif)
        print(f"vaedraw: animation (linear | spherical), {len(frames)} frames -> {args.gif}")
    return 0


def add_latent_map(sub) -> None:
    p = sub.add_parser("latent-map", help="test-set encoder means in the plane, coloured by digit")
    _add_run(p)
    p.add_argument("--method", choices=("pca", "tsne", "umap"), default="pca",
                   help="projection for latents larger than 2-d (default pca; umap needs umap-learn)")
    p.add_argument("-n", type=_positive_int, default=5000, help="test images to place (default 5000)")
    p.add_argument("--out", default="latent_map.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the t-SNE / UMAP optimisation")
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.set_defaults(func=cmd_latent_map)


def cmd_latent_map(args) -> int:
    from . import latent, plots
    from .run import load_run

    run = load_run(args.run_dir, args.device)
    test = latent.load_test_split(run, args.data_dir)
    mu, labels = latent.encoder_means(run, test.images, test.labels, args.n)
    proj = latent.Projection.fit(mu, args.method, args.seed)
    names = {"plane": ("z1", "z2"), "pca": ("PC 1", "PC 2")}.get(proj.method, (f"{proj.method} 1", f"{proj.method} 2"))
    what = "the latent plane" if proj.method == "plane" else f"{proj.method} of the {run.latent_dim}-d means"
    plots.plot_latent_map(proj.points, labels.numpy(), args.out, axis_names=names,
                          title=f"{run.config.preset}: {len(mu)} test encoder means, {what}")
    print(f"vaedraw: {len(mu)} test codes ({what}) -> {args.out}")
    return 0


def add_manifold(sub) -> None:
    p = sub.add_parser("manifold", help="decode a grid over a latent plane (inverse-normal-CDF spacing)")
    _add_run(p)
    p.add_argument("--grid", type=_positive_int, default=20, help="digits per side (default 20)")
    p.add_argument("--out", default="manifold.png")
    p.add_argument("--digit", type=_digit, help="conditional runs: the digit to draw (default 0)")
    p.add_argument("-n", type=_positive_int, default=5000,
                   help="latents larger than 2-d: test images whose means give the plane (default 5000)")
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.set_defaults(func=cmd_manifold)


def cmd_manifold(args) -> int:
    from . import latent, plots
    from .run import load_run

    run = load_run(args.run_dir, args.device)
    if args.grid < 2:
        raise VaedrawError(f"--grid must be at least 2, got {args.grid}")
    mu = None
    if run.latent_dim != 2:
        test = latent.load_test_split(run, args.data_dir)
        mu, _ = latent.encoder_means(run, test.images, test.labels, args.n)
    digit = args.digit if args.digit is not None else (0 if run.conditional else None)
    x = latent.manifold(run, args.grid, mu, digit)
    plots.save_manifold(x, args.grid, args.out)
    plane = "the latent plane" if mu is None else "the two leading principal directions of the test means"
    print(f"vaedraw: {args.grid}x{args.grid} manifold over {plane} -> {args.out}")
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the web explorer: sliders, drawing canvas, latent map")
    _add_run(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", help="folder with the dataset's IDX files (for the latent map)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from . import web
    from .run import load_run

    run = load_run(args.run_dir, args.device)
    web.serve(run, host=args.host, port=args.port, data_dir=args.data_dir)
    return 0


COMMANDS = [add_train, add_sample, add_reconstruct, add_fit_gmm, add_eval, add_interpolate, add_latent_map,
            add_manifold, add_serve]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="vaedraw", description="Teach a VAE to draw handwritten digits, then draw new ones.")
    parser.add_argument("--version", action="version", version=f"vaedraw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given, for command.txt
    try:
        return args.func(args)
    except VaedrawError as e:
        print(f"vaedraw: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("vaedraw: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
