"""Tests for vaedraw.data: IDX parsing, file lookup, verified downloads and the bundled subset.

Downloads run the real code against local HTTP servers on 127.0.0.1 serving copies of the official
files; the cache is a tmp folder, so nothing touches ~/.cache.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import OfficialTestFiles, QuietHandler

from vaedraw import data
from vaedraw.errors import DataError, VaedrawError

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEDRAW_DATA_DIR", raising=False)
    monkeypatch.delenv("VAEDRAW_MIRRORS", raising=False)
    # An installed Debian Fashion-MNIST must not change what these tests see.
    monkeypatch.setattr(data.mnist, "_SYSTEM_DIRS", {})
    data._reset_state()
    yield
    data._reset_state()


class _HtmlErrorPage(QuietHandler):
    """Answers every request 200 with an HTML error page, like a captive portal."""

    def do_GET(self) -> None:
        body = b"<html><body>Service unavailable</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def good(official_test_files: OfficialTestFiles) -> OfficialTestFiles:
    return official_test_files


@pytest.fixture
def good_dir(good: OfficialTestFiles) -> Path:
    return good.folder


@pytest.fixture
def corrupt_dir(good_dir: Path, tmp_path: Path) -> Path:
    """Copies of the test files with one byte flipped: same size, wrong md5."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for name in TEST_FILES:
        raw = bytearray((good_dir / name).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(raw))
    return folder


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x800 + array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


# --- IDX parsing of the real files ---------------------------------------------------------------


def test_real_files_parse(full_mnist_dir: Path) -> None:
    mnist_dir = full_mnist_dir
    train_images = data.read_idx(mnist_dir / "train-images-idx3-ubyte.gz")
    train_labels = data.read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")
    test_images = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    test_labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert train_images.shape == (60_000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10_000, 28, 28)
    assert train_labels.shape == (60_000,) and test_labels.shape == (10_000,)
    assert train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert set(np.unique(train_labels)) == set(range(10))
    assert train_images.max() == 255 and train_images.min() == 0


def test_load_split_from_named_dir(full_mnist_dir: Path) -> None:
    mnist_dir = full_mnist_dir
    train = data.load_split("mnist", "train", mnist_dir, download=False)
    assert train.name == "mnist/train" and len(train) == 60_000
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    assert data.load_split("mnist", "train", mnist_dir) is train  # memo: parsed once


def test_raw_and_gz_agree(good_dir: Path, tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    for name in TEST_FILES:
        (raw_dir / name.removesuffix(".gz")).write_bytes(gzip.decompress((good_dir / name).read_bytes()))
    from_raw = data.load_split("mnist", "test", raw_dir)
    from_gz = data.load_split("mnist", "test", good_dir)
    assert torch.equal(from_raw.images, from_gz.images) and torch.equal(from_raw.labels, from_gz.labels)


def test_data_dir_from_env(good_dir: Path, good: OfficialTestFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEDRAW_DATA_DIR", str(good_dir))
    assert len(data.load_split("mnist", "test")) == good.n


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 20), seed=st.integers(0, 2**31 - 1), gz=st.booleans())
def test_idx_round_trip(tmp_path_factory: pytest.TempPathFactory, n: int, seed: int, gz: bool) -> None:
    images = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / "x"
    path.write_bytes(gzip.compress(idx_bytes(images)) if gz else idx_bytes(images))
    assert np.array_equal(data.read_idx(path), images)


# --- IDX errors ----------------------------------------------------------------------------------


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28)), magic=0x0D03))  # 0x0D: float, not unsigned byte
    with pytest.raises(DataError, match=r"bad.*magic number 0x00000d03"):
        data.read_idx(path)


def test_wrong_dims(tmp_path: Path) -> None:
    path = tmp_path / "small.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 32, 32)))))
    with pytest.raises(DataError, match=r"small\.gz.*32x32, expected 28x28"):
        data.read_idx(path)


def test_truncated_gzip(good_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    whole = (good_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*truncated or corrupt gzip"):
        data.read_idx(path)


def test_truncated_raw(tmp_path: Path) -> None:
    path = tmp_path / "cut"
    path.write_bytes(idx_bytes(np.zeros((5, 28, 28)))[:-10])
    with pytest.raises(DataError, match=r"cut.*truncated"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match=r"cut.*too short"):
        data.read_idx(path)


def test_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((10, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9)))
    with pytest.raises(DataError, match=r"10 images but .*t10k-labels-idx1-ubyte has 9 labels"):
        data.load_split("mnist", "test", tmp_path)


def test_swapped_files(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(9)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: holds labels"):
        data.load_split("mnist", "test", tmp_path)


# --- names and folders ---------------------------------------------------------------------------


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'.*mnist, fashion-mnist"):
        data.load_split("cifar", "train")
    with pytest.raises(DataError, match=r"unknown split 'valid'.*train, test"):
        data.load_split("mnist", "valid")
    assert issubclass(DataError, VaedrawError)


def test_named_dir_missing(tmp_path: Path, serve, good_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))  # a working mirror must not be used instead
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        data.load_split("mnist", "test", tmp_path / "nowhere")


def test_named_dir_lacks_a_file(good_dir: Path) -> None:
    (good_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=rf"{good_dir}.*lacks t10k-labels-idx1-ubyte"):
        data.load_split("mnist", "test", good_dir)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert data.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("VAEDRAW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "vaedraw"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "vaedraw"


# --- checksums and downloads ---------------------------------------------------------------------


def test_official_md5s(full_mnist_dir: Path) -> None:
    mnist_dir = full_mnist_dir
    for base, expected in data._MD5["mnist"].items():
        assert md5(mnist_dir / f"{base}.gz") == expected


def test_download_into_cache(serve, good_dir: Path, good: OfficialTestFiles, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, closed_port_url: str) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))
    split = data.load_split("mnist", "test", progress=False)
    assert split.name == "mnist/test" and len(split) == good.n
    cache = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(TEST_FILES)  # no temp files left behind
    for name in TEST_FILES:
        assert md5(cache / name) == data._MD5["mnist"][name.removesuffix(".gz")]
    # A second process finds the cache and needs no mirror.
    data._reset_state()
    monkeypatch.setenv("VAEDRAW_MIRRORS", closed_port_url)
    again = data.load_split("mnist", "test")
    assert again.name == "mnist/test" and torch.equal(again.images, split.images)


def test_corrupt_download_refused_and_removed(serve, corrupt_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "t10k-labels-idx1-ubyte.gz"
    dest.parent.mkdir()
    with pytest.raises(DataError, match=r"checksum .* is not the expected"):
        data.download_file([serve(corrupt_dir) + dest.name], dest, data._MD5["mnist"]["t10k-labels-idx1-ubyte"],
                           progress=False)
    assert list(dest.parent.iterdir()) == []


def test_corrupt_mirror_then_good(serve, corrupt_dir: Path, good_dir: Path, good: OfficialTestFiles,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", f"{serve(corrupt_dir)},{serve(good_dir)}")
    split = data.load_split("mnist", "test", progress=False)
    assert split.name == "mnist/test" and split.labels[:3].tolist() == good.first_labels


def test_html_and_404_mirrors_skipped(serve, good_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    html, missing = serve(tmp_path, _HtmlErrorPage), serve(tmp_path / "cache")  # the latter 404s
    dest = tmp_path / "one.gz"
    with pytest.raises(DataError, match=r"HTML page.*HTTP 404"):
        data.download_file([html + "x.gz", missing + "x.gz"], dest, "0" * 32, progress=False)
    monkeypatch.setenv("VAEDRAW_MIRRORS", f"{html},{missing},{serve(good_dir)}")
    assert data.load_split("mnist", "test", progress=False).name == "mnist/test"


def test_corrupt_cache_file_refetched(serve, good_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache" / "mnist"
    cache.mkdir(parents=True)
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the file")
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))
    assert data.load_split("mnist", "test", progress=False).name == "mnist/test"
    assert md5(cache / "t10k-labels-idx1-ubyte.gz") == data._MD5["mnist"]["t10k-labels-idx1-ubyte"]


def test_unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve, good_dir: Path) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # cannot be created, even by root
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))
    with pytest.raises(DataError, match=r"cannot write to the cache folder .*a-file.*VAEDRAW_CACHE_DIR"):
        data.load_split("mnist", "test")


def test_all_mirrors_bad_falls_back_to_subset(serve, tmp_path: Path, closed_port_url: str,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", f"{serve(tmp_path, _HtmlErrorPage)},{closed_port_url}")
    start = time.monotonic()
    train, test = data.load_dataset("mnist", progress=False)
    assert time.monotonic() - start < 5
    assert (train.name, len(train), test.name, len(test)) == ("mnist-subset/train", 9_000, "mnist-subset/test", 1_000)
    assert train.images.shape == (9_000, 28, 28) and train.labels.dtype == torch.int64
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "using the bundled 10,000-digit subset (9,000 train / 1,000 test)" in lines[0]
    assert "VAEDRAW_DATA_DIR" in lines[0]
    with pytest.raises(DataError, match=r"fashion-mnist could not be found.*apt-get install dataset-fashion-mnist"):
        data.load_split("fashion-mnist", "train", progress=False)


def test_mixed_sources_use_subset_for_both(serve, full_mnist_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    mnist_dir = full_mnist_dir
    """A full train split with the subset's test split would test on training images."""
    folder = tmp_path / "train-only"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, folder / name)
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(folder))
    train, test = data.load_dataset("mnist", progress=False)
    assert (train.name, test.name) == ("mnist-subset/train", "mnist-subset/test")


def test_download_disabled_uses_subset(capsys: pytest.CaptureFixture) -> None:
    assert data.load_split("mnist", "test", download=False).name == "mnist-subset/test"
    assert "downloads are turned off" in capsys.readouterr().err


# --- the bundled subset --------------------------------------------------------------------------


def test_bundled_subset_is_official_first_10000(full_mnist_dir: Path) -> None:
    mnist_dir = full_mnist_dir
    for name, expected in data._BUNDLED_MD5.items():
        assert md5(data._BUNDLED_DIR / name) == expected
    official_images = data.read_idx(mnist_dir / "train-images-idx3-ubyte.gz")[:10_000]
    official_labels = data.read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")[:10_000]
    parts = [data.read_idx(p) for p in (*data._bundled("train"), *data._bundled("test"))]
    assert np.array_equal(np.concatenate([parts[0], parts[2]]), official_images)
    assert np.array_equal(np.concatenate([parts[1], parts[3]]), official_labels)
    assert len(parts[0]) == 9_000 and len(parts[2]) == 1_000


def test_damaged_bundle_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data._BUNDLED_MD5, "mnist-subset-test-labels.idx1.gz", "0" * 32)
    with pytest.raises(DataError, match=r"mnist-subset-test-labels\.idx1\.gz.*reinstall"):
        data.load_split("mnist", "test", download=False)


def test_stalled_mirror_times_out(serve, good_dir: Path, tmp_path: Path) -> None:
    """A server that accepts but never answers costs one read timeout, then the next mirror is used."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        stalled_url = f"http://127.0.0.1:{stalled.getsockname()[1]}/"
        dest = tmp_path / "t10k-labels-idx1-ubyte.gz"
        start = time.monotonic()
        data.download_file([stalled_url + dest.name, serve(good_dir) + dest.name], dest,
                           data._MD5["mnist"]["t10k-labels-idx1-ubyte"], timeout=0.5, progress=False)
        assert time.monotonic() - start < 3
    assert md5(dest) == data._MD5["mnist"]["t10k-labels-idx1-ubyte"]


# --- untrusted IDX headers -----------------------------------------------------------------------


def test_a_header_claiming_more_than_the_file_holds_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "claims-a-lot"
    path.write_bytes(struct.pack(">II", 0x801, 2**32 - 1) + b"\x00" * 10)  # 4 GB of labels claimed, 10 held
    with pytest.raises(DataError, match=r"claims-a-lot: header claims \(4294967295,\) = 4,294,967,303 bytes, more"):
        data.read_idx(path)
    path.write_bytes(struct.pack(">IIII", 0x803, 1000, 28, 28) + b"\x00" * 784)
    with pytest.raises(DataError, match=r"claims-a-lot: header promises .* 784,016 bytes but the file holds 800; "
                                        r"it is truncated"):
        data.read_idx(path)


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A 10-image header followed by 64 MB of zeros: inflating stops one byte past the header's claim."""
    import tracemalloc

    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(idx_bytes(np.zeros((10, 28, 28))))
        for _ in range(64):
            f.write(bytes(1 << 20))
    assert path.stat().st_size < 400_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"bomb\.gz: header promises .* 7,856 bytes but the file holds more than "
                                            r"7,856; it has trailing bytes"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # far below the 64 MB the file inflates to


def test_concatenated_gzip_members_read_as_one_file(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(3, 28, 28)
    raw = idx_bytes(images)
    path = tmp_path / "two-members.gz"
    path.write_bytes(gzip.compress(raw[:100]) + gzip.compress(raw[100:]))
    assert np.array_equal(data.read_idx(path), images)


def test_an_empty_split_is_refused_with_the_file_named(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: holds 0 images"):
        data.load_split("mnist", "test", tmp_path)


# --- untrusted servers ---------------------------------------------------------------------------


class _BadLength(QuietHandler):
    """200 with a Content-Length that is not a number (and an escape sequence in it)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "12\x1b[31mred")
        self.end_headers()
        self.wfile.write(b"x" * 12)


class _Endless(QuietHandler):
    """200 without a Content-Length, then more bytes than any MNIST file."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        for _ in range(64):
            self.wfile.write(bytes(1 << 16))


class _Trickle(QuietHandler):
    """A byte every 50 ms: each read is quick, the whole would take minutes."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(200):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.05)


@pytest.fixture
def not_http_url() -> Iterator[str]:
    """A server that answers every connection with bytes that are not HTTP, control characters included."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = sock.accept()
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"\x1b[2J\x07SSH-2.0-OpenSSH_9.6\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    sock.close()


def _no_control_characters(text: str) -> bool:
    return all(c.isprintable() for c in text)


def test_malformed_responses_move_on_to_the_next_mirror(serve, good_dir: Path, tmp_path: Path,
                                                         not_http_url: str) -> None:
    name = "t10k-labels-idx1-ubyte"
    dest, md5_, size = tmp_path / f"{name}.gz", data._MD5["mnist"][name], data._SIZES["mnist"][name]
    bad = [serve(tmp_path, _BadLength), not_http_url, serve(tmp_path, _Endless), "http://[::1/", "ftp://example.org/",
           "no url at all", "http://127.0.0.1:notaport/"]
    with pytest.raises(DataError) as refused:
        data.download_file([u + dest.name for u in bad], dest, md5_, size=size, progress=False)
    message = str(refused.value)
    assert "malformed Content-Length '12?[31mred'" in message
    assert "not an HTTP response" in message and "SSH-2.0" in message
    assert f"sent more than the file's {size:,} bytes" in message
    assert message.count("not a valid URL") == 2 and message.count("not an http(s) URL") == 2
    assert _no_control_characters(message)
    assert not dest.exists() and not list(tmp_path.glob(".*.part"))
    data.download_file([u + dest.name for u in bad] + [serve(good_dir) + dest.name], dest, md5_, size=size,
                       progress=False)
    assert md5(dest) == md5_


def test_a_body_longer_than_announced_or_known_is_refused(serve, good_dir: Path, tmp_path: Path) -> None:
    name = "t10k-labels-idx1-ubyte"
    dest = tmp_path / f"{name}.gz"
    with pytest.raises(DataError, match=r"announces [\d,]+ bytes, not the file's 10$"):
        data.download_file([serve(good_dir) + dest.name], dest, data._MD5["mnist"][name], size=10, progress=False)


def test_a_trickling_mirror_hits_the_overall_deadline(serve, tmp_path: Path) -> None:
    dest = tmp_path / "x.gz"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"too slow: \d+ bytes by the deadline"):
        data.download_file([serve(tmp_path, _Trickle) + "x.gz"], dest, "0" * 32, timeout=5, deadline=0.5,
                           progress=False)
    assert time.monotonic() - start < 3


def test_mirror_urls_are_sanitized_in_messages() -> None:
    with pytest.raises(DataError) as refused:
        data.download_file(["gopher://evil\x1b(0pwned\x07host/x.gz"], Path("x.gz"), "0" * 32, progress=False)
    assert _no_control_characters(str(refused.value)) and "not an http(s) URL" in str(refused.value)
    assert data.sanitize("a\nb\x00c" + "d" * 500, 20) == "a?b?c" + "d" * 12 + "..."


# --- registry, shapes and the pixel conversion ---------------------------------------------------


def test_the_registry_describes_the_built_ins() -> None:
    built_in = {n: s for n, s in data.DATASETS.items() if not s.own_data}
    assert list(built_in) == ["mnist", "fashion-mnist"]
    for spec in built_in.values():
        assert (spec.shape, spec.n_classes, spec.likelihood, spec.binarize) == ((1, 28, 28), 10, "bernoulli", "dynamic")
    # the user's own images are 8-bit pixels whose shape and classes come from the files
    for name in ("folder", "array"):
        spec = data.DATASETS[name]
        assert (spec.shape, spec.n_classes, spec.likelihood, spec.binarize) == (None, None, "logistic_mixture", "none")
    test = data.load_split("mnist", "test", download=False)
    assert (test.shape, test.n_classes) == ((1, 28, 28), 10)


def test_to_float_is_the_one_pixel_conversion() -> None:
    grey = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    x = data.to_float(grey)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28)
    assert torch.equal(x, grey.unsqueeze(1).float().div(255))  # bitwise what training always fed the model
    colour = torch.randint(0, 256, (2, 8, 6, 3), dtype=torch.uint8)
    y = data.to_float(colour)
    assert y.shape == (2, 3, 8, 6) and y.is_contiguous()
    assert torch.equal(y[1, 2], colour[1, :, :, 2].float() / 255)
    assert float(data.to_float(torch.tensor([[[0, 255]]], dtype=torch.uint8)).max()) == 1.0


@pytest.fixture
def registry_restored() -> Iterator[None]:
    """Registrations made by a test end with it."""
    saved = dict(data.DATASETS)
    yield
    data.DATASETS.clear()
    data.DATASETS.update(saved)


def test_a_toy_data_set_is_one_file_and_one_registry_line(registry_restored: None) -> None:
    import toy_dataset

    data.register(toy_dataset.SPEC)
    assert "toy-squares" in data.DATASETS
    train, test = data.load_dataset("toy-squares")
    assert (len(train), len(test), train.shape, train.n_classes) == (256, 64, (3, 16, 16), 4)
    x = data.to_float(train.images[:8])
    assert x.shape == (8, *train.shape) and x.dtype == torch.float32
    # The square's quadrant is its label: the brightest quadrant of each image says which it is.
    quadrants = x.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
    assert torch.equal(quadrants.argmax(1), train.labels[:8])
    assert data.load_recorded(train.provenance, "train").images.equal(train.images)
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'.*mnist, fashion-mnist, toy-squares"):
        data.load_split("cifar", "train")


def test_a_loader_that_breaks_its_spec_is_refused(registry_restored: None) -> None:
    import toy_dataset

    def wrong(split, data_dir=None, **kw):  # noqa: ANN001, ANN202
        good = toy_dataset.load(split)
        return data.Split(good.images[:, :8], good.labels, "bad/train")

    data.register(data.DatasetSpec("bad", (3, 16, 16), 4, wrong))
    with pytest.raises(DataError, match=r"bad/train: images are torch.uint8 \(8, 16, 3\), "
                                        r"expected uint8 \(16, 16, 3\)"):
        data.load_split("bad", "train")


# --- provenance ----------------------------------------------------------------------------------


def test_every_split_says_where_it_came_from(serve, good_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from_folder = data.load_split("mnist", "test", good_dir).provenance
    assert from_folder == {"dataset": "mnist", "split": "test", "source": "folder", "path": str(good_dir),
                           "files": {n: md5(good_dir / n) for n in TEST_FILES}, "subset": False}
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))
    downloaded = data.load_split("mnist", "test", progress=False).provenance
    cache = tmp_path / "cache" / "mnist"
    assert (downloaded["source"], downloaded["path"]) == ("download", str(cache))
    assert downloaded["files"] == from_folder["files"]
    data._reset_state()
    assert data.load_split("mnist", "test").provenance["source"] == "cache"
    shutil.rmtree(cache)
    bundled = data.load_split("mnist", "test", download=False, progress=False)
    assert bundled.provenance == {"dataset": "mnist", "split": "test", "source": "bundled", "path": None,
                                  "files": {n: data._BUNDLED_MD5[n] for n in ("mnist-subset-test-images.idx3.gz",
                                                                              "mnist-subset-test-labels.idx1.gz")},
                                  "subset": True}


def test_the_subset_is_recognised_in_any_folder_however_stored(tmp_path: Path) -> None:
    """Unpacked into a folder of its own, the subset is still the subset: its test images are training images."""
    for split, bases in data._FILES.items():
        for src, base in zip(data._bundled(split), bases):
            (tmp_path / base).write_bytes(gzip.decompress(src.read_bytes()))
    train, test = data.load_dataset("mnist", tmp_path)
    assert (train.name, test.name) == ("mnist-subset/train", "mnist-subset/test")
    assert train.provenance["source"] == "folder" and train.provenance["subset"] and test.provenance["subset"]


def _prov(split: str, subset: bool, files: dict[str, str], dataset: str = "mnist") -> dict:
    return {"dataset": dataset, "split": split, "source": "bundled" if subset else "folder",
            "path": None, "files": files, "subset": subset}


def test_overlaps_tells_where_evaluation_would_see_training_images() -> None:
    """The subset is official training images 0..8,999 (train) and 9,000..9,999 (test)."""
    full_train = _prov("train", False, {"train-images-idx3-ubyte.gz": data._MD5["mnist"]["train-images-idx3-ubyte"]})
    full_test = _prov("test", False, {"t10k-images-idx3-ubyte.gz": data._MD5["mnist"]["t10k-images-idx3-ubyte"]})
    sub_train = _prov("train", True, {"mnist-subset-train-images.idx3.gz": "2f1f"})
    sub_test = _prov("test", True, {"mnist-subset-test-images.idx3.gz": "ee0e"})
    assert data.overlaps(full_train, sub_test)  # the subset's test digits are in the full training set
    assert not data.overlaps(sub_train, sub_test)  # disjoint parts of the official training set
    assert not data.overlaps(full_train, full_test) and not data.overlaps(sub_train, full_test)
    assert data.overlaps(full_train, full_train) and data.overlaps(sub_train, full_train)  # scoring training data
    assert data.overlaps(full_train, {**full_test, "files": full_train["files"]})  # the same files, whatever called
    fashion_md5 = data._MD5["fashion-mnist"]["t10k-images-idx3-ubyte"]
    fashion_test = _prov("test", False, {"t10k-images-idx3-ubyte.gz": fashion_md5}, "fashion-mnist")
    assert not data.overlaps(full_train, fashion_test)


def test_load_recorded_uses_the_same_data_or_says_which_it_needs(good_dir: Path, good: OfficialTestFiles,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = data.load_split("mnist", "test", good_dir).provenance
    again = data.load_recorded(recorded, "test")  # no --data-dir: the folder it was trained from
    assert again.provenance == recorded and len(again) == good.n
    assert data.load_recorded(recorded, "test", good_dir).provenance == recorded
    other = tmp_path / "other"
    other.mkdir()
    for name in TEST_FILES:  # the same digits, stored differently: other checksums
        (other / name.removesuffix(".gz")).write_bytes(gzip.decompress((good_dir / name).read_bytes()))
    with pytest.raises(DataError, match=rf"{other} holds other test files than the run was trained with "
                                        rf"\(this run was trained on the mnist files in {good_dir}\); "
                                        rf"pass --data-dir {good_dir}\."):
        data.load_recorded(recorded, "test", other)
    monkeypatch.setenv("VAEDRAW_DATA_DIR", str(other))
    shutil.rmtree(good_dir)
    data._reset_state()
    with pytest.raises(DataError, match=rf"this run was trained on the mnist files in {good_dir}; "
                                        rf"pass --data-dir {good_dir} \(.*does not exist.*"
                                        rf"VAEDRAW_DATA_DIR=.* holds other"):
        data.load_recorded(recorded, "test")  # never the subset, never a look-alike from the environment


def test_a_run_trained_from_the_cache_is_not_moved_onto_the_subset(serve, good_dir: Path, tmp_path: Path,
                                                                   closed_port_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))
    recorded = data.load_split("mnist", "test", progress=False).provenance
    shutil.rmtree(tmp_path / "cache")
    data._reset_state()
    fetched_again = data.load_recorded(recorded, "test", progress=False)
    assert fetched_again.provenance["files"] == recorded["files"]
    shutil.rmtree(tmp_path / "cache")
    data._reset_state()
    monkeypatch.setenv("VAEDRAW_MIRRORS", closed_port_url)
    with pytest.raises(DataError, match=r"this run was trained on the mnist files downloaded into the cache .*; "
                                        r"pass --data-dir DIR with those files \(they are not in the cache"):
        data.load_recorded(recorded, "test", progress=False)
    assert data.load_recorded(recorded, "test", good_dir).provenance["source"] == "folder"  # the official files


def test_a_subset_run_loads_the_subset_and_refuses_other_files(good_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = data.load_split("mnist", "test", download=False, progress=False).provenance
    monkeypatch.setenv("VAEDRAW_DATA_DIR", str(good_dir))  # the environment does not move it off the subset
    assert data.load_recorded(recorded, "test").name == "mnist-subset/test"
    with pytest.raises(DataError, match=r"holds other test files .*the bundled MNIST subset shipped with vaedraw.*"
                                        r"omit --data-dir"):
        data.load_recorded(recorded, "test", good_dir)
    with pytest.raises(DataError, match=r"record of its test data is damaged"):
        data.load_recorded({"dataset": "mnist", "files": "\x1b[2J"}, "test")


def test_colour_idx_files_parse_but_are_not_mnist(tmp_path: Path) -> None:
    colour = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(colour))
    assert np.array_equal(data.read_idx(tmp_path / "t10k-images-idx3-ubyte"), colour)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: holds colour images \(magic 0x804\)"):
        data.load_split("mnist", "test", tmp_path)


def test_a_conditional_model_needs_the_data_sets_classes(registry_restored: None, tmp_path) -> None:
    import toy_dataset

    from vaedraw.config import build_config
    from vaedraw.errors import ConfigError
    from vaedraw.train import train

    data.register(toy_dataset.SPEC)  # 4 classes
    sets = {"data.dataset": "toy-squares", "train.steps": 1, "sample.fit_gmm": False}
    with pytest.raises(ConfigError, match=r"model\.n_classes=10, but toy-squares/train has 4 classes: set "
                                          r"model\.n_classes=4"):
        train(build_config("conditional", overrides=sets), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
