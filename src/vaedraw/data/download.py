"""Verified downloads: fetch a file from the first mirror that yields the right bytes.

Nothing a server sends is trusted: the body is capped at the file's known size, each read has a
timeout and the whole transfer a deadline, a response that is not HTTP, not a number where a length
belongs or an HTML page moves on to the next mirror, and every text a server sent is sanitized before
it reaches a message. The file is written to a temporary name beside its destination, fsynced, checked
against its md5 and only then renamed, so the destination is either absent or complete.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from vaedraw.errors import DataError

# A dead mirror must cost little: connecting gets this long, reading gets download_file's timeout.
CONNECT_TIMEOUT = 3.0
# The overall deadline when none is given: a minute plus the time the file takes at 50 kB/s, so a
# server that trickles a byte per read timeout cannot hold a download for ever.
_BASE_DEADLINE, _SLOWEST_RATE = 60.0, 50_000
_MAX_TEXT = 160  # longest piece of server-sent text quoted in a message
_MAX_UNKNOWN_SIZE = 1 << 30  # the cap on a body when neither the caller nor the server says how long it is

_dead_hosts: set[str] = set()  # hosts that refused or timed out a connection: not retried


def sanitize(text: object, limit: int = _MAX_TEXT) -> str:
    """`text` as one printable line: control characters (a server's or a URL's) become '?', long text is cut."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _ConnectThenRead:
    """Connection mix-in: a short timeout while connecting, the caller's timeout while reading."""

    read_timeout: float

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout)  # type: ignore[attr-defined]


class _HTTP(_ConnectThenRead, http.client.HTTPConnection):
    pass


class _HTTPS(_ConnectThenRead, http.client.HTTPSConnection):
    pass


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    def conn(cls: type, host: str, **kw: object) -> http.client.HTTPConnection:
        c = cls(host, **kw)
        c.read_timeout = read_timeout
        return c

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(functools.partial(conn, _HTTP), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(functools.partial(conn, _HTTPS), req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


class CacheUnwritable(DataError):
    """The cache folder cannot be written: no mirror can help, so it is raised at once."""


class _MirrorFailed(Exception):
    """This URL did not yield the file; the next one is tried."""

    def __init__(self, reason: str, *, dead: bool = False) -> None:
        super().__init__(sanitize(reason))
        self.dead = dead  # the host did not answer at all: skip it for the rest of the process


def _host(url: str) -> str:
    """The host of an http(s) URL; anything else is not a mirror."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        raise _MirrorFailed(f"not a valid URL ({e})") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _MirrorFailed("not an http(s) URL")
    return parts.netloc


def download_file(urls: list[str], dest: Path, md5: str, *, size: int | None = None, timeout: float = 30.0,
                  deadline: float | None = None, progress: bool = True) -> Path:
    """Fetch `dest` from the first of `urls` that yields a file with this md5 (and `size` bytes); return `dest`.

    Each URL gets a short connect timeout, `timeout` seconds per read and `deadline` seconds in all
    (default: a minute plus the file at 50 kB/s). An HTTP error, an HTML page, a malformed response,
    a body longer than `size`, a timeout, a refused connection or a wrong checksum moves on to the next
    URL; a file that fails is deleted. A local write failure is a DataError at once.
    """
    dest = Path(dest)
    if deadline is None:
        deadline = _BASE_DEADLINE + (size or 0) / _SLOWEST_RATE
    opener = _opener(timeout)
    failures: list[str] = []
    for url in urls:
        shown = sanitize(url)
        try:
            host = _host(url)
        except _MirrorFailed as e:
            failures.append(f"{shown}: {e}")
            continue
        if host in _dead_hosts:
            failures.append(f"{shown}: skipped, {sanitize(host)} did not answer earlier")
            continue
        tmp = _temp_file(dest)
        try:
            got = _fetch_one(opener, url, tmp, dest.name, size, time.monotonic() + deadline, progress)
            if got != md5:
                raise _MirrorFailed(f"checksum {got} is not the expected {md5}")
            os.replace(tmp, dest)
            return dest
        except _MirrorFailed as e:
            if e.dead:
                _dead_hosts.add(host)
            failures.append(f"{shown}: {e}")
        finally:
            tmp.unlink(missing_ok=True)  # a failed or wrong download never stays on disk
    raise DataError(f"could not download {sanitize(dest.name)}: " + "; ".join(failures))


def _open(opener: urllib.request.OpenerDirector, url: str) -> http.client.HTTPResponse:
    try:
        return opener.open(url, timeout=CONNECT_TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()
        raise _MirrorFailed(f"HTTP {e.code}") from e
    except http.client.HTTPException as e:  # it answered, but not in HTTP: a wrong port or a broken proxy
        raise _MirrorFailed(f"not an HTTP response ({type(e).__name__}: {e})") from e
    except (urllib.error.URLError, OSError) as e:
        raise _MirrorFailed(str(getattr(e, "reason", e)), dead=True) from e
    except ValueError as e:  # what urllib raises for a URL it cannot use
        raise _MirrorFailed(f"not a valid URL ({e})") from e


def _expected_length(response: http.client.HTTPResponse, size: int | None) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return size
    if not value.strip().isdigit():
        raise _MirrorFailed(f"malformed Content-Length '{sanitize(value, 40)}'")
    length = int(value)
    if size is not None and length != size:
        raise _MirrorFailed(f"announces {length:,} bytes, not the file's {size:,}")
    return length


def _fetch_one(opener: urllib.request.OpenerDirector, url: str, tmp: Path, label: str, size: int | None,
               until: float, progress: bool) -> str:
    """Stream `url` into `tmp` (fsynced) within the deadline `until` (monotonic); return the md5 of what arrived."""
    response = _open(opener, url)
    digest = hashlib.md5()
    with response, open(tmp, "wb") as out:
        # Captive portals and some mirrors answer 200 with an error page: refuse it early.
        if "html" in response.headers.get("Content-Type", "").lower():
            raise _MirrorFailed("got an HTML page, not the file")
        length = _expected_length(response, size)
        cap = size if size is not None else (length if length is not None else _MAX_UNKNOWN_SIZE)
        received = 0
        with tqdm(total=length, unit="B", unit_scale=True, desc=label, file=sys.stderr,
                  disable=not progress, leave=False) as bar:
            while True:
                if time.monotonic() > until:
                    raise _MirrorFailed(f"too slow: {received:,} bytes by the deadline")
                try:
                    chunk = response.read1(1 << 16)  # what has arrived: a trickle cannot hide from the deadline
                except (OSError, http.client.HTTPException, ValueError) as e:
                    raise _MirrorFailed(f"read failed ({e})") from e
                if not chunk:
                    break
                received += len(chunk)
                if received > cap:
                    raise _MirrorFailed(f"sent more than the file's {cap:,} bytes")
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as e:
                    raise unwritable(tmp.parent, e) from e
                bar.update(len(chunk))
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as e:
            raise unwritable(tmp.parent, e) from e
    return digest.hexdigest()


def _temp_file(dest: Path) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise unwritable(dest.parent, e) from e
    os.close(fd)
    return Path(name)


def unwritable(folder: Path, e: OSError) -> DataError:
    return CacheUnwritable(
        f"cannot write to the cache folder {folder} ({e.strerror or e}); set VAEDRAW_CACHE_DIR to a "
        "writable folder, or pass --data-dir / set VAEDRAW_DATA_DIR to a folder that already holds the files."
    )
