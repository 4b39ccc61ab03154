"""The cache of decoded images: one uncompressed .npz per folder and conversion, so that a second run
starts in seconds instead of decoding every file again.

An entry is `default_cache_dir()/images/<place>-<content>.npz` ($VAEDRAW_CACHE_DIR like the rest):

- `place` = sha256(the folder's absolute path, the conversion options)[:16];
- `content` = sha256(the cache format, Pillow's version, the options, and every candidate file's
  relative path, size and mtime in ns)[:32]: any added, removed, replaced or touched file makes a new key.

It holds the arrays of both splits (uint8 images, int64 labels) and a JSON `meta` (classes, the files
skipped, the digests). Entries are written atomically (`checkpoint.atomic_write_bytes`); writing a new
one removes the older entries of the same place. A damaged entry is deleted and the folder decoded
again; an unwritable cache costs only the speed-up (a note says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import PIL

from vaedraw.data.own import note
from vaedraw.data.spec import default_cache_dir

FORMAT = 1  # bump when an entry's content or meaning changes


def _sha(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def entry(root: Path, options: dict, listing: list[tuple[str, int, int]]) -> Path:
    """The cache file for `root` converted with `options`, given its files (relative path, size, mtime_ns)."""
    place = _sha(str(root.resolve()), options)[:16]
    content = _sha(FORMAT, PIL.__version__, options, listing)[:32]
    return default_cache_dir() / "images" / f"{place}-{content}.npz"


def read(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of a cache entry, or None when there is none or it is damaged (then it is deleted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k != "meta"}
            meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError("another format")
        return arrays, meta
    except Exception:  # noqa: BLE001 - a half-written or foreign file: decode again
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def write(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Store an entry atomically and drop the older entries of the same place; a failure is only a note."""
    from vaedraw.checkpoint import atomic_write_bytes

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps({**meta, "format": FORMAT})), **arrays)

    try:
        atomic_write_bytes(path, save)
    except Exception as e:  # noqa: BLE001 - an OSError, or an OutputError for a non-file in the way
        reason = getattr(e, "strerror", None) or str(e)
        note(f"could not write the image cache {path} ({reason}); the images will be decoded again next "
             "time. Set VAEDRAW_CACHE_DIR to a writable folder to keep them.")
        return
    place = path.name.split("-")[0]
    for old in path.parent.glob(f"{place}-*.npz"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
