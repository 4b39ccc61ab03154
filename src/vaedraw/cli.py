"""The `vaedraw` command line: a thin shell over the Python API (it parses, checks outputs, and calls).

Every foreseeable failure is printed as one line (`vaedraw: error: ...`) with a documented exit
status (errors.py: 2 usage, 4 data, 5 checkpoint, 6 a file-system problem on a path, ...); an
interrupted training run exits with 128 + the signal number after saving a checkpoint. Anything else
is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

import torch

from . import errors
from .config import PRESETS, build_config, choices, parse_set, value_range
from .errors import OutputError, VaedrawError
from .outputs import check_output, show, write_outputs


MAX_SAMPLES = 100_000  # one PNG grid of this many digits is already ~8,000 pixels a side
MAX_RECONSTRUCT = 1_000  # the originals sit in one row above their reconstructions
MAX_IWAE_K = 100_000  # importance samples per image; 1,000 is the usual figure and takes minutes already
MAX_JUDGED = 1_000_000  # generated images judged by `eval`
MAX_COMPONENTS = 10_000  # mixture components; each is a full covariance matrix
MAX_TEMPERATURE = 100.0  # prior standard deviations; the decoder has seen codes within a few


def _has_default(action: argparse.Action) -> bool:
    """A default worth printing: not None, not an off switch, not an empty list of repeats."""
    d = action.default
    return not (d is None or d is False or d == [] or d == argparse.SUPPRESS)


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or the text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and _has_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2), no usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(errors.EXIT_USAGE, f"{self.prog}: error: {show(message)} (see {self.prog} --help)\n")


def _whole(text: str, expected: str = "a whole number") -> int:
    """int(text), or the argparse error every whole-number option gives."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole(text)
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


def _seed(text: str) -> int:
    """A random seed: a whole number 0 .. 2^64 - 1 (what a torch generator takes)."""
    value = _whole(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2^64 - 1, got {text}")
    return value


def _temperature(text: str) -> float:
    """A prior temperature: positive, and at most MAX_TEMPERATURE (beyond it codes leave where any image lies)."""
    value = _positive_float(text)
    if value > MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_TEMPERATURE:g} (1 is the prior itself)")
    return value


def _device(text: str) -> str:
    """--device: checked when parsed, so a device that does not exist costs no loading."""
    from .run import resolve_device

    try:
        resolve_device(text)
    except VaedrawError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _class_index(text: str) -> int:
    """A class label (digit) as a whole number >= 0; the run says how many classes it has."""
    value = _whole(text, "a class number such as 3")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a class number 0 or more, got {value}")
    return value


_digit = _class_index  # the pictures commands' --from-digit/--to-digit/--digit


def parse_digits(text: str) -> list[int] | str:
    """'7' -> [7]; '1,2,3' -> [1, 2, 3]; 'all' -> 'all'. The range is checked against the run."""
    if text.strip().lower() == "all":
        return "all"
    try:
        digits = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--digit takes a digit such as 7, a comma list such as 1,4,7, or all; "
                                         f"got {text!r}") from None
    if not digits or any(d < 0 for d in digits):
        raise argparse.ArgumentTypeError(f"--digit takes digits 0 or more, a comma list such as 1,4,7, or all; "
                                         f"got {text!r}")
    return digits


def check_digits(digits: list[int] | str, run) -> list[int]:
    """The classes --digit asks for, checked against the run: 'all' -> every class of the run."""
    spec = digits if digits == "all" else ",".join(map(str, digits))
    if not run.conditional:
        raise VaedrawError(f"--digit {spec}: this run ({run.config.preset} preset) is not conditional: it cannot "
                           "draw a chosen digit; train one with --preset conditional")
    if digits == "all":
        return list(range(run.n_classes))
    bad = [d for d in digits if d >= run.n_classes]
    if bad:
        raise VaedrawError(f"--digit {bad[0]}: this run draws classes 0-{run.n_classes - 1}")
    return list(digits)


def digit_labels(digits: list[int], n: int) -> tuple[torch.Tensor, int, list[int]]:
    """Labels for exactly n images, one row per class, and where each sits in the grid.

    -> (labels [n], row length, grid cells): `cells[i]` is the grid position of image i. When n is
    not a multiple of the number of classes, the first n % k classes get one image more and the
    others' rows end in an empty cell, so every row still shows one class.
    """
    k = len(digits)
    if n < k:
        raise VaedrawError(f"-n {n} is fewer than the {k} digits asked for: ask for at least -n {k}")
    per, extra = divmod(n, k)
    counts = [per + (i < extra) for i in range(k)]
    row = per + (extra > 0)
    labels = torch.tensor([d for d, c in zip(digits, counts) for _ in range(c)])
    cells = [r * row + j for r, c in enumerate(counts) for j in range(c)]
    return labels, row, cells


def _grid_with_gaps(x: torch.Tensor, cells: list[int], row: int) -> torch.Tensor:
    """Place images [n, C, H, W] at grid `cells`; empty cells take the grid's background grey."""
    from .plots import GREY

    rows = -(-(max(cells) + 1) // row)
    out = torch.full((rows * row, *x.shape[1:]), GREY / 255)  # plots.image_grid's canvas
    out[cells] = x
    return out


# ----------------------------------------------------------------------------- train
def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a VAE and write a run directory")
    p.add_argument("--preset", default=None, help=f"named config: {', '.join(PRESETS)} (default: default)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of overrides ([model], [train], ... tables)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set model.latent_dim=2 (repeatable)")
    from .data import DATASETS

    p.add_argument("--dataset", help=" | ".join(DATASETS) + " (default: the preset's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (default: the preset's)")
    g.add_argument("--epochs", type=_positive_float, help="passes over the training set (converted to steps)")
    p.add_argument("--batch-size", type=_positive_int, help="images per optimizer step (default: the preset's)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the preset's)")
    seeds = value_range("train.seed")  # the config's bound: the mixture fit hands the seed to scikit-learn
    p.add_argument("--seed", type=_between(int(seeds.lo), int(seeds.hi), "the training seed"),
                   help=f"random seed, {int(seeds.lo)} to {int(seeds.hi):,} (default: the preset's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="arithmetic of the forward pass; auto picks per device (default: the preset's)")
    p.add_argument("--compile", choices=("auto", "on", "off"),
                   help="torch.compile the step; auto picks per device (default: the preset's)")
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-dir", help="mnist/fashion-mnist: folder with the four IDX files (else $VAEDRAW_DATA_DIR, "
                   "cache, download); folder: a folder of images; array: an .npz/.npy file (docs/DATA.md)")
    p.add_argument("--out", help="run directory (default runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--keep", choices=("stored", "new"),
                   help="on --resume with a differing config: which config to keep")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files into RUN_DIR/tensorboard/ (train.tensorboard=true; "
                        "needs pip install 'vaedraw[tensorboard]')")
    p.add_argument("--nproc", type=_positive_int,
                   help="data-parallel processes on this machine (starts torchrun; one per GPU, or gloo on CPUs)")
    p.set_defaults(func=cmd_train)


def train_overrides(args) -> dict[str, object]:
    """The config changes the command line asks for (named flags, then --set)."""
    named = {"data.dataset": args.dataset, "train.steps": args.steps, "train.batch_size": args.batch_size,
             "train.lr": args.lr, "train.seed": args.seed, "train.precision": args.precision,
             "train.compile": args.compile, "train.tensorboard": True if args.tensorboard else None}
    out: dict[str, object] = {k: v for k, v in named.items() if v is not None}
    out.update(parse_set(args.set))
    return out


def cmd_train(args) -> int:
    from . import distributed
    from .errors import TrainingInterrupted
    from .train import train

    argv = list(getattr(args, "argv", sys.argv[1:]))
    if args.tensorboard:
        from .tracking import require_tensorboard

        require_tensorboard()  # before any work, and before torchrun starts workers
    if args.nproc and args.nproc > 1 and not distributed.launched_by_torchrun():
        return distributed.launch(args.nproc, argv)
    overrides = train_overrides(args)
    cfg = build_config(args.preset or "default", args.config, overrides)  # a bad option fails here, before any work
    # `--resume --steps N` asks for more steps, not for the preset's defaults: the run's stored config with
    # the named changes; a preset or config file given with --resume is compared with the stored config
    requested = None if args.resume and not (args.preset or args.config) else cfg
    try:
        run_dir = train(requested, Path(args.out or f"runs/{cfg.preset}"), device=args.device,
                        data_dir=args.data_dir, resume=args.resume, keep=args.keep, changes=overrides,
                        progress=not args.no_progress, epochs=args.epochs, argv=["vaedraw", *argv])
    except TrainingInterrupted as e:  # a normal way to stop: not an error
        if not distributed.launched_by_torchrun() or os.environ.get("RANK") == "0":
            print(f"vaedraw: {show(str(e))}", file=sys.stderr)
        return e.exit_code
    if distributed.launched_by_torchrun() and os.environ.get("RANK") != "0":
        return 0  # rank 0 speaks for the run
    print(f"vaedraw: run written to {run_dir} (samples.png, curves.png, progress.gif, checkpoint.safetensors)")
    return 0


# ----------------------------------------------------------------------------- sample / reconstruct
def _add_run(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `vaedraw train`")
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw new images from a trained run")
    _add_run(p)
    p.add_argument("-n", type=_between(1, MAX_SAMPLES, "one grid picture; draw more with other --seed values"),
                   default=64, help=f"how many images, at most {MAX_SAMPLES:,}")
    p.add_argument("--out", default="samples.png", help="grid picture (.png)")
    p.add_argument("--npz", help="also write x: uint8 [n, H, W] (grey) or [n, H, W, 3] (colour) = "
                   "round(255 * pixel mean) to this .npz")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the codes drawn")
    p.add_argument("--sampler", choices=choices("sample.sampler"),
                   help="where codes come from (default: the run's preset's best)")
    p.add_argument("--temperature", type=_temperature,
                   help="prior sampler: z ~ N(0, T^2 I) (default: the run's config)")
    p.add_argument("--digit", type=parse_digits,
                   help="conditional runs: a class such as 7, a list 1,4,7, or all (a row per class; default all)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from . import plots
    from .run import load_run
    from .sample import save_npz

    out = check_output(args.out, (".png",), "--out")
    npz = check_output(args.npz, (".npz",), "--npz") if args.npz else None
    run = load_run(args.run_dir, args.device)
    y, nrow, cells = None, 0, None
    if args.digit is not None:
        y, nrow, cells = digit_labels(check_digits(args.digit, run), args.n)
    elif run.conditional:
        classes = list(range(run.n_classes))
        y, nrow, cells = digit_labels(classes[: min(args.n, len(classes))], args.n)
    x = run.sample(args.n, sampler=args.sampler, seed=args.seed, temperature=args.temperature, y=y)
    picture = x if cells is None else _grid_with_gaps(x, cells, nrow)
    todo = [(out, lambda: plots.save_grid(picture, out, nrow=nrow or None), "grid")]
    if npz is not None:
        todo.append((npz, lambda: save_npz(npz, x, **({"y": y.numpy()} if y is not None else {})), "array"))
    write_outputs(todo)
    print(f"vaedraw: {args.n} samples ({args.sampler or run.default_sampler} sampler) -> {show(out)}")
    if npz is not None:
        c, h, w = x.shape[1:]
        print(f"vaedraw: uint8 array x {(args.n, h, w) if c == 1 else (args.n, h, w, c)} -> {show(npz)}")
    return 0


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="test images above, their reconstructions below")
    _add_run(p)
    p.add_argument("-n", type=_between(1, MAX_RECONSTRUCT, "they sit in one row"), default=16,
                   help=f"how many test images, at most {MAX_RECONSTRUCT:,}")
    p.add_argument("--out", default="recon.png", help="picture (.png)")
    p.add_argument("--data-dir", help="the data set's folder or file (default: where the run's data came from)")
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args) -> int:
    from . import data, plots
    from .run import load_run

    out = check_output(args.out, (".png",), "--out")
    run = load_run(args.run_dir, args.device)
    test = run.load_split("test", args.data_dir)
    n = min(args.n, len(test))
    x = data.to_float(test.images[:n])
    y = test.labels[:n] if run.conditional else None
    rec = run.reconstruct(x, y)
    plots.save_grid(torch.cat([x, rec]), out, nrow=n)
    print(f"vaedraw: {n} test images and their reconstructions -> {show(out)}")
    return 0


def add_fit_gmm(sub) -> None:
    p = sub.add_parser("fit-gmm", help="(re)fit the gmm sampler of a run to its training set")
    _add_run(p)
    p.add_argument("--components", type=_between(1, MAX_COMPONENTS, "each is a full covariance matrix"),
                   help=f"mixture size, at most {MAX_COMPONENTS:,} "
                        "(default: the fitted mixture's, else the run's config)")
    p.add_argument("--force", action="store_true", help="allow replacing a mixture with a smaller one")
    p.add_argument("--data-dir", help="the data set's folder or file (default: where the run's data came from)")
    p.set_defaults(func=cmd_fit_gmm)


def cmd_fit_gmm(args) -> int:
    from .errors import CheckpointError
    from .run import load_run
    from .sample import GMM_NAME, GaussianMixture, fit_gmm

    run = load_run(args.run_dir, args.device, with_gmm=False)
    target = check_output(run.run_dir / GMM_NAME, (".safetensors",), "the mixture file")
    old: int | str | None = None
    if target.exists():
        try:
            old = len(GaussianMixture.load(target).weights)
        except CheckpointError:
            old = "unreadable"  # a damaged mixture is what fit-gmm is for
    k = args.components or (old if isinstance(old, int) else run.config.sample.gmm_components)
    if isinstance(old, int) and k < old and not args.force:
        raise VaedrawError(f"{show(target)} has {old} components and --components {k} would replace it with a "
                           "smaller mixture; add --force to do that")
    train = run.load_split("train", args.data_dir)
    if k > len(train):
        raise VaedrawError(f"--components {k:,} is more than the {len(train):,} training codes it is fitted to")
    print(f"vaedraw: fitting a {k}-component mixture to {len(train):,} training codes", flush=True)
    fit_gmm(run.model, train.images, train.labels if run.conditional else None, k, run.config.train.seed, target)
    what = ("new" if old is None else "replaces the unreadable one" if old == "unreadable"
            else f"replaces the {old}-component one")
    print(f"vaedraw: {k}-component mixture ({what}) -> {show(target)}")
    return 0


# ----------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    from .data import SPLITS
    from .evaluate import FD_BOOTSTRAP, MAX_BOOTSTRAP

    p = sub.add_parser("eval", help="likelihood bounds and sample quality of a trained run")
    _add_run(p)
    p.add_argument("--split", choices=SPLITS, default="test", help="images for the likelihood")
    p.add_argument("--iwae-k", type=_between(1, MAX_IWAE_K, "importance samples per image"), default=1000,
                   help=f"importance samples per image, at most {MAX_IWAE_K:,}")
    p.add_argument("-n", "--n-samples", dest="n_samples", type=_between(1, MAX_JUDGED, "generated images judged"),
                   default=10000, help=f"generated images judged, at most {MAX_JUDGED:,}")
    p.add_argument("--n-images", type=_positive_int, help="use only the first N images of the split (default: all)")
    p.add_argument("--sampler", choices=choices("sample.sampler"),
                   help="where codes come from (default: the run's preset's best)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the importance samples, generated images and FD bootstrap")
    p.add_argument("--temperature", type=_temperature,
                   help="sampling temperature of the generated images (default: the run's sample.temperature)")
    p.add_argument("--fd-bootstrap", type=_between(0, MAX_BOOTSTRAP, "bootstrap resamples of the FD"),
                   default=FD_BOOTSTRAP, help="resamples of the generated features behind the FD's 95%% interval "
                                              "(0: no interval)")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto",
                   help="the IWAE pass: auto runs the networks in bfloat16 where the device has it natively "
                        "(log densities stay float32; the bound moves < 0.05 nats, about 2x faster on a CPU); "
                        "fp32 computes everything in float32")
    p.add_argument("--json", metavar="OUT.json", help="also write the figures as JSON")
    p.add_argument("--no-save", dest="save", action="store_false",
                   help="do not record the figures in RUN_DIR/eval.json, which `vaedraw report` reads "
                        "(by default they are recorded there)")
    p.add_argument("--data-dir", help="the data set's folder or file (default: where the run's data came from)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json

    from .checkpoint import atomic_write_text
    from .evaluate import evaluate_run, format_report
    from .run import load_run

    out = check_output(args.json, (".json",), "--json") if args.json else None
    run = load_run(args.run_dir, args.device)
    result = evaluate_run(run, split=args.split, iwae_k=args.iwae_k, n_samples=args.n_samples, sampler=args.sampler,
                          data_dir=args.data_dir, seed=args.seed, n_images=args.n_images,
                          fd_bootstrap=args.fd_bootstrap, precision=args.precision, temperature=args.temperature)
    print(format_report(result))
    if args.save:
        _save_eval(run.run_dir, result)
    if out is not None:
        try:
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise OutputError(f"--json {show(out)}: {e.strerror or e}; the figures are printed above only") from None
        print(f"vaedraw: figures -> {show(out)}")
    return 0


def _save_eval(run_dir: Path, result: dict) -> None:
    """RUN_DIR/eval.json for `vaedraw report`; a run directory that cannot take it costs a warning, not the figures."""
    from .report import eval_path, save_eval

    try:
        print(f"vaedraw: figures -> {show(save_eval(run_dir, result))} (read by `vaedraw report`)")
    except (OSError, VaedrawError) as e:
        reason = (e.strerror or e) if isinstance(e, OSError) else e
        print(f"vaedraw: warning: {show(eval_path(run_dir))} not saved ({reason}); `vaedraw report` reads it, so "
              "keep the figures with --json", file=sys.stderr)


def add_train_evaluator(sub) -> None:
    from .data import DATASETS
    from .evaluator import RECIPE

    p = sub.add_parser("train-evaluator", help="train the classifier that judges a data set's generated images "
                       "(the sample-quality figures of `vaedraw eval`)")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="train on the data this run recorded (else name it with --dataset and --data-dir)")
    p.add_argument("--dataset", help=" | ".join(DATASETS) + " (default: mnist)")
    p.add_argument("--data-dir", help="folder: a folder of images (class subfolders); array: an .npz file with labels; "
                   "mnist/fashion-mnist: the four IDX files (docs/DATA.md)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="data.image_size=N or data.channels=C: how your own images are converted, as given to "
                        "`vaedraw train` (repeatable)")
    p.add_argument("--epochs", type=_between(1, 1000, "passes over the training split"), default=RECIPE["epochs"],
                   help="passes over the training split")
    p.add_argument("--batch-size", type=_positive_int, default=RECIPE["batch_size"], help="images per step")
    p.add_argument("--lr", type=_positive_float, default=RECIPE["lr"], help="Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=_seed, default=RECIPE["seed"], help="seed of weights, batches and shifts")
    p.add_argument("--out", help="weights file (.safetensors; default: the cache, where `vaedraw eval` looks)")
    p.add_argument("--no-progress", action="store_true", help="no line per epoch")
    p.set_defaults(func=cmd_train_evaluator)


def cmd_train_evaluator(args) -> int:
    from .data import Options
    from .evaluator import load_training_data, train_evaluator, weights_path
    from .run import read_data_source

    if args.run_dir is not None and args.dataset is not None:
        raise VaedrawError("give RUN_DIR or --dataset, not both")
    options = {}
    for key, value in parse_set(args.set).items():
        if key not in ("data.image_size", "data.channels"):
            raise VaedrawError(f"--set {key}: train-evaluator takes data.image_size and data.channels only")
        if args.run_dir is not None:
            raise VaedrawError(f"--set {key}: a run's images are converted as it recorded; omit --set")
        try:
            options[key.removeprefix("data.")] = int(value)
        except ValueError:
            raise VaedrawError(f"--set {key}={value}: expected a whole number") from None
    out = check_output(args.out, (".safetensors",), "--out") if args.out else None
    source = None
    if args.run_dir is not None:
        if not Path(args.run_dir).is_dir():
            raise VaedrawError(f"run directory {args.run_dir} does not exist")
        source = read_data_source(Path(args.run_dir))
    dataset = args.dataset or (source["train"].get("dataset") if source else None) or "mnist"
    if out is None and weights_path(dataset).is_file():
        raise VaedrawError(f"vaedraw ships an evaluator for {dataset} ({weights_path(dataset).name}), which "
                           "`vaedraw eval` uses; pass --out FILE to train another one")
    train, test = load_training_data(args.run_dir, dataset, args.data_dir, Options.of(options),
                                     progress=not args.no_progress)
    meta = train_evaluator(train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           out=out, progress=not args.no_progress)
    c, h, w = meta["shape"]
    print(f"vaedraw: evaluator for {dataset} ({meta['n_classes']} classes, {c}x{h}x{w}, {meta['epochs']} epochs): "
          f"test accuracy {meta['test_accuracy']:.4f} on {meta['test_images']:,} images -> {show(meta['out'])}")
    return 0


# ----------------------------------------------------------------------------- report
def add_report(sub) -> None:
    from .report import QUICK_EVAL

    p = sub.add_parser("report", help="one page comparing evaluated runs side by side (markdown or HTML)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories evaluated by `vaedraw eval`")
    p.add_argument("--out", default="report.md", help="the page: .md (pictures linked) or .html (self-contained)")
    g = p.add_argument_group("runs without eval.json")
    g.add_argument("--eval", action="store_true",
                   help="evaluate them first, quickly (sizes below), and save their eval.json")
    g.add_argument("--iwae-k", type=_between(1, MAX_IWAE_K, "importance samples per image"),
                   default=QUICK_EVAL["iwae_k"], help="with --eval: importance samples per image")
    g.add_argument("-n", "--n-samples", dest="n_samples", type=_between(1, MAX_JUDGED, "generated images judged"),
                   default=QUICK_EVAL["n_samples"], help="with --eval: generated images judged")
    g.add_argument("--n-images", type=_positive_int, default=QUICK_EVAL["n_images"],
                   help="with --eval: the first N images of the test split")
    g.add_argument("--device", type=_device, default="auto", help="with --eval: auto | cpu | cuda | cuda:N")
    g.add_argument("--data-dir", help="with --eval: the data set's folder or file (default: the run's record)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .report import KINDS, check_runs, evaluate_missing, write_report

    out = check_output(args.out, KINDS, "--out")
    dirs = [Path(d) for d in args.run_dirs]
    check_runs(dirs, evaluate=args.eval)
    if args.eval:
        for run_dir in evaluate_missing(dirs, device=args.device, data_dir=args.data_dir, iwae_k=args.iwae_k,
                                        n_samples=args.n_samples, n_images=args.n_images):
            print(f"vaedraw: quick evaluation of {show(run_dir)} -> {show(run_dir / 'eval.json')}")
    write_report(dirs, out)
    print(f"vaedraw: report of {len(dirs)} run{'s' * (len(dirs) != 1)} -> {show(out)}")
    return 0


# ----------------------------------------------------------------------------- latent-space pictures
MAX_MAP_POINTS = 100_000  # codes on one latent map: t-SNE on more takes hours, and the scatter is one blot


def _between(lo: int, hi: int, why: str):
    """A whole number in lo..hi (an argparse type), so a size is refused before any loading."""
    def parse(text: str) -> int:
        value = _whole(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo:,} to {hi:,} ({why}), got {value:,}")
        return value
    return parse


def _add_scale(p) -> None:
    from .plots import DEFAULT_SCALE, MAX_SCALE

    p.add_argument("--scale", type=_between(1, MAX_SCALE, "pixels on screen per model pixel"), default=DEFAULT_SCALE,
                   help=f"enlarge pictures N times, nearest neighbour (1..{MAX_SCALE})")


def _labels_of(test) -> torch.Tensor | None:
    """A split's labels, or None for unlabelled data (which has no classes to colour by)."""
    return test.labels if test.n_classes else None


def add_interpolate(sub) -> None:
    from .latent import MAX_FRAMES

    p = sub.add_parser("interpolate", help="decode the path between two test images (linear and spherical)")
    _add_run(p)
    g = p.add_argument_group("endpoints (default: the first test 3 and the first test 8)")
    g.add_argument("--from-index", type=int, help="index of the first test image")
    g.add_argument("--to-index", type=int, help="index of the second test image")
    g.add_argument("--from-digit", type=_digit, help="the first test image of this class")
    g.add_argument("--to-digit", type=_digit, help="the first test image of this class")
    frames = _between(2, MAX_FRAMES, "points on a path, both endpoints included")
    p.add_argument("--frames", type=frames, help=f"points on each path, endpoints included, 2..{MAX_FRAMES:,} "
                   "(default: 10)")
    p.add_argument("--steps", type=frames, dest="old_steps",
                   help="old name of --frames, still read in this release (--steps means optimizer steps elsewhere)")
    p.add_argument("--out", default="interp.png", help="strip: linear row above, spherical row below (.png)")
    p.add_argument("--gif", help="also write an animated GIF (linear | spherical), there and back (.gif)")
    _add_scale(p)
    p.add_argument("--data-dir", help="the data set's folder or file (default: where the run's data came from)")
    p.set_defaults(func=cmd_interpolate)


def _interpolation_frames(args) -> int:
    if args.old_steps is None:
        return 10 if args.frames is None else args.frames
    if args.frames is not None:
        raise VaedrawError("give --frames only (--steps is its old name)")
    print("vaedraw: note: interpolate --steps is now --frames; the old name will be removed in the next release",
          file=sys.stderr)
    return args.old_steps


def cmd_interpolate(args) -> int:
    from . import data, latent, plots
    from .run import load_run

    frames = _interpolation_frames(args)
    if (args.from_index is None) != (args.to_index is None):
        raise VaedrawError("give both --from-index and --to-index")
    if (args.from_index is not None) and (args.from_digit is not None or args.to_digit is not None):
        raise VaedrawError("choose endpoints by --from-index/--to-index or by --from-digit/--to-digit, not both")
    out = check_output(args.out, (".png",), "--out")
    gif = check_output(args.gif, (".gif",), "--gif") if args.gif else None
    run = load_run(args.run_dir, args.device)
    plots.check_picture(2 * frames, run.image_shape[1:], nrow=frames, scale=args.scale)
    test = run.load_split("test", args.data_dir)
    if args.from_index is not None:
        ends = [args.from_index, args.to_index]
        bad = [i for i in ends if not 0 <= i < len(test)]
        if bad:
            raise VaedrawError(f"test image index {bad[0]} is out of range 0..{len(test) - 1}")
    else:
        digits = [3 if args.from_digit is None else args.from_digit, 8 if args.to_digit is None else args.to_digit]
        ends = [latent.first_index_of(test.labels, d) for d in digits]
    x = data.to_float(test.images[ends])
    y0, y1 = (int(test.labels[i]) for i in ends)
    path = latent.interpolate(run, x[0], x[1], frames, y0, y1)
    todo = [(out, lambda: plots.save_strip([path.linear, path.spherical], out, scale=args.scale), "strip")]
    if gif is not None:
        anim = plots.animation_frames([latent.there_and_back(path.linear), latent.there_and_back(path.spherical)],
                                      scale=args.scale)
        todo.append((gif, lambda: plots.save_gif(anim, gif), "animation"))
    write_outputs(todo)
    print(f"vaedraw: test images {ends[0]} ({y0}) -> {ends[1]} ({y1}), {frames} frames, linear and spherical "
          f"-> {show(out)}")
    if gif is not None:
        print(f"vaedraw: animation (linear | spherical), {len(anim)} frames -> {show(gif)}")
    return 0


def add_latent_map(sub) -> None:
    from .latent import PROJECTIONS

    p = sub.add_parser("latent-map", help="test-set encoder means in the plane, coloured by class")
    _add_run(p)
    p.add_argument("--method", choices=PROJECTIONS, default="pca",
                   help="projection for latents larger than 2-d (umap needs umap-learn)")
    p.add_argument("-n", type=_between(1, MAX_MAP_POINTS, "codes on one map"), default=5000,
                   help=f"test images to place, at most {MAX_MAP_POINTS:,}")
    p.add_argument("--out", default="latent_map.png", help="scatter plot (.png)")
    p.add_argument("--seed", type=_between(0, 2**32 - 1, "seeds of scikit-learn and UMAP"), default=0,
                   help="seed of the t-SNE / UMAP optimisation")
    p.add_argument("--data-dir", help="the data set's folder or file (default: where the run's data came from)")
    p.set_defaults(func=cmd_latent_map)


def cmd_latent_map(args) -> int:
    from . import latent, plots
    from .run import load_run
    from .sample import encode_means

    out = check_output(args.out, (".png",), "--out")
    run = load_run(args.run_dir, args.device)
    test = run.load_split("test", args.data_dir)
    n = min(args.n, len(test))
    labels = _labels_of(test)
    mu = encode_means(run.model, test.images[:n], test.labels[:n])
    proj = latent.Projection.fit(mu, args.method, args.seed)
    names = {"plane": ("z1", "z2"), "pca": ("PC 1", "PC 2")}.get(proj.method, (f"{proj.method} 1", f"{proj.method} 2"))
    what = "the latent plane" if proj.method == "plane" else f"{proj.method} of the {run.latent_dim}-d means"
    plots.plot_latent_map(proj.points, None if labels is None else labels[:n].numpy(), out, axis_names=names,
                          title=f"{run.config.preset}: {n} test encoder means, {what}", legend_title="label")
    print(f"vaedraw: {n} test codes ({what}) -> {show(out)}")
    return 0


def add_manifold(sub) -> None:
    from .latent import MAX_GRID, MIN_GRID, SPACINGS

    p = sub.add_parser("manifold", help="decode a grid over a latent plane, spanning where the test codes lie")
    _add_run(p)
    p.add_argument("--grid", type=_between(MIN_GRID, MAX_GRID, "images a side; each is one decode"), default=20,
                   help=f"images per side, {MIN_GRID}..{MAX_GRID}")
    p.add_argument("--spacing", choices=SPACINGS, default="data",
                   help="data: the test codes' 1%%..99%% quantiles on each axis; prior: the normal's 5%%..95%%")
    p.add_argument("--out", default="manifold.png", help="picture (.png)")
    _add_scale(p)
    p.add_argument("--digit", type=_digit, help="conditional runs: the class to draw (default: 0)")
    p.add_argument("-n", type=_between(1, MAX_MAP_POINTS, "codes that place the grid"), default=5000,
                   help=f"test images whose means place the plane and its extent, at most {MAX_MAP_POINTS:,}")
    p.add_argument("--data-dir", help="the data set's folder or file (default: where the run's data came from)")
    p.set_defaults(func=cmd_manifold)


def cmd_manifold(args) -> int:
    from . import latent, plots
    from .run import load_run
    from .sample import encode_means

    out = check_output(args.out, (".png",), "--out")
    run = load_run(args.run_dir, args.device)
    digit = None
    if args.digit is not None:
        digit = check_digits([args.digit], run)[0]
    elif run.conditional:
        digit = 0
    plots.check_picture(args.grid ** 2, run.image_shape[1:], nrow=args.grid, pad=0, scale=args.scale)
    mu = None
    if run.latent_dim != 2 or args.spacing == "data":
        test = run.load_split("test", args.data_dir)
        n = min(args.n, len(test))
        mu = encode_means(run.model, test.images[:n], test.labels[:n])
    x = latent.manifold(run, args.grid, mu, digit, args.spacing)
    plots.save_manifold(x, args.grid, out, scale=args.scale)
    plane = "the latent plane" if run.latent_dim == 2 else "the two leading principal directions of the test means"
    extent = "the test codes' 1%..99% quantiles" if args.spacing == "data" else "the prior's 5%..95% quantiles"
    print(f"vaedraw: {args.grid}x{args.grid} manifold over {plane}, spanning {extent} -> {show(out)}")
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="the web explorer: sliders, drawing canvas, latent map")
    _add_run(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; '', 0.0.0.0 or :: = every "
                        "interface, which needs --allow-remote)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host that other machines can reach (the explorer has no login)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a further host name the page may be opened under, e.g. this machine's DNS name "
                        "(repeatable; requests naming any other host are refused)")
    p.add_argument("--data-dir", help="folder with the dataset's files (for the latent map and interpolation)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from . import web
    from .run import load_run

    sock = web.open_socket(args.host, args.port, args.allow_remote)  # a busy port fails before the model loads
    try:
        run = load_run(args.run_dir, args.device)
        test = run.load_split("test", args.data_dir)
        web.serve(run, host=args.host, port=args.port, allow_remote=args.allow_remote,
                  allow_hosts=tuple(args.allow_host), sock=sock, test=test)
    finally:
        sock.close()
    return 0


# ----------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write the decoder and encoder as ONNX graphs, for clients without PyTorch")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `vaedraw train`")
    p.add_argument("--onnx", metavar="OUT_DIR", required=True,
                   help="folder for decoder.onnx, encoder.onnx and model.json (docs/EXPORT.md; needs "
                        "pip install 'vaedraw[onnx]')")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import check_out_dir, export_run, require_onnx
    from .run import load_run

    require_onnx()
    out = check_out_dir(args.onnx)
    run = load_run(args.run_dir, "cpu")  # graphs are traced on the CPU in float32, whatever trained them
    export_run(run, out)
    cond = ", label" if run.conditional else ""
    lower = f", eps_0..eps_{len(run.model.lower_shapes) - 1}" if run.model.lower_shapes else ""
    print(f"vaedraw: decoder (code{cond}{lower} -> pixel means), encoder (image{cond} -> mu, logvar) and "
          f"model.json -> {show(out)}")
    return 0


COMMANDS = [add_train, add_sample, add_reconstruct, add_fit_gmm, add_eval, add_train_evaluator, add_interpolate,
            add_latent_map, add_manifold, add_serve, add_export, add_report]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="vaedraw", description="Teach a VAE to draw handwritten digits, then draw new ones.")
    parser.add_argument("--version", action="version", version=f"vaedraw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


_OS_HINTS = {
    errno.ENOSPC: "no space left on the device; free some or write elsewhere",
    errno.EDQUOT: "over the disk quota; free some or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "a folder where a file belongs",
    errno.ENOTDIR: "a file where a folder belongs",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def _os_message(e: OSError) -> str:
    """An OSError as one line that names its path(s) and what to do."""
    names = " -> ".join(show(f) for f in (e.filename, e.filename2) if f is not None)
    reason = _OS_HINTS.get(e.errno) or e.strerror or str(e)
    return f"{names}: {reason}" if names else f"{reason} ({e})"


def _fail(message: str, code: int) -> int:
    print(f"vaedraw: error: {show(message)}", file=sys.stderr)
    return code


def _printable_streams() -> None:
    """A terminal or log that cannot show a character gets an escape, never a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass  # not a text stream that can be reconfigured (a test's capture, a closed stream)


def main(argv: list[str] | None = None) -> int:
    _printable_streams()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line as given, for command.txt
    try:
        return args.func(args)
    except VaedrawError as e:
        return _fail(str(e), getattr(e, "exit_code", errors.EXIT_USAGE))
    except BrokenPipeError:  # `vaedraw eval ... | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")
        return errors.EXIT_SIGNAL_BASE + 13
    except OSError as e:
        return _fail(_os_message(e), errors.EXIT_OUTPUT)
    except UnicodeDecodeError as e:
        return _fail(f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8", errors.EXIT_USAGE)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        return _fail("out of memory; ask for fewer images (-n), a smaller batch (--batch-size) or another --device",
                     errors.EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("stopped (Ctrl-C); no file was left half-written", errors.EXIT_SIGNAL_BASE + 2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
