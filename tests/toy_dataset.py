"""A toy data set in one file, to show what adding a data set takes: a loader and one registry line.

"toy-squares": 16x16 colour images of one bright square on a dark background, labelled by the
quadrant it sits in (4 classes); 256 training and 64 test images, generated from a fixed seed, so it
needs no files. Registering it is the one line

    data.register(toy_dataset.SPEC)

after which `load_split("toy-squares", "train")`, `data.dataset=toy-squares` and everything built
from a split's shape see it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaedraw import data

SIZE, N_CLASSES = 16, 4
_COUNTS = {"train": 256, "test": 64}


def load(split: str, data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True) -> data.Split:
    """uint8 [N, 16, 16, 3] squares and their quadrant labels int64 [N]; the same images on every call."""
    n = _COUNTS[split]
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    images = torch.randint(0, 40, (n, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)  # dark noise
    colours = torch.randint(128, 256, (n, 3), generator=g, dtype=torch.uint8)
    half = SIZE // 2
    for i, (label, colour) in enumerate(zip(labels.tolist(), colours)):
        top, left = (label // 2) * half, (label % 2) * half
        images[i, top + 2 : top + half - 2, left + 2 : left + half - 2] = colour
    provenance = {"dataset": SPEC.name, "split": split, "source": "generated", "path": None, "files": {},
                  "subset": False}
    return data.Split(images, labels, f"{SPEC.name}/{split}", SPEC.shape, SPEC.n_classes, provenance)


SPEC = data.DatasetSpec("toy-squares", (3, SIZE, SIZE), N_CLASSES, load, likelihood="bernoulli", binarize="none",
                        description="coloured squares labelled by quadrant (a test fixture)")
