"""A folder of the user's images as a data set (`--dataset folder --data-dir DIR`).

Layout (torchvision's ImageFolder convention):

- `DIR/<class>/...`: one level of subfolders gives the labels, classes numbered in the sorted order of
  their names; files deeper inside a class folder belong to it. Images directly in DIR (no subfolders)
  are unlabelled. A single class folder is unlabelled too (a note says so): one label teaches nothing;
- `DIR/train/` and `DIR/test/` (both): the given split, each laid out as above (the test split's class
  folders must be among the training split's); otherwise a fixed test split is held out (`own.held_out`).

Images are the files whose extension Pillow opens (PNG, JPEG, BMP, GIF, WebP, TIFF, ...); hidden files
and folders (a leading dot) are left out, and other files are counted in a note. Within a split the
images are in the sorted order of their paths relative to DIR. Symbolic links are followed; a link back
to a folder already read (a loop) is skipped with a note. Files that cannot be decoded are skipped and
counted in a note naming the first; none readable, a decompression bomb, or mixed sizes without
`data.image_size` are errors naming the file.

Decoding (pixels.py) runs in a pool of processes for large folders, and the result is cached (cache.py)
keyed by the files' names, sizes and mtimes and the conversion, so a second run only lists the folder.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from vaedraw.data import cache, own
from vaedraw.data.download import sanitize
from vaedraw.data.pixels import BOMB, Options, decode_files
from vaedraw.data.spec import Split
from vaedraw.errors import DataError

# Extensions of formats Pillow registers but cannot decode here (stubs, or an external program needed).
_NOT_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".mpeg", ".mpg", ".emf", ".wmf", ".eps", ".ps"}
POOL_MIN_FILES = 2_000  # below this the pool's start-up costs more than it saves
CHUNK = 256  # files per task of a worker

_memo: dict[Path, tuple[Split, Split]] = {}  # cache entry -> (train, test), so train and test decode once


def extensions() -> set[str]:
    """Lower-case extensions (with the dot) of the image formats Pillow can open."""
    Image.init()
    return {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN} - _NOT_IMAGES


@dataclass
class Listing:
    """The candidate files of a folder data set, in their defined order."""

    root: Path
    paths: list[str] = field(default_factory=list)  # relative to root, POSIX separators
    labels: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)  # "train" / "test" per file; all "train" when held out
    classes: list[str] = field(default_factory=list)
    split_given: bool = False
    others: list[str] = field(default_factory=list)  # files that are not images by their name
    loops: list[str] = field(default_factory=list)  # folders reached again through a symbolic link
    seen: set[tuple[int, int]] = field(default_factory=set)  # (device, inode) of every folder read

    def stats(self) -> list[tuple[str, int, int]]:
        out, root = [], str(self.root)
        for rel in self.paths:
            try:
                st = os.stat(os.path.join(root, rel))
                out.append((rel, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((rel, -1, -1))  # a broken link: it is skipped as unreadable
        return out


def _root(data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise DataError("--dataset folder needs --data-dir DIR: a folder of images (one subfolder per class, "
                        "optionally inside train/ and test/).")
    root = Path(os.path.abspath(Path(data_dir).expanduser()))
    if not root.exists():
        raise DataError(f"{root} does not exist; pass --data-dir a folder of images.")
    if not root.is_dir():
        hint = " (for an .npz or .npy file use --dataset array)" if root.suffix.lower() in (".npz", ".npy") else ""
        raise DataError(f"{root} is not a folder; --dataset folder reads a folder of images{hint}.")
    return root


def _subfolders(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot read the folder {folder} ({e.strerror}); fix its permissions.") from None


def _walk(top: Path, root: Path, exts: set[str], listing: Listing) -> list[str]:
    """Image files under `top` (paths relative to `root`), following links but never a folder twice."""
    def refuse(e: OSError) -> None:
        raise DataError(f"cannot read the folder {e.filename} ({e.strerror}); fix its permissions or move it "
                        f"out of {root}.")

    found, seen = [], listing.seen
    for folder in (root, top):
        st = os.stat(folder)
        seen.add((st.st_dev, st.st_ino))
    for dirpath, dirnames, filenames in os.walk(top, onerror=refuse, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:
                continue  # a broken link to a folder: nothing to read
            if (st.st_dev, st.st_ino) in seen:
                listing.loops.append(os.path.join(dirpath, d))
                continue
            seen.add((st.st_dev, st.st_ino))
            keep.append(d)
        dirnames[:] = keep
        prefix = os.path.relpath(dirpath, root).replace(os.sep, "/") + "/"  # string work: 60,000 files add up
        for name in filenames:
            if name.startswith("."):
                continue
            (found if os.path.splitext(name)[1].lower() in exts else listing.others).append(prefix + name)
    return sorted(found)


def _list_part(folder: Path, listing: Listing, exts: set[str], part: str) -> list[str]:
    """Add one split's files to `listing`; returns its class folder names ([] when unlabelled)."""
    classes = _subfolders(folder)
    if part == "test" and listing.classes:
        stray = [c for c in classes if c not in listing.classes]
        if stray:
            raise DataError(f"{folder / stray[0]}: a class folder that {listing.root / 'train'} does not have "
                            f"(its classes: {', '.join(listing.classes)}); rename it or add it to train/.")
        numbers = {c: i for i, c in enumerate(listing.classes)}
    elif part == "test" and classes:
        raise DataError(f"{folder / classes[0]}: test/ has class folders but {listing.root / 'train'} has none; "
                        "lay both out alike.")
    else:
        numbers = {c: i for i, c in enumerate(classes)}
    if not classes:
        files = _walk(folder, listing.root, exts, listing)
        if part == "test" and listing.classes and files:
            raise DataError(f"{listing.root / files[0]}: {folder} has no class folders but train/ has; put the "
                            "test images into the same class folders.")
        listing.paths += files
        listing.labels += [0] * len(files)
        listing.parts += [part] * len(files)
        return []
    loose = [n for n in os.listdir(folder) if not n.startswith(".") and (folder / n).is_file()
             and os.path.splitext(n)[1].lower() in exts]
    if loose:
        raise DataError(f"{folder / sorted(loose)[0]}: an image beside the class folders of {folder}; move it into "
                        "a class folder (or remove the folders for unlabelled images).")
    for c in classes:
        files = _walk(folder / c, listing.root, exts, listing)
        if not files and part == "train":
            raise DataError(f"{folder / c}: a class folder without images; add images or remove it "
                            "(it would still take a class number).")
        listing.paths += files
        listing.labels += [numbers[c]] * len(files)
        listing.parts += [part] * len(files)
    return classes


def scan(root: Path) -> Listing:
    """The layout of `root` (module docstring) and its image files in their defined order."""
    listing, exts = Listing(root), extensions()
    top = _subfolders(root)
    if "train" in top and "test" in top:
        listing.split_given = True
        listing.classes = _list_part(root / "train", listing, exts, "train")
        _list_part(root / "test", listing, exts, "test")
    elif "train" in top or "test" in top:
        have, lack = ("train", "test") if "train" in top else ("test", "train")
        raise DataError(f"{root} has {have}/ but no {lack}/: add {lack}/ for a given split, or rename {have}/ "
                        "if it is a class.")
    else:
        listing.classes = _list_part(root, listing, exts, "train")
    if not listing.paths:
        other = f"; it has {len(listing.others):,} other files (first: {root / listing.others[0]})" \
            if listing.others else ""
        raise DataError(f"{root} holds no image files (PNG, JPEG, BMP, GIF, WebP, TIFF, ... by their "
                        f"extension){other}. Pass --data-dir a folder of images.")
    return listing


# ----------------------------------------------------------------------------------------- decoding
def _first_shape(root: Path, paths: list[str], opts: Options) -> tuple[int, int, int] | None:
    """(C, H, W) the decoded images will have, from the first file whose header reads (for the memory check)."""
    for rel in paths[:50]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decoding reports it, named
                img = Image.open(root / rel)
            with img:
                w, h = img.size
                grey = img.mode in ("1", "L", "LA", "La", "I", "F") or img.mode.startswith("I;16")
        except Exception:  # noqa: BLE001 - unreadable: decoding reports it
            continue
        c = opts.channels or (1 if grey else 3)
        return (c, opts.image_size, opts.image_size) if opts.image_size else (c, h, w)
    return None


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def _decoded(root: Path, paths: list[str], opts: Options) -> Iterator[Iterator[list[np.ndarray | str]]]:
    """Per chunk of CHUNK files, in order: each file's pixels or why it cannot be read. The pool of
    processes (os.sched_getaffinity workers) is shut down when the block ends, also on an error."""
    full = [str(root / p) for p in paths]
    chunks = [full[i:i + CHUNK] for i in range(0, len(full), CHUNK)]
    workers = min(_workers(), len(chunks))
    if len(paths) < POOL_MIN_FILES or workers < 2:
        yield (decode_files(chunk, opts) for chunk in chunks)
        return
    # fork starts workers in milliseconds without importing anything again; they only run Pillow and numpy
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            results = pool.map(decode_files, chunks, repeat(opts))
        yield results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Images:
    """The decoded images of a folder, gathered into one preallocated uint8 array as they arrive."""

    def __init__(self, root: Path, n: int, opts: Options):
        self.root, self.n, self.opts = root, n, opts
        self.out: np.ndarray | None = None  # [n, H, W] or [n, H, W, 3]; the first k rows are filled
        self.k = 0
        self.first = ""  # the file that set the size

    def add(self, rel: str, a: np.ndarray) -> None:
        """One image, uint8 [H, W] or [H, W, 3] (data.channels=0 gives grey images as [H, W])."""
        out, root = self.out, self.root
        if out is None:
            colour = self.opts.channels == 3 or a.ndim == 3
            own.check_fits(self.n, (3 if colour else 1, *a.shape[:2]), str(root))
            out = self.out = np.empty((self.n, *a.shape[:2], 3) if colour else (self.n, *a.shape[:2]), np.uint8)
            self.first = rel
        if a.shape[:2] != out.shape[1:3]:
            raise DataError(f"{root / rel} is {a.shape[1]}x{a.shape[0]} pixels but {root / self.first} is "
                            f"{out.shape[2]}x{out.shape[1]}; set data.image_size (e.g. --set data.image_size="
                            f"{min(out.shape[1:3])}) to resize every image to one square size.")
        if a.ndim == 3 and out.ndim == 3:  # the first colour image of data.channels=0: RGB from here on
            own.check_fits(self.n, (3, *out.shape[1:3]), str(root))
            grey, out = out, np.empty((*out.shape, 3), np.uint8)
            out[:self.k] = grey[:self.k, ..., None]
            self.out = out
        out[self.k] = a[..., None] if a.ndim == 2 and out.ndim == 4 else a
        self.k += 1


def decode(listing: Listing, opts: Options, progress: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """(uint8 images [n, H, W(, 3)] of the readable files, bool [N] readable, [(path, reason)] skipped)."""
    from vaedraw.progress import Progress

    root, paths = listing.root, listing.paths
    shape = _first_shape(root, paths, opts)
    if shape is not None:  # refuse before decoding anything
        own.check_fits(len(paths), shape, str(root))
    images = _Images(root, len(paths), opts)
    ok = np.zeros(len(paths), dtype=bool)
    skipped: list[tuple[str, str]] = []
    bar = Progress(len(paths), "decoding images", "files", enabled=progress and len(paths) >= POOL_MIN_FILES)
    i = 0
    try:
        with _decoded(root, paths, opts) as chunks:
            for chunk in chunks:
                for a in chunk:
                    if isinstance(a, str) and a.startswith(BOMB):
                        raise DataError(f"{root / paths[i]}: {sanitize(a, 300)}. It is far larger than a "
                                        "training image; shrink or remove it.")
                    if isinstance(a, str):
                        skipped.append((paths[i], a))
                    else:
                        images.add(paths[i], a)
                        ok[i] = True
                    i += 1
                bar.update(len(chunk))
    finally:
        bar.close()
    if images.out is None:
        rel, why = skipped[0]
        raise DataError(f"{root}: none of its {len(paths):,} image files could be read (first: {root / rel}: "
                        f"{sanitize(why, 200)}); check that they are images Pillow reads.")
    return images.out[:images.k], ok, skipped


# ------------------------------------------------------------------------------------------ loading
def _notes(root: Path, listing: Listing, meta: dict) -> None:
    if meta["skipped"]:
        rel, why = meta["skipped"][0]
        own.note(f"skipped {meta['n_skipped']:,} unreadable file(s) of {len(listing.paths):,} in {root} "
                 f"(first: {root / rel}: {sanitize(why, 200)}).")
    if listing.others:
        own.note(f"ignored {len(listing.others):,} file(s) in {root} that are not images by their name "
                 f"(first: {root / listing.others[0]}).")
    if listing.loops:
        own.note(f"skipped {len(listing.loops):,} symbolic link(s) back to a folder already read "
                 f"(first: {listing.loops[0]}).")
    if len(meta["classes"]) == 1:
        own.note(f"{root} has one class folder ({meta['classes'][0]}): its images are read as unlabelled "
                 "(model.n_classes must stay 0); add a second class folder for a conditional model.")


def _splits(listing: Listing, opts: Options, progress: bool) -> tuple[Split, Split]:
    root = listing.root
    entry = cache.entry(root, opts.as_dict(), listing.stats())
    if entry in _memo:
        return _memo[entry]
    stored = cache.read(entry)
    if stored is not None:
        arrays, meta = stored
    else:
        images, ok, skipped = decode(listing, opts, progress)
        labels = np.asarray(listing.labels, dtype=np.int64)[ok]
        parts = np.asarray(listing.parts)[ok]
        test = parts == "test" if listing.split_given else own.held_out(len(images), str(root))
        for name, mask in (("train", ~test), ("test", test)):
            if not mask.any():
                raise DataError(f"{root / name}: none of its images could be read; a split needs at least one.")
        arrays = {"train_images": images[~test], "train_labels": labels[~test],
                  "test_images": images[test], "test_labels": labels[test]}
        meta = {"classes": listing.classes, "skipped": skipped[:20], "n_skipped": len(skipped),
                "digests": {s: own.digest(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in ("train", "test")}}
        cache.write(entry, arrays, meta)
    _notes(root, listing, meta)
    classes = meta["classes"]
    n_classes = len(classes) if len(classes) >= 2 else 0
    base = {"dataset": "folder", "source": "folder", "path": str(root), "options": opts.as_dict(),
            "classes": classes if n_classes else [],
            "layout": "train/ and test/" if listing.split_given else "held out", "n_skipped": meta["n_skipped"]}
    # (one class folder: its labels are all 0 already)
    both = tuple(own.make_split(arrays[f"{s}_images"], arrays[f"{s}_labels"], n_classes, s, base, meta["digests"][s])
                 for s in ("train", "test"))
    _memo.clear()  # one folder at a time: the memo is for the train + test pair of one load
    _memo[entry] = both  # type: ignore[assignment]
    return both  # type: ignore[return-value]


def load_folder(split: str, data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True,
                options: object = None) -> Split:
    """The loader of `--dataset folder`: split "train" or "test" of the images in `data_dir` (module docstring),
    uint8 [N, H, W] (grey) or [N, H, W, 3], labels int64 [N] (zeros when unlabelled)."""
    root = _root(data_dir)
    train, test = _splits(scan(root), Options.of(options), progress)
    return train if split == "train" else test


def _reset_state() -> None:
    _memo.clear()
