"""Shared pytest fixtures."""

from __future__ import annotations

import os
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
