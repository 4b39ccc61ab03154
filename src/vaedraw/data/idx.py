"""IDX files (the MNIST format): parse one, gzipped or not, without trusting its header.

An IDX file of unsigned bytes is a 4-byte magic (0x00000800 + the number of dimensions), one
big-endian uint32 per dimension, then the bytes in C order. The header's claimed size is checked
against what the file really holds before the body is read, and a gzipped file is inflated only up
to that claim (plus one byte to notice extra data), so a truncated file, trailing garbage or a
decompression bomb is refused with the file named instead of exhausting memory.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from vaedraw.errors import DataError

IDX_MAGIC = {1: 0x00000801, 3: 0x00000803, 4: 0x00000804}  # labels, grey images, colour images
# No built-in data set comes near this (MNIST's training images are 47 MB); a header that claims
# more is damaged or hostile, and honouring it would exhaust memory before the file could be checked.
MAX_IDX_BYTES = 1 << 31
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path, image_dims: tuple[int, int] | None = (28, 28)) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, gzipped or not.

    Returns uint8 [N] for a label file (magic 0x801), uint8 [N, H, W] for an image file (0x803) or
    uint8 [N, H, W, C] (0x804). `image_dims` is the (H, W) an image file must have (None: any).
    Anything else, and any file whose size disagrees with its header, is a DataError naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            body = _inflate(f, path) if head == _GZIP_MAGIC else _read_plain(f, path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}).") from e
    header, dims = _parse_header(body, path)
    if len(dims) >= 3 and image_dims is not None and tuple(dims[1:3]) != tuple(image_dims):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected {image_dims[0]}x{image_dims[1]}.")
    return np.frombuffer(bytes(body), dtype=np.uint8, offset=header).reshape(dims).copy()


def _claimed(prefix: bytes | bytearray, path: Path) -> tuple[int, tuple[int, ...], int] | None:
    """(header bytes, dims, total bytes the header promises) once `prefix` holds the whole header."""
    if len(prefix) < 4:
        return None
    magic = int.from_bytes(prefix[:4], "big")
    if magic not in IDX_MAGIC.values():
        raise DataError(
            f"{path}: magic number 0x{magic:08x} is not an IDX file of unsigned bytes "
            "(expected 0x00000803 for images or 0x00000801 for labels)."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(prefix) < header:
        return None
    dims = tuple(int.from_bytes(prefix[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    total = header + int(np.prod(dims, dtype=object))
    if total > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: header claims {dims} = {total:,} bytes, more than the {MAX_IDX_BYTES:,} an IDX file "
            "may hold here; the file is damaged."
        )
    return header, dims, total


def _parse_header(body: bytes | bytearray, path: Path) -> tuple[int, tuple[int, ...]]:
    if len(body) < 8:
        raise DataError(f"{path}: only {len(body)} bytes, too short for an IDX header; the file is truncated.")
    claim = _claimed(body, path)
    if claim is None:
        raise DataError(f"{path}: header cut short; the file is truncated.")
    header, dims, total = claim
    if len(body) != total:
        _size_mismatch(path, dims, total, len(body))
    return header, dims


def _size_mismatch(path: Path, dims: tuple[int, ...], expected: int, got: int) -> None:
    what = "is truncated" if got < expected else "has trailing bytes"
    holds = f"{got:,}" if got <= expected else f"more than {expected:,}"
    raise DataError(
        f"{path}: header promises {dims} = {expected:,} bytes but the file holds {holds}; "
        f"it {what}. Delete it and fetch it again."
    )


def _read_plain(f, path: Path) -> bytes:  # noqa: ANN001 - a binary file object
    """Read an uncompressed file after checking the header's claim against the file's size."""
    size = path.stat().st_size
    prefix = f.read(4 + 4 * 4)
    claim = _claimed(prefix, path) if len(prefix) >= 8 else None
    if claim is not None and size != claim[2]:
        _size_mismatch(path, claim[1], claim[2], size)
    return prefix + f.read()


def _inflate(f, path: Path) -> bytes:  # noqa: ANN001 - a binary file object
    """Inflate a gzip file to at most the size its IDX header claims plus one byte, so a bomb stops early."""
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as gz:
            prefix = gz.read(4 + 4 * 4)
            claim = _claimed(prefix, path) if len(prefix) >= 8 else None
            if claim is None:
                return prefix  # too short: _parse_header says how
            body = prefix + gz.read(max(claim[2] + 1 - len(prefix), 0))
            if len(body) > claim[2]:
                _size_mismatch(path, claim[1], claim[2], len(body))
            return body
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e}); delete it and fetch it again.") from e
