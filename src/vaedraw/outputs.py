"""Where commands write their pictures, arrays and figures: every output path is checked before any work.

A command calls `check_output` on each path it will write before it loads a model or data, so a
typo in an extension or a folder given as `--out` costs nothing. The files themselves are written
atomically (`checkpoint.atomic_write_bytes`): a reader sees the old file or the new one. `write_outputs`
writes several files in turn and, when one fails, says which were written and which were not.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import OutputError, VaedrawError


def show(path: str | os.PathLike | None) -> str:
    """A path as printable text: undecodable bytes become U+FFFD, control characters are escaped."""
    if path is None:
        return "?"
    raw = os.fsencode(path) if not isinstance(path, bytes) else path
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_output(path: str | os.PathLike, kinds: Sequence[str] = (".png",), option: str = "--out") -> Path:
    """Refuse, before any work, a path that cannot become a new regular file of one of `kinds`.

    kinds: the allowed suffixes, lower case with the dot (".png", ".gif", ".npz", ".json").
    Refused: another suffix (exit 2); an existing folder, symbolic link, device, pipe or socket there;
    a parent that is a file; a folder this process cannot write in (OutputError, exit 6). A missing
    parent folder is fine: the writer creates it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in kinds:
        raise VaedrawError(f"{option} {show(path)}: vaedraw writes {' or '.join(kinds)} here, not "
                           f"{show(suffix) if suffix else 'a name without an extension'}")
    refuse_non_regular(path, option)
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise OutputError(f"{option} {show(path)}: {show(parent)} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {show(path)}: no permission to write in {show(parent)}")
    return path


def refuse_non_regular(path: Path, option: str = "") -> None:
    """OutputError unless `path` is missing or a regular file: never replace a folder, a link, a device."""
    where = f"{option} {show(path)}".strip()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:  # e.g. a parent that is a file (NotADirectoryError)
        raise OutputError(f"{where}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{where} is a symbolic link; vaedraw does not write through links: "
                          "give the file's real path or remove the link")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{where} is a folder; give a file name in it instead")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{where} exists and is not a regular file (a device, pipe or socket); "
                          "vaedraw only replaces regular files")


def _nearest_existing(folder: Path) -> Path:
    """`folder` or its nearest ancestor that exists (lstat, so a dangling link counts as existing)."""
    folder = folder if str(folder) else Path(".")
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def write_outputs(outputs: Sequence[tuple[Path, Callable[[], object], str]]) -> None:
    """Write each (path, write, what) in turn; on a failure say what was written and what was not."""
    done: list[str] = []
    for i, (path, write, what) in enumerate(outputs):
        try:
            write()
        except (OSError, VaedrawError) as e:
            if not done:
                raise
            reason = f"{e.strerror or e}" if isinstance(e, OSError) else str(e)
            left = ", ".join(f"{w} {show(p)}" for p, _, w in outputs[i:])
            raise OutputError(f"{show(path)}: {reason}; written: {', '.join(done)}; not written: {left}") from None
        done.append(f"{what} {show(path)}")
