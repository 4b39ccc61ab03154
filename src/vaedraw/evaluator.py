"""A classifier of our own, used only to judge generated images.

Sample-quality figures (Frechet distance, recognizable share, label coverage; see evaluate.py) need a
fixed network that has never seen a VAE. `EvaluatorNet` is a small CNN trained once per data set on its
training split by `train_evaluator` (`vaedraw train-evaluator`; `scripts/train_evaluator.py` writes the
shipped ones). Weights are float16 safetensors with metadata: dataset, data digest, test accuracy, shape,
n_classes, script version, seed, epochs. Where they live:

- `bundled/evaluator-<dataset>.safetensors`: shipped with the package (mnist, fashion-mnist);
- `<cache>/evaluators/evaluator-<key>.safetensors` (`data.default_cache_dir()`): trained by the user.
  `key` is the data set's name, and for the user's own images (`--dataset folder|array`) also the first
  16 hex digits of the training split's pixel digest, so an evaluator is never used on other data.

    ev = load_evaluator("mnist")
    p = ev.predict_proba(x)      # x: float [N, C, H, W] in [0, 1] -> [N, n_classes], rows sum to 1
    f = ev.features(x)           # penultimate-layer activations [N, FEATURES]
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .errors import DataError, VaedrawError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
CACHE_SUBDIR = "evaluators"  # under data.default_cache_dir()
FEATURES = 128  # width of the penultimate layer, the space of the Frechet distance
N_CLASSES = 10  # the shipped evaluators' (MNIST, Fashion-MNIST); others record theirs
SHAPE = (1, 28, 28)  # the shipped evaluators' input shape; others record theirs
MIN_SIDE = 28  # smaller images are upsampled to this side so that both 5x5 convolutions fit
POOLED = 4  # spatial side before the dense layer (28x28 inputs arrive there at 4x4 already)
SCRIPT_VERSION = 1  # bump when the training recipe changes
RECIPE = {"epochs": 3, "batch_size": 128, "lr": 3e-3, "seed": 0, "max_shift": 2}  # the shipped evaluators'


# ----------------------------------------------------------------------------- where evaluators live
def weights_path(dataset: str) -> Path:
    """The shipped weights of a built-in data set."""
    return BUNDLED_DIR / f"evaluator-{dataset}.safetensors"


def data_digest(provenance: dict | None) -> str | None:
    """The pixel digest of the user's own images (provenance["files"]["pixels"]); None for other data."""
    if not isinstance(provenance, dict):
        return None
    digest = (provenance.get("files") or {}).get("pixels")
    return digest if isinstance(digest, str) else None


def _own_data(dataset: str) -> bool:
    from .data import DATASETS

    spec = DATASETS.get(dataset)
    return bool(spec is not None and spec.own_data)


def cache_path(dataset: str, provenance: dict | None = None) -> Path:
    """Where `train_evaluator` stores the evaluator of `dataset` trained on the split `provenance` describes
    (its training split): `<cache>/evaluators/evaluator-<dataset>[-<digest[:16]>].safetensors`."""
    from .data import default_cache_dir

    key = dataset
    if _own_data(dataset):
        digest = data_digest(provenance)
        if digest is None:
            raise VaedrawError(f"{dataset!r} data without a pixel digest: its evaluator cannot be told from another "
                               "data set's")
        key = f"{dataset}-{digest[:16]}"
    return default_cache_dir() / CACHE_SUBDIR / f"evaluator-{key}.safetensors"


def train_command(dataset: str, provenance: dict | None = None) -> str:
    """The `vaedraw train-evaluator` command line for the data `provenance` describes."""
    cmd = f"vaedraw train-evaluator --dataset {dataset} --data-dir "
    if not _own_data(dataset):
        return cmd + "DIR"
    prov = provenance or {}
    sets = "".join(f" --set data.{k}={v}" for k, v in sorted((prov.get("options") or {}).items()) if v)
    return cmd + f"{prov.get('path') or 'PATH'}{sets}"


# ----------------------------------------------------------------------------- the network
class EvaluatorNet(nn.Module):
    """conv 5x5 (32) -> pool -> conv 5x5 (64) -> pool -> adaptive pool to 4x4 -> dense (FEATURES) -> dense
    (n_classes), batch norm, ReLU.

    x: [N, C, H, W] in [0, 1] -> logits [N, n_classes]. `features` is the ReLU output of the dense layer.
    Sides under MIN_SIDE are first upsampled (bilinear) to MIN_SIDE; the adaptive average pool is the
    identity for 28x28 inputs (they reach it at 4x4), so those keep the shipped network exactly. About
    185k parameters for 1x28x28 and 10 classes.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = N_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 28->24->12
            nn.Conv2d(32, 64, 5, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4
            nn.Sequential(nn.AdaptiveAvgPool2d(POOLED), nn.Flatten()),  # no weights: the keys stay those shipped
            nn.Linear(64 * POOLED * POOLED, FEATURES, bias=False), nn.BatchNorm1d(FEATURES), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < MIN_SIDE or w < MIN_SIDE:
            x = F.interpolate(x, size=(max(h, MIN_SIDE), max(w, MIN_SIDE)), mode="bilinear", align_corners=False)
        # Centre the pixels so the first layer sees zero-mean inputs; part of the network, not of the data.
        return self.body(x - 0.13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@dataclass
class Evaluator:
    """A trained classifier in eval mode. Inputs are float [N, *shape] in [0, 1] on any device."""

    dataset: str
    test_accuracy: float
    net: EvaluatorNet
    metadata: dict
    batch_size: int = 2000
    shape: tuple[int, int, int] = SHAPE  # (C, H, W) of the images it was trained on

    @property
    def n_classes(self) -> int:
        return self.net.head.out_features

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def _map(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.shape):
            raise VaedrawError(f"the evaluator takes images of shape [N, {', '.join(map(str, self.shape))}], "
                               f"got {list(x.shape)}")
        out = [fn(x[i:i + self.batch_size].to(self.device, torch.float32)).float().cpu()
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities softmax(logits): [N, C, H, W] -> [N, n_classes] on the CPU."""
        return self._map(lambda xb: torch.softmax(self.net(xb), dim=1), x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: [N, C, H, W] -> [N, FEATURES] on the CPU."""
        return self._map(self.net.features, x)

    def features_and_proba(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features` and `predict_proba` from one pass of the network: ([N, FEATURES], [N, n_classes])."""
        def both(xb: torch.Tensor) -> torch.Tensor:
            f = self.net.features(xb)
            return torch.cat([f, torch.softmax(self.net.head(f), dim=1)], dim=1)  # head(f): eval-mode forward

        out = self._map(both, x)
        return out[:, :FEATURES], out[:, FEATURES:]


# ----------------------------------------------------------------------------- saving and loading
def save_evaluator(net: EvaluatorNet, path: str | Path, metadata: dict) -> None:
    """Write the weights as float16 safetensors with `metadata` (JSON values) under the key `vaedraw`, atomically."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write_bytes

    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write_bytes(Path(path), lambda p: save_file(state, str(p), metadata={"vaedraw": json.dumps(metadata)}))


def load_evaluator(dataset: str = "mnist", device: str | torch.device = "cpu",
                   provenance: dict | None = None) -> Evaluator:
    """The classifier for `dataset`: the shipped one, else one `train_evaluator` stored in the cache for the
    data `provenance` describes (a run's recorded training split; the user's own images are matched by
    their pixel digest). A VaedrawError saying which command trains one when there is none."""
    path = weights_path(dataset)
    if path.is_file():
        return load_evaluator_file(path, device)
    digest = data_digest(provenance)
    if _own_data(dataset) and digest is None:
        raise VaedrawError(f"no evaluator classifier for {dataset!r} data without a recorded pixel digest (a run "
                           f"saved before runs recorded their data); train one with {train_command(dataset)}")
    path = cache_path(dataset, provenance)
    if path.is_file():
        ev = load_evaluator_file(path, device)
        if ev.metadata.get("data_digest") == digest:  # the file name holds 16 hex digits; the metadata all 64
            return ev
    shipped = sorted(p.stem.removeprefix("evaluator-") for p in BUNDLED_DIR.glob("evaluator-*.safetensors"))
    what = f"these {dataset!r} images" if digest else f"dataset {dataset!r}"
    raise VaedrawError(f"no evaluator classifier for {what} (shipped: {', '.join(shipped) or 'none'}; none in "
                       f"{path.parent}); train one with {train_command(dataset, provenance)}")


def load_evaluator_file(path: str | Path, device: str | torch.device = "cpu") -> Evaluator:
    """Load classifier weights written by `save_evaluator` (float16 storage is widened to float32)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("vaedraw", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        shape = tuple(metadata.get("shape", SHAPE))
        net = EvaluatorNet(shape[0], int(metadata.get("n_classes", N_CLASSES)))
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file, named, not a traceback
        raise VaedrawError(f"{path} is not a readable evaluator ({type(e).__name__}: {str(e)[:120]}); delete it "
                           "and train the evaluator again") from None
    net.to(device).eval()
    return Evaluator(dataset=metadata["dataset"], test_accuracy=float(metadata["test_accuracy"]),
                     net=net, metadata=metadata, shape=shape)


# ----------------------------------------------------------------------------- training
def shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, zero fill. [B, C, H, W]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [B, W]
    # the slice between the advanced indices puts their broadcast shape [B, H, W] first: [B, H, W, C]
    return padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(predict, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000) -> float:
    """Share of uint8 images [N, H, W(, C)] whose most probable class under `predict` is their label."""
    from .data import to_float

    hits = sum(int((predict(to_float(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum())
               for i in range(0, len(images), batch_size))
    return hits / max(1, len(images))


def check_trainable(train, test) -> None:
    """Refuse (DataError) data an evaluator cannot be trained on: unlabelled, one class, or test labels the
    training split lacks."""
    if train.n_classes < 2 or int(train.labels.unique().numel()) < 2:
        raise DataError(f"{train.name} is unlabelled or has a single class: an evaluator classifier needs two or "
                        "more labelled classes (class subfolders for a folder, y_train for an array file)")
    if len(test) == 0 or int(test.labels.max()) >= train.n_classes:
        raise DataError(f"{test.name} has labels the training split {train.name} lacks; an evaluator is tested "
                        "on the classes it was trained on")


def load_training_data(run_dir: str | Path | None = None, dataset: str | None = None,
                       data_dir: str | Path | None = None, options: object = None, progress: bool = True):
    """(train, test) Splits to train an evaluator on: the data a run recorded (`run_dir`), else `dataset` from
    `data_dir` with the conversion `options` (as `vaedraw train` loads it)."""
    from . import data
    from .run import read_data_source

    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise VaedrawError(f"run directory {run_dir} does not exist")
        source = read_data_source(run_dir)
        if source is None:
            raise DataError(f"{run_dir} recorded no data (data.json); name the data with --dataset and --data-dir")
        return tuple(data.load_recorded(source[s], s, data_dir, progress=progress) for s in ("train", "test"))
    return data.load_dataset(dataset or "mnist", data_dir, progress=progress, options=options)


def train_evaluator(train, test, *, epochs: int = RECIPE["epochs"], batch_size: int = RECIPE["batch_size"],
                    lr: float = RECIPE["lr"], seed: int = RECIPE["seed"], out: str | Path | None = None,
                    progress: bool = True) -> dict:
    """Train an EvaluatorNet on `train` (a data.Split), test it on `test`, store it, and return its metadata
    with "out" (the file written).

    The recipe of the shipped evaluators (SCRIPT_VERSION 1), deterministic on the CPU: the seed fixes the
    initial weights and dropout (torch's global generator, restored afterwards) and the batch order and
    augmentation (a generator of its own); `torch.use_deterministic_algorithms` is on while it trains.
    `epochs` passes of Adam (lr, cosine decay to 0, batches of `batch_size`) over the training split with
    random shifts of up to 2 pixels (zero fill). The weights are stored in float16 at `out` (default
    `cache_path`: the user's cache) and the recorded test accuracy is that of the stored weights.
    """
    check_trainable(train, test)
    out = Path(out) if out is not None else cache_path(train.provenance.get("dataset", train.name.split("/")[0]),
                                                       train.provenance)
    from .data import to_float

    c = train.shape[0]
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was (loading draws from it too)
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            net = EvaluatorNet(c, train.n_classes)
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            steps_per_epoch = max(1, len(train) // batch_size)
            total = epochs * steps_per_epoch
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
            g = torch.Generator().manual_seed(seed)
            for epoch in range(epochs):
                net.train()
                perm = torch.randperm(len(train), generator=g)
                for i in range(steps_per_epoch):
                    idx = perm[i * batch_size:(i + 1) * batch_size]
                    x = shift(to_float(train.images[idx]), g, RECIPE["max_shift"])
                    loss = F.cross_entropy(net(x), train.labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                if progress:
                    net.eval()
                    acc = accuracy(net, test.images, test.labels)
                    print(f"vaedraw train-evaluator: epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, test "
                          f"accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
        net.eval()
        prov = train.provenance
        meta = {"dataset": prov.get("dataset", train.name.split("/")[0]), "data_digest": data_digest(prov),
                "test_digest": data_digest(test.provenance), "shape": list(train.shape),
                "n_classes": train.n_classes, "classes": prov.get("classes"), "script_version": SCRIPT_VERSION,
                "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "train_images": len(train),
                "test_images": len(test), "storage": "float16", "torch": torch.__version__}
        save_evaluator(net, out, {**meta, "test_accuracy": float("nan")})
        # The recorded accuracy is that of the stored float16 weights, as users load them.
        ev = load_evaluator_file(out)
        meta["test_accuracy"] = accuracy(ev.predict_proba, test.images, test.labels)
        save_evaluator(ev.net, out, meta)
    return {**meta, "out": str(out), "seconds": time.perf_counter() - t0}
