"""MNIST and Fashion-MNIST: the four IDX files of each, found, fetched and checked, and the bundled subset.

`load_mnist_format("mnist", "train")` returns a `Split` of images uint8 [N, 28, 28] and labels int64
[N]. The files are read from the first of these places that applies:

1. a folder the user names (`data_dir`, else `$VAEDRAW_DATA_DIR`) holding the four standard IDX
   files, gzipped or not; if it is named but unusable that is an error, never a silent fallback;
2. the cache, `default_cache_dir()/<dataset>/`, whose files are checked against the official md5s;
3. for Fashion-MNIST, the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist);
4. a download from the public mirrors (or `$VAEDRAW_MIRRORS`), md5-verified, written atomically.

When MNIST cannot be had at all (offline), a bundled 10,000-digit subset of the official training
set is used instead (9,000 train / 1,000 test, see docs/DATA.md) and one note says so on stderr.
The subset is recognised by its pixels wherever it is stored, so a split made of it always says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from vaedraw.data import download as dl
from vaedraw.data.idx import read_idx
from vaedraw.data.spec import Split, default_cache_dir
from vaedraw.errors import DataError

SHAPE, N_CLASSES = (1, 28, 28), 10  # every MNIST-format data set: 28x28 grey, ten classes

# (images, labels) base names; on disk each may also carry a .gz suffix.
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 and size in bytes of the official .gz files, as published with the data sets.
_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_SIZES = {
    "mnist": {"train-images-idx3-ubyte": 9_912_422, "train-labels-idx1-ubyte": 28_881,
              "t10k-images-idx3-ubyte": 1_648_877, "t10k-labels-idx1-ubyte": 4_542},
    "fashion-mnist": {"train-images-idx3-ubyte": 26_421_880, "train-labels-idx1-ubyte": 29_515,
                      "t10k-images-idx3-ubyte": 4_422_102, "t10k-labels-idx1-ubyte": 5_148},
}
_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
# Debian recompresses these files, so their .gz md5s differ from the official ones; they are
# checked by structure (magic, dims, counts) like a user's own folder.
_SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}

_BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
_BUNDLED_MD5 = {
    "mnist-subset-train-images.idx3.gz": "2f1f0881a41c78f18f5e2dfead101161",
    "mnist-subset-train-labels.idx1.gz": "d201aaf0ac2ae20fc1e95e9232efcd7e",
    "mnist-subset-test-images.idx3.gz": "ee0e4c2779e10e1e23ffd504bec62013",
    "mnist-subset-test-labels.idx1.gz": "42d369c2565d7e4c3480be4bb3cefaa7",
}
# (count, md5 of the uint8 pixels) of each part, to recognise the subset in any folder.
_BUNDLED_IMAGES_MD5 = {"train": (9_000, "ce7ba3e89481c254f9c9dd2e40afdfe0"),
                       "test": (1_000, "48a77840b9228e4074c4d3eb642a5b8b")}
_SUBSET_NOTE = (
    "vaedraw: note: MNIST could not be downloaded ({reason}); using the bundled 10,000-digit subset "
    "(9,000 train / 1,000 test). For the full set, connect to the internet or pass --data-dir / "
    "set VAEDRAW_DATA_DIR to a folder with the four MNIST files."
)

# Per-process state. Tests reset it with _reset_state().
_memo: dict[tuple, Split] = {}  # (dataset, split, source, folder, files and their stat) -> parsed split
_md5_memo: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> md5, so each file is hashed once
_download_failed: dict[tuple, str] = {}  # (dataset, cache dir, mirrors) -> why, so train+test fail once
_subset_noted = False


def _md5(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _md5_memo:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _md5_memo[key] = digest.hexdigest()
    return _md5_memo[key]


def _find(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _from_named_dir(folder: Path, split: str) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; fix --data-dir / VAEDRAW_DATA_DIR or leave it unset.")
    found = [_find(folder, base) for base in _FILES[split]]
    missing = [base for base, path in zip(_FILES[split], found) if path is None]
    if missing:
        raise DataError(
            f"data folder {folder} lacks {', '.join(missing)} (gzipped or not); it needs the four "
            f"standard files {', '.join(b for pair in _FILES.values() for b in pair)}."
        )
    return found[0], found[1]  # type: ignore[return-value]


def _cached_ok(path: Path, md5: str) -> bool:
    """True if `path` exists with the right md5 (hashed once per process); a bad copy is deleted."""
    if not path.is_file():
        return False
    if _md5(path) == md5:
        return True
    with contextlib.suppress(OSError):  # a read-only cache is reported when the download writes
        path.unlink(missing_ok=True)  # corrupt or partial: fetch it again
    return False


def _mirrors(dataset: str) -> tuple[str, ...]:
    env = os.environ.get("VAEDRAW_MIRRORS", "")
    bases = tuple(b.strip() for b in env.split(",") if b.strip()) or _MIRRORS[dataset]
    return tuple(b if b.endswith("/") else b + "/" for b in bases)


def _fetch(dataset: str, split: str, download: bool, progress: bool) -> tuple[tuple[Path, Path], str] | str:
    """(files, source) from the cache, a system folder or the mirrors; on failure, a short reason why."""
    cache = default_cache_dir() / dataset
    md5s = _MD5[dataset]
    files = (cache / f"{_FILES[split][0]}.gz", cache / f"{_FILES[split][1]}.gz")
    if all(_cached_ok(cache / f"{b}.gz", md5s[b]) for b in _FILES[split]):
        return files, "cache"
    for folder in _SYSTEM_DIRS.get(dataset, ()):
        found = [_find(folder, b) for b in _FILES[split]]
        if all(found):
            return (found[0], found[1]), "system"  # type: ignore[return-value]
    if not download:
        return "downloads are turned off"
    mirrors = _mirrors(dataset)
    key = (dataset, str(cache), mirrors)
    if key in _download_failed:
        return _download_failed[key]
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise dl.unwritable(cache, e) from e
    for base in _FILES[split]:
        dest = cache / f"{base}.gz"
        if _cached_ok(dest, md5s[base]):
            continue
        try:
            dl.download_file([m + dest.name for m in mirrors], dest, md5s[base], size=_SIZES[dataset][base],
                             progress=progress)
        except dl.CacheUnwritable:
            raise
        except DataError as e:
            last = str(e).split("; ")[-1]
            _download_failed[key] = f"{len(mirrors)} mirror(s) tried, last: {last}"
            return _download_failed[key]
    return files, "download"


def _bundled(split: str) -> tuple[Path, Path]:
    paths = []
    for kind in ("images.idx3", "labels.idx1"):
        path = _BUNDLED_DIR / f"mnist-subset-{split}-{kind}.gz"
        if not path.is_file() or _md5(path) != _BUNDLED_MD5[path.name]:
            raise DataError(f"{path}: the bundled MNIST subset is missing or damaged; reinstall vaedraw.")
        paths.append(path)
    return paths[0], paths[1]


def _parse(images_path: Path, labels_path: Path, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim == 1:
        raise DataError(f"{images_path}: holds labels (magic 0x801) where images were expected.")
    if images.ndim != 3:
        raise DataError(f"{images_path}: holds colour images (magic 0x804); MNIST-format data sets are grey.")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: holds images (magic 0x803) where labels were expected.")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images):,} images but {labels_path} has {len(labels):,} labels.")
    if len(images) == 0:
        raise DataError(f"{images_path}: holds 0 images; a split needs at least one. Fetch the file again.")
    if labels.max() >= n_classes:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0..{n_classes - 1}.")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _is_subset(split: str, images: torch.Tensor) -> bool:
    """True when `images` are the bundled subset's, however they were stored (copied, re-gzipped, unpacked)."""
    want = _BUNDLED_IMAGES_MD5.get(split)
    if want is None or images.shape != (want[0], *SHAPE[1:]):
        return False
    return hashlib.md5(images.numpy().tobytes()).hexdigest() == want[1]


def _split_from_files(dataset: str, split: str, files: tuple[Path, Path], source: str, folder: Path | None) -> Split:
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (dataset, split, source, str(folder), *stats)
    if key not in _memo:
        parsed = next((m for k, m in _memo.items() if k[:2] == key[:2] and k[4:] == stats), None)
        if parsed is None:  # not even reached another way (cache now, download before)
            images, labels = _parse(files[0], files[1], N_CLASSES)
            subset = dataset == "mnist" and (source == "bundled" or _is_subset(split, images))
        else:
            images, labels, subset = parsed.images, parsed.labels, parsed.provenance["subset"]
        provenance = {"dataset": dataset, "split": split, "source": source,
                      "path": str(folder) if folder is not None else None,
                      "files": {p.name: _md5(p) for p in files}, "subset": subset}
        name = f"{dataset}-subset/{split}" if subset else f"{dataset}/{split}"
        _memo[key] = Split(images, labels, name, SHAPE, N_CLASSES, provenance)
    return _memo[key]


def _bundled_split(split: str) -> Split:
    return _split_from_files("mnist", split, _bundled(split), "bundled", None)


def load_mnist_format(dataset: str, split: str, data_dir: str | Path | None = None, *, download: bool = True,
                      progress: bool = True) -> Split:
    """The loader of the MNIST-format data sets: the named folder, the cache, a system folder, the mirrors."""
    global _subset_noted
    named = data_dir if data_dir is not None else os.environ.get("VAEDRAW_DATA_DIR") or None
    if named is not None:
        folder = Path(named).expanduser()
        return _split_from_files(dataset, split, _from_named_dir(folder, split), "folder", folder)
    got = _fetch(dataset, split, download, progress)
    if not isinstance(got, str):
        files, source = got
        return _split_from_files(dataset, split, files, source, files[0].parent)
    if dataset != "mnist":
        raise DataError(
            f"{dataset} could not be found or downloaded ({got}). Install it with "
            f"`apt-get install dataset-fashion-mnist`, or pass --data-dir / set VAEDRAW_DATA_DIR "
            "to a folder with its four IDX files."
        )
    split_ = _bundled_split(split)
    if not _subset_noted:
        print(_SUBSET_NOTE.format(reason=got), file=sys.stderr)
        _subset_noted = True
    return split_


def reload(prov: dict, split: str, progress: bool = True) -> Split | str:
    """The split from where a run found it (`prov` is its recorded provenance); a reason when it is not there."""
    dataset, source = prov["dataset"], prov["source"]
    try:
        if source == "bundled":
            return _bundled_split(split)
        if source == "folder":
            folder = Path(prov.get("path") or "")
            return _split_from_files(dataset, split, _from_named_dir(folder, split), "folder", folder)
        if source == "system":
            for folder in _SYSTEM_DIRS.get(dataset, ()):
                images, labels = (_find(folder, b) for b in _FILES[split])
                if images is not None and labels is not None:
                    return _split_from_files(dataset, split, (images, labels), "system", folder)
            return "the system folder no longer holds them"
        got = _fetch(dataset, split, True, progress)  # cache or download: the official files, fetched again if need be
        if isinstance(got, str):
            return f"they are not in the cache and could not be downloaded ({got})"
        return _split_from_files(dataset, split, got[0], got[1], got[0][0].parent)
    except dl.CacheUnwritable:
        raise
    except DataError as e:
        return str(e)


def _reset_state() -> None:
    global _subset_noted
    _memo.clear()
    _md5_memo.clear()
    _download_failed.clear()
    _subset_noted = False
