"""Tests for vaedraw.data: IDX parsing, file lookup, verified downloads and the bundled subset.

Downloads run the real code against local HTTP servers on 127.0.0.1 serving copies of the official
files; the cache is a tmp folder, so nothing touches ~/.cache.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QuietHandler

from vaedraw import data
from vaedraw.errors import DataError, VaedrawError

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEDRAW_DATA_DIR", raising=False)
    monkeypatch.delenv("VAEDRAW_MIRRORS", raising=False)
    # An installed Debian Fashion-MNIST must not change what these tests see.
    monkeypatch.setattr(data, "_SYSTEM_DIRS", {})
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
def good_dir(mnist_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    for name in TEST_FILES:
        shutil.copy(mnist_dir / name, folder / name)
    return folder


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


def test_real_files_parse(mnist_dir: Path) -> None:
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


def test_load_split_from_named_dir(mnist_dir: Path) -> None:
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


def test_data_dir_from_env(good_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEDRAW_DATA_DIR", str(good_dir))
    assert len(data.load_split("mnist", "test")) == 10_000


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


def test_truncated_gzip(mnist_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()[:2000])
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


def test_official_md5s(mnist_dir: Path) -> None:
    for base, expected in data._MD5["mnist"].items():
        assert md5(mnist_dir / f"{base}.gz") == expected


def test_download_into_cache(serve, good_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             closed_port_url: str) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(good_dir))
    split = data.load_split("mnist", "test", progress=False)
    assert split.name == "mnist/test" and len(split) == 10_000
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


def test_corrupt_mirror_then_good(serve, corrupt_dir: Path, good_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEDRAW_MIRRORS", f"{serve(corrupt_dir)},{serve(good_dir)}")
    split = data.load_split("mnist", "test", progress=False)
    assert split.name == "mnist/test" and split.labels[:3].tolist() == [7, 2, 1]


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


def test_mixed_sources_use_subset_for_both(serve, mnist_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_bundled_subset_is_official_first_10000(mnist_dir: Path) -> None:
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
