"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Folder with the four official MNIST .gz files: $VAEDRAW_TEST_MNIST_DIR, else <repo>/../shared/data/mnist."""
    folder = Path(os.environ.get("VAEDRAW_TEST_MNIST_DIR") or _REPO_ROOT.parent / "shared" / "data" / "mnist")
    missing = [name for name in _MNIST_FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"official MNIST files not found in {folder} (missing {', '.join(missing)}); set VAEDRAW_TEST_MNIST_DIR")
    return folder


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
    "--set", "model.channels=8", "--set", "model.hidden=32", "--set", "train.log_every=2",
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
        "model.latent_dim": 4, "model.channels": 8, "model.hidden": 32, "train.steps": 40, "train.batch_size": 64,
        "train.eval_images": 200, "train.log_every": 20, "train.eval_every": 40, "train.picture_every": 20,
        "train.compile": "off", "train.seed": 0, "sample.gmm_components": 3})
    return train(cfg, folder, data_dir=mnist_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_conditional_run(tmp_path_factory, mnist_dir):
    return train_tiny_run(tmp_path_factory.getbasetemp() / "tiny-conditional", mnist_dir)
