"""A digit classifier of our own, used only to judge generated images.

Sample-quality figures (Frechet distance, recognizable share, label coverage; see evaluate.py) need a
fixed network that has never seen a VAE. `EvaluatorNet` is a small CNN trained once per dataset by
`scripts/train_evaluator.py` on the training split; its weights ship with the package as
`bundled/evaluator-<dataset>.safetensors` (float16 storage) with metadata: dataset, test accuracy,
script version, seed, epochs.

    ev = load_evaluator("mnist")
    p = ev.predict_proba(x)      # x: float [N, 1, 28, 28] in [0, 1] -> [N, 10], rows sum to 1
    f = ev.features(x)           # penultimate-layer activations [N, FEATURES]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import VaedrawError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
FEATURES = 128  # width of the penultimate layer, the space of the Frechet distance
N_CLASSES = 10


def weights_path(dataset: str) -> Path:
    return BUNDLED_DIR / f"evaluator-{dataset}.safetensors"


class EvaluatorNet(nn.Module):
    """conv 5x5 (32) -> pool -> conv 5x5 (64) -> pool -> dense (FEATURES) -> dense (10), batch norm, ReLU.

    x: [N, 1, 28, 28] in [0, 1] -> logits [N, 10]. `features` is the ReLU output of the dense layer.
    About 185k parameters.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 8 -> 4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURES, bias=False), nn.BatchNorm1d(FEATURES), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the pixels so the first layer sees zero-mean inputs; part of the network, not of the data.
        return self.body(x - 0.13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@dataclass
class Evaluator:
    """A trained classifier in eval mode. Inputs are float [N, 1, 28, 28] in [0, 1] on any device."""

    dataset: str
    test_accuracy: float
    net: EvaluatorNet
    metadata: dict
    batch_size: int = 2000

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def _map(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise VaedrawError(f"the evaluator takes images of shape [N, 1, 28, 28], got {list(x.shape)}")
        out = [fn(x[i:i + self.batch_size].to(self.device, torch.float32)).float().cpu()
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities softmax(logits): [N, 1, 28, 28] -> [N, 10] on the CPU."""
        return self._map(lambda xb: torch.softmax(self.net(xb), dim=1), x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: [N, 1, 28, 28] -> [N, FEATURES] on the CPU."""
        return self._map(self.net.features, x)

    def features_and_proba(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features` and `predict_proba` from one pass of the network: ([N, FEATURES], [N, 10])."""
        def both(xb: torch.Tensor) -> torch.Tensor:
            f = self.net.features(xb)
            return torch.cat([f, torch.softmax(self.net.head(f), dim=1)], dim=1)  # head(f): eval-mode forward

        out = self._map(both, x)
        return out[:, :FEATURES], out[:, FEATURES:]


def save_evaluator(net: EvaluatorNet, path: str | Path, metadata: dict) -> None:
    """Write the weights as float16 safetensors with `metadata` (JSON values) under the key `vaedraw`."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write_bytes

    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write_bytes(Path(path), lambda p: save_file(state, str(p), metadata={"vaedraw": json.dumps(metadata)}))


def load_evaluator(dataset: str = "mnist", device: str | torch.device = "cpu") -> Evaluator:
    """The shipped classifier for `dataset`; a VaedrawError naming the dataset if none is shipped."""
    path = weights_path(dataset)
    if not path.is_file():
        shipped = sorted(p.stem.removeprefix("evaluator-") for p in BUNDLED_DIR.glob("evaluator-*.safetensors"))
        raise VaedrawError(f"no evaluator classifier is shipped for dataset {dataset!r} (available: "
                           f"{', '.join(shipped) or 'none'}); train one with scripts/train_evaluator.py "
                           f"--dataset {dataset}")
    return load_evaluator_file(path, device)


def load_evaluator_file(path: str | Path, device: str | torch.device = "cpu") -> Evaluator:
    """Load classifier weights written by `save_evaluator` (float16 storage is widened to float32)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("vaedraw", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    net = EvaluatorNet()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.to(device).eval()
    return Evaluator(dataset=metadata["dataset"], test_accuracy=float(metadata["test_accuracy"]),
                     net=net, metadata=metadata)
