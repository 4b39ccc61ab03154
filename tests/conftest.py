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
