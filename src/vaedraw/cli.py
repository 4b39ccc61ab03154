"""The `vaedraw` command line: a thin shell over the Python API.

Every user-facing failure is a VaedrawError, printed as one line (`vaedraw: error: ...`) with exit
status 2; an interrupted training run exits with 128 + the signal number after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import PRESETS, build_config, parse_set
from .errors import VaedrawError


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
    from .train import train

    overrides = train_overrides(args)
    cfg = build_config(args.preset or "default", args.config, overrides)
    given = bool(overrides or args.config or args.preset or args.epochs)
    out = Path(args.out or f"runs/{cfg.preset}")
    run_dir = train(cfg, out, device=args.device, data_dir=args.data_dir, resume=args.resume, keep=args.keep,
                    overrides_given=given, progress=not args.no_progress, epochs=args.epochs,
                    argv=["vaedraw", *sys.argv[1:]])
    print(f"vaedraw: run written to {run_dir} (samples.png, curves.png, progress.gif, checkpoint.safetensors)")
    return 0


# ----------------------------------------------------------------------------- sample / reconstruct
def _add_run(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `vaedraw train`")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw new digits from a trained run")
    _add_run(p)
    p.add_argument("-n", type=_positive_int, default=64, help="how many (default 64)")
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

    run = load_run(args.run_dir, args.device)
    y, nrow = None, 0
    if args.digit is not None:
        y, nrow = digit_labels(args.digit, args.n)
    elif run.conditional:
        y, nrow = digit_labels("all", args.n)
    n = args.n if y is None else len(y)
    x = run.sample(n, sampler=args.sampler, seed=args.seed, temperature=args.temperature, y=y)
    plots.save_grid(x, args.out, nrow=nrow or None)
    print(f"vaedraw: {n} samples ({args.sampler or run.config.sample.sampler} sampler) -> {args.out}")
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


COMMANDS = [add_train, add_sample, add_reconstruct, add_fit_gmm]


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
