"""The data set registry: which data sets there are, loading a split of one, and a run's data provenance.

A data set is a `DatasetSpec`: its name, image shape (C, H, W), class count (0 = unlabelled), a
loader `loader(split, data_dir, *, download, progress) -> Split` and the pixel model that suits it
(the default likelihood and binarization). The user's own images (`folder`, `array`) have neither
shape nor class count until they are loaded; their loaders take the conversion `options` too.
`DATASETS` maps names to specs; adding a data set is one file with a loader plus one `register(...)`
line below. Every loaded `Split` carries its shape, classes
and provenance, so a run can record what it was trained on and every later command can insist on the
same data (`load_recorded`) and refuse to score a run on its own training images (`overlaps`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from vaedraw.data import arrays, images, mnist, own
from vaedraw.data import download as dl
from vaedraw.data.spec import SOURCES, SPLITS, DatasetSpec, Split
from vaedraw.errors import DataError

DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Make `spec` a choice for `data.dataset` (one line per data set)."""
    DATASETS[spec.name] = spec
    return spec


register(DatasetSpec("mnist", mnist.SHAPE, mnist.N_CLASSES, functools.partial(mnist.load_mnist_format, "mnist"),
                     reload=mnist.reload, description="handwritten digits (LeCun, Cortes and Burges), 60,000 + 10,000"))
register(DatasetSpec("fashion-mnist", mnist.SHAPE, mnist.N_CLASSES,
                     functools.partial(mnist.load_mnist_format, "fashion-mnist"), reload=mnist.reload,
                     description="Zalando's clothing images in MNIST's format, 60,000 + 10,000"))
# The user's own images: 8-bit pixels, modelled as they are (a discretized logistic mixture, no binarization).
register(DatasetSpec("folder", None, None, images.load_folder, own_data=True, likelihood="logistic_mixture",
                     binarize="none",
                     description="a folder of images, --data-dir DIR (class subfolders, optional train/ and test/)"))
register(DatasetSpec("array", None, None, arrays.load_array, own_data=True, likelihood="logistic_mixture",
                     binarize="none",
                     description="uint8 images in an .npz or .npy file, --data-dir FILE"))


# ------------------------------------------------------------------------------------------ loading
def _check_names(dataset: str, split: str) -> None:
    if dataset not in DATASETS:
        ready = [n for n, s in DATASETS.items() if not s.own_data]
        yours = [n for n, s in DATASETS.items() if s.own_data]
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(ready)}"
                        + (f"; or, for your own images, {' or '.join(yours)} with --data-dir." if yours else "."))
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}.")


def _check_split(spec: DatasetSpec, got: Split) -> Split:
    """A loader's result must match its spec (or, for data shaped by their files, its own Split.shape):
    a mismatch is the loader's data, named, not a shape error later."""
    c, h, w = spec.shape if spec.shape is not None else got.shape
    want = (h, w) if c == 1 else (h, w, c)
    if got.images.dtype != torch.uint8 or tuple(got.images.shape[1:]) != want:
        raise DataError(f"{got.name}: images are {got.images.dtype} {tuple(got.images.shape[1:])}, "
                        f"expected uint8 {want} for {spec.name}.")
    if len(got) == 0 or got.images.shape[0] != len(got):
        raise DataError(f"{got.name}: {got.images.shape[0]:,} images and {len(got):,} labels; "
                        "a split needs at least one image and one label per image.")
    return got


def load_split(
    dataset: str, split: str, data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True,
    options: object = None,
) -> Split:
    """Load one split of a registered data set (MNIST: images uint8 [60,000 or 10,000, 28, 28], labels int64).

    `options`: how the user's own images are converted (a DataConfig, a dict or `pixels.Options`:
    image_size, channels; None = their own size and channels); the built-in data sets ignore it."""
    _check_names(dataset, split)
    spec = DATASETS[dataset]
    if spec.own_data:
        got = spec.loader(split, data_dir, download=download, progress=progress, options=options)
    else:
        got = spec.loader(split, data_dir, download=download, progress=progress)
    return _check_split(spec, got)


def load_dataset(
    dataset: str, data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True,
    options: object = None,
) -> tuple[Split, Split]:
    """Load (train, test). Both come from the same source: the subset's test digits are official
    training images, so a full train split paired with the subset's test split would leak."""
    train = load_split(dataset, "train", data_dir, download=download, progress=progress, options=options)
    test = load_split(dataset, "test", data_dir, download=download, progress=progress, options=options)
    if train.provenance.get("subset") != test.provenance.get("subset"):
        train, test = mnist._bundled_split("train"), mnist._bundled_split("test")
    return train, test


# --------------------------------------------------------------------------------------- provenance
def _describe(prov: dict) -> str:
    if prov["source"] == "array" or DATASETS[prov["dataset"]].own_data:
        return own.describe(prov)
    what = "the bundled MNIST subset" if prov.get("subset") else f"the {prov['dataset']} files"
    where = {"folder": f" in {prov.get('path')}", "cache": f" in the cache {prov.get('path')}",
             "download": f" downloaded into the cache {prov.get('path')}", "system": f" in {prov.get('path')}",
             "bundled": " shipped with vaedraw"}
    return what + where.get(prov["source"], "")


def _valid_provenance(prov: object, split: str) -> dict:
    keys = {"dataset": str, "split": str, "source": str, "files": dict, "subset": bool}
    if not isinstance(prov, dict) or any(not isinstance(prov.get(k), t) for k, t in keys.items()):
        raise DataError(f"the run's record of its {split} data is damaged or incomplete ({dl.sanitize(prov)}); "
                        "pass --data-dir DIR with the data it was trained on.")
    if prov["dataset"] not in DATASETS or prov["source"] not in SOURCES:
        raise DataError(f"the run was trained on {dl.sanitize(prov['dataset'])!r} from "
                        f"{dl.sanitize(prov['source'])!r}, which this vaedraw does not know.")
    return prov


def _same_files(got: Split, prov: dict) -> bool:
    return sorted(got.provenance.get("files", {}).values()) == sorted(prov["files"].values())


def _from_recorded_source(prov: dict, split: str, progress: bool) -> Split | str:
    """The split from where the run found it; a reason string when it is not there any more."""
    spec = DATASETS[prov["dataset"]]
    if spec.reload is not None:
        return spec.reload(prov, split, progress)
    try:
        return load_split(spec.name, split, None, progress=progress)
    except DataError as e:
        return str(e)


def load_recorded(provenance: dict, split: str, data_dir: str | Path | None = None, *,
                  progress: bool = True) -> Split:
    """Load the split a run was trained with, or raise a DataError saying which data it needs.

    `provenance` is the `Split.provenance` the run recorded. With `data_dir`, the split is read from
    that folder and must have the recorded checksums; without it, from where the run found it (the
    same folder, the cache or the mirrors, the bundled subset), then from $VAEDRAW_DATA_DIR if set.
    The user's own images are read from the recorded path (or `data_dir`) with the recorded conversion
    and must decode to the recorded digest.
    """
    prov = _valid_provenance(provenance, split)
    if DATASETS[prov["dataset"]].own_data:  # read again from its path, known by the digest of its pixels
        return own.load_recorded(prov, split, data_dir, progress, load_split)
    needs = f"this run was trained on {_describe(prov)}"
    hint = f"; pass --data-dir {prov['path']}" if prov["source"] == "folder" else \
        "; pass --data-dir DIR with those files"
    if data_dir is not None:
        got = load_split(prov["dataset"], split, data_dir, download=False, progress=progress)
        if not _same_files(got, prov):
            fix = f"pass --data-dir {prov['path']}" if prov["source"] == "folder" else "omit --data-dir"
            raise DataError(f"{data_dir} holds other {split} files than the run was trained with ({needs}); {fix}.")
        return got
    reasons = []
    got = _from_recorded_source(prov, split, progress)
    if isinstance(got, Split) and _same_files(got, prov):
        return got
    reasons.append(got if isinstance(got, str) else "the files there have changed")
    env = os.environ.get("VAEDRAW_DATA_DIR")
    if env:
        try:
            from_env = load_split(prov["dataset"], split, env, download=False, progress=progress)
            if _same_files(from_env, prov):
                return from_env
            reasons.append(f"VAEDRAW_DATA_DIR={env} holds other files")
        except DataError as e:
            reasons.append(str(e))
    raise DataError(f"{needs}{hint} ({dl.sanitize('; '.join(reasons), 400)}).")


def overlaps(train_prov: dict, eval_prov: dict) -> bool:
    """True when the evaluation split may contain images the run was trained on.

    The bundled subset is official MNIST *training* images 0..8,999 (its train part) and
    9,000..9,999 (its test part). So the subset's test part overlaps any full MNIST training set
    (a run trained on the full files and evaluated on the subset), but not the subset's own train
    part; the official test files overlap no training set. Any "train" split of the same data set,
    and any files with the same checksums as the training files, count as overlapping.
    """
    if train_prov.get("dataset") != eval_prov.get("dataset"):
        return False
    if set(train_prov.get("files", {}).values()) & set(eval_prov.get("files", {}).values()):
        return True
    if eval_prov.get("split") == "train":
        return True
    return bool(eval_prov.get("subset")) and not train_prov.get("subset")


def _reset_state() -> None:
    """Forget everything this process learned (memo, hashes, dead hosts, notes); for tests."""
    mnist._reset_state()
    images._reset_state()
    arrays._reset_state()
    own._reset_state()
    dl._dead_hosts.clear()
