"""Data for vaedraw: the data set registry, loaded splits that know their shape and origin, IDX files
and verified downloads.

- `spec`: `DatasetSpec`, `Split` (images, labels, shape, classes, provenance) and `to_float`, the one
  uint8 -> float pixel conversion;
- `registry`: `DATASETS` (name -> `DatasetSpec`), `register`, `load_split`, `load_dataset`, and a run's
  data provenance: `load_recorded`, `overlaps`;
- `mnist`: the MNIST-format loader (folder, cache, system folder, mirrors, bundled subset);
- `images`, `arrays`: the user's own images, a folder (`--dataset folder`) or an .npz/.npy file
  (`--dataset array`); `pixels` converts their pixels (`Options`: data.image_size, data.channels),
  `cache` keeps a folder's decoded pixels, `own` holds what both share (held-out split, memory check,
  provenance and reload by digest);
- `idx`: `read_idx`, the IDX parser that checks a header's claims before believing them;
- `download`: `download_file`, bounded and md5-verified fetching from mirrors.
"""

import tempfile  # noqa: F401 - tests patch tempfile.mkstemp through this module

from vaedraw.data import arrays, cache, download, idx, images, mnist, own, pixels, registry, spec  # noqa: F401
from vaedraw.data.download import download_file, sanitize
from vaedraw.data.idx import read_idx
from vaedraw.data.mnist import (
    _BUNDLED_DIR,
    _BUNDLED_MD5,
    _FILES,
    _MD5,
    _MIRRORS,
    _SIZES,
    _SYSTEM_DIRS,
    _bundled,
    load_mnist_format,
)
from vaedraw.data.pixels import Options
from vaedraw.data.registry import DATASETS, _reset_state, load_dataset, load_recorded, load_split, overlaps, register
from vaedraw.data.spec import SOURCES, SPLITS, DatasetSpec, Split, default_cache_dir, to_float

__all__ = [
    "DATASETS", "SOURCES", "SPLITS", "DatasetSpec", "Options", "Split", "default_cache_dir", "download_file",
    "load_dataset", "load_mnist_format", "load_recorded", "load_split", "overlaps", "read_idx", "register",
    "sanitize", "to_float", "_BUNDLED_DIR", "_BUNDLED_MD5", "_FILES", "_MD5", "_MIRRORS", "_SIZES",
    "_SYSTEM_DIRS", "_bundled", "_reset_state",
]
