"""What the benchmarks share: src/ on sys.path, a preset's data on a device, the plain eager and the fast
training step, the machine's description, blocks written between markers in a docs file, free ports.

Every script starts with `sys.path.insert(0, str(Path(__file__).resolve().parent))` and `from common import
...`, so that it finds this module when run as `python benchmarks/NAME.py` and when loaded from its path.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))  # a checkout runs without `pip install -e .`

import torch  # noqa: E402

from vaedraw import data as data_mod  # noqa: E402
from vaedraw import fastpath  # noqa: E402
from vaedraw.evaluate import eval_inputs, heldout_loss  # noqa: E402
from vaedraw.models import build_model  # noqa: E402
from vaedraw.train import Batcher, learning_rate  # noqa: E402

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bfloat16 arithmetic


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """A preset's data on a device: training batches as the training loop draws them, and the test targets
    (`eval_inputs`: binarized once for Bernoulli models, grayscale otherwise)."""

    train: data_mod.Split
    test: data_mod.Split
    batcher: Batcher
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(cfg, device: torch.device, data_dir=None) -> Data:
    train, test = data_mod.load_dataset(cfg.data.dataset, data_dir, progress=False)
    batcher = Batcher(train.images.to(device), train.labels.to(device), cfg.train.batch_size, cfg.train.seed)
    x_test = eval_inputs(test.images, cfg.model.likelihood == "bernoulli").to(device)
    return Data(train, test, batcher, x_test, test.labels.to(device))


def image_shape(cfg) -> tuple[int, int, int]:
    """(C, H, W) of the preset's data set, from the data registry (no data loaded)."""
    return tuple(data_mod.DATASETS[cfg.data.dataset].shape)


# ----------------------------------------------------------------------------- training steps
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step(model, opt, x, y, binarize: bool) -> torch.Tensor:
    """The straightforward eager step the fast path is measured against: the model's own ELBO terms, one batch
    at a time, noise from the global RNG. -> [loss, recon, kl] detached (no host sync)."""
    if binarize:
        x = torch.bernoulli(x)
    recon, kl, _ = model.elbo_terms(x, y if model.n_classes else None, torch.randn_like)
    recon, kl = recon.mean(), kl.mean()
    opt.zero_grad(set_to_none=True)
    (recon + kl).backward()
    opt.step()
    return torch.stack([recon + kl, recon, kl]).detach()


class Trainer:
    """A model, its optimizer and a step function, from the preset's initial weights (its seed).
    plan None: the plain eager reference (`plain_step`, foreach Adam; fused on CUDA)."""

    def __init__(self, cfg, device: torch.device, plan: fastpath.Plan | None):
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device, self.plan, self.fast = cfg, device, plan, None
        model = build_model(cfg.model, image_shape(cfg)).to(device)
        if plan is None:
            t = cfg.train
            kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
            self.model = model
            self.opt = torch.optim.Adam(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **kind)
        else:
            self.model = fastpath.prepare_model(model, plan, fastpath.Noise())
            self.opt = fastpath.make_optimizer(self.model, cfg, device, plan)
            self.fast = fastpath.FastStep(self.model, self.opt, cfg, plan)
        self.model.train()

    def step(self, x, y, lr: float) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(x, y, lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return plain_step(self.model, self.opt, x, y, self.cfg.data.binarize == "dynamic")

    def train(self, batcher: Batcher, start: int, stop: int) -> torch.Tensor:
        """Steps start..stop-1 of the preset's schedule; -> the summed [loss, recon, kl] (on the device)."""
        total = torch.zeros(3, device=self.device)
        for s in range(start, stop):
            x, y = batcher.batch(s)
            total += self.step(x, y, learning_rate(s, self.cfg))
        return total


def check_loss(tr: Trainer, data: Data, steps: int) -> tuple[float, bool]:
    """Train `steps` steps of the preset's schedule; -> (test loss, all train losses finite)."""
    torch.manual_seed(tr.cfg.train.seed + 7)  # the same noise stream for every variant's schedule
    total = tr.train(data.batcher, 0, steps)
    return heldout_loss(tr.model, data.x_test, data.y_test)["loss"], bool(torch.isfinite(total).all())


# ----------------------------------------------------------------------------- the machine
def cpu_info() -> dict[str, str]:
    """The "key: value" lines of lscpu and /proc/cpuinfo, keys in lower case (lscpu's first); {} without both."""
    text = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text += subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    with contextlib.suppress(OSError):
        text += Path("/proc/cpuinfo").read_text()
    info: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in text.splitlines()):
        if value.strip():
            info.setdefault(key.strip().lower(), value.strip())
    return info


def cpu_model() -> str:
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted=BF16_FLAGS) -> list[str]:
    """Which of `wanted` the CPU advertises."""
    flags = cpu_info().get("flags", "").split()
    return [f for f in wanted if f in flags]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads"


def machine(device: torch.device) -> str:
    """The device and the software, for the record next to a measurement."""
    if device.type == "cuda":
        return f"{device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    bf16 = ", ".join(cpu_flags()) or "no native bf16"
    return f"{device_name(device)} ({platform.machine()}, {bf16}), torch {torch.__version__}"


# ----------------------------------------------------------------------------- docs and ports
def write_block(path: str | Path, name: str, text: str, *, begin: str = "start", heading: str = "") -> None:
    """Put `text` between `<!-- NAME:start -->` (`begin` for start) and `<!-- NAME:end -->` in the file at
    `path`, keeping the rest. Without the markers the block is appended (after `heading`, if given)."""
    path = Path(path)
    start, end = f"<!-- {name}:{begin} -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[:doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + ("\n\n" if doc else "") + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def vaedraw_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `python -m vaedraw ARGS` in a subprocess: this interpreter, src/ on its path."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "vaedraw", *args], {**os.environ, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
