"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


FULL_MNIST_HINT = ("they are fetched into vaedraw's cache when this machine is online; offline, set "
                   "VAEDRAW_TEST_MNIST_DIR to a folder with the four official MNIST .gz files "
                   "(or put them in <repo>/../shared/data/mnist)")


@functools.cache
def _full_mnist_folder() -> Path | None:
    """$VAEDRAW_TEST_MNIST_DIR, else <repo>/../shared/data/mnist, else the folder `vaedraw train` downloads
    MNIST into (the user's cache, verified, fetched now if missing and the mirrors answer), else None."""
    named = os.environ.get("VAEDRAW_TEST_MNIST_DIR")
    folder = Path(named) if named else _REPO_ROOT.parent / "shared" / "data" / "mnist"
    if all((folder / name).is_file() for name in _MNIST_FILES):
        return folder
    if named:
        return None
    from vaedraw.data import mnist

    got = [mnist._fetch("mnist", split, download=True, progress=False) for split in ("train", "test")]
    if any(isinstance(g, str) for g in got):  # offline: a reason, not files
        return None
    folders = {path.parent for files, _ in got for path in files}
    return folders.pop() if len(folders) == 1 else None


@pytest.fixture(scope="session")
def full_mnist_dir() -> Path:
    """Folder with the four official MNIST .gz files ($VAEDRAW_TEST_MNIST_DIR, else <repo>/../shared/data/mnist).
    Only for tests that need all 70,000 images; without them such a test is skipped, and one summary line
    at the end says how to run them."""
    folder = _full_mnist_folder()
    if folder is None:
        pytest.skip("needs the full MNIST files; " + FULL_MNIST_HINT)
    return folder


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real MNIST digits under the four standard names: the official files when they are there
    (see full_mnist_dir), else the bundled subset (9,000 train / 1,000 test), so tests that need real digits
    but not all of them run on a fresh clone."""
    folder = _full_mnist_folder()
    if folder is not None:
        return folder
    import shutil

    from vaedraw import data

    folder = tmp_path_factory.mktemp("bundled-mnist")
    for split, (images, labels) in data._FILES.items():
        for src, base in zip(data._bundled(split), (images, labels)):
            shutil.copy(src, folder / f"{base}.gz")
    return folder


@dataclass
class OfficialTestFiles:
    """A folder that mirrors of the download tests serve as MNIST's two test files, and what they hold."""

    folder: Path
    n: int  # images
    first_labels: list[int]


@pytest.fixture
def official_test_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OfficialTestFiles:
    """The official t10k files when they are here; else 300 generated digits in the same format whose md5s and
    sizes stand in for the official ones (for this test only), so download tests run on a fresh clone."""
    import gzip
    import hashlib
    import shutil

    import numpy as np

    from vaedraw import data

    folder = tmp_path / "official-test-files"
    folder.mkdir()
    names = [f"{base}.gz" for base in data._FILES["test"]]
    full = _full_mnist_folder()
    if full is not None:
        for name in names:
            shutil.copy(full / name, folder / name)
        return OfficialTestFiles(folder, 10_000, [7, 2, 1])
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), rng.integers(0, 10, 300).astype(np.uint8))
    for name, array in zip(names, arrays):
        header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes(), mtime=0))
        base = name.removesuffix(".gz")
        monkeypatch.setitem(data._MD5["mnist"], base, hashlib.md5((folder / name).read_bytes()).hexdigest())
        monkeypatch.setitem(data._SIZES["mnist"], base, (folder / name).stat().st_size)
    return OfficialTestFiles(folder, 300, arrays[1][:3].tolist())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Fold every skip for want of the full MNIST files into one summary line (pytest lists each skipped
    test's own location otherwise): "SKIPPED [n] tests/conftest.py: needs the full MNIST files; set ..."."""
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and FULL_MNIST_HINT in str(longrepr[2]):
        report.longrepr = (__file__, None, longrepr[2])


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tests run tiny models and small fits, for which more threads (torch's, BLAS's) only add contention
    on shared cores: several times slower when the cores are busy."""
    import torch
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


TINY_RUN_ARGS = [
    "--steps", "6", "--seed", "7", "--no-progress", "--device", "cpu",
    "--set", "train.batch_size=32", "--set", "train.eval_images=200", "--set", "sample.gmm_components=5",
    "--set", "model.conv.channels=8", "--set", "model.conv.hidden=32", "--set", "train.log_every=2",
    "--set", "train.eval_every=3", "--set", "train.picture_every=3", "--set", "train.checkpoint_every=3",
]


@pytest.fixture(scope="session")
def tiny_run(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory trained on real MNIST through `vaedraw train` with tiny budgets (6 steps of 32 images,
    an 8-channel model, a 5-component mixture: TINY_RUN_ARGS). Shared: tests must only read it."""
    from vaedraw.cli import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEDRAW_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        code = main(["train", "--out", str(out), "--data-dir", str(mnist_dir), *TINY_RUN_ARGS])
    assert code == 0, "training the shared tiny run failed"
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without logging each request to stderr."""

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator:
    """serve(folder, handler=QuietHandler) -> base URL of an HTTP server on 127.0.0.1 serving `folder`."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(folder: Path, handler: type = QuietHandler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def train_tiny_run(folder, mnist_dir):
    """A conditional run of a few dozen steps (small nets, small budgets), trained once per test session
    and shared by the web, latent and browser tests through the folder it lives in."""
    from vaedraw.config import build_config
    from vaedraw.train import train

    if (folder / "gmm.safetensors").exists():
        return folder
    cfg = build_config("conditional", overrides={
        "model.latent_dim": 4, "model.conv.channels": 8, "model.conv.hidden": 32, "train.steps": 40, "train.batch_size": 64,
        "train.eval_images": 200, "train.log_every": 20, "train.eval_every": 40, "train.picture_every": 20,
        "train.compile": "off", "train.seed": 0, "sample.gmm_components": 3})
    return train(cfg, folder, data_dir=mnist_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_conditional_run(tmp_path_factory, mnist_dir):
    return train_tiny_run(tmp_path_factory.getbasetemp() / "tiny-conditional", mnist_dir)
