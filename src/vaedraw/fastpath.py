"""The fast training step: precision, compilation, memory layout and CUDA graphs, chosen per device.

`choose_plan(cfg.train, cfg.model.arch, device)` settles how a step runs; `FastStep(model, opt, cfg, plan)`
is then called once per optimizer step:

    step(x, y, lr) -> stats float32 [3] = (loss, recon, kl) on the device, detached, no host sync

x: float [b, C, H, W] in [0, 1] (this process's rows of the global batch), y: int64 [b] or None.

What a plan can switch on (each one only where it measured faster: on this machine by autotune.py, else
per the AUTO table):
- bf16: torch.autocast of the forward pass; the loss, gradients and Adam stay float32.
- compile: torch.compile of the forward pass and loss (backward through AOTAutograd).
- channels_last: NHWC activations and conv weights (oneDNN and cuDNN prefer it).
- conv_as_conv: the seed network's stride-1 transposed convs (about 61% of its FLOPs) as ordinary convs
  on the same weights: convT(x, W) cropped by (1, 2) = conv(pad(x, (2, 1, 2, 1)), flip(W)^T), exactly.
- cuda_graph: the whole step (noise, forward, backward, Adam) captured once and replayed, with static
  input buffers, capturable Adam and the learning rate as a device tensor.
- keep_memory (CPUs): glibc's malloc keeps freed memory in the process instead of returning large blocks
  to the OS, which every step would page-fault back in. It applies to the whole process.

Training noise (dynamic binarization, reparameterization eps, dropout masks) is drawn for the whole global
batch on every process, each process keeping its own rows (`Noise`). N processes therefore draw exactly
the noise one process would, and a data-parallel run follows the single-process run.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import SameCrop
from .objectives import iwae_bound

# The static `auto` plan, by device class and architecture, with the measurement behind it
# (benchmarks/speed.py, docs/SPEED.md; CPU: 2-core AMD EPYC with AVX512-BF16, torch 2.13, shared machine).
# `vaedraw train` measures `auto` on its own machine instead (autotune.py: the candidates around this row,
# timed once per model and machine, then cached); this row is what it starts from and what runs use with
# train.autotune=false, runs too short to measure, and code that calls choose_plan alone.
AUTO: dict[tuple[str, str], dict[str, bool | str]] = {
    # seed on CPU: fused Adam + conv_as_conv + channels-last + bf16 is the fastest eager variant measured
    # (see SPEED.md); compile did not pay for its compile time within a run. bf16's 2,000-step test loss
    # stayed within 1% of float32.
    ("cpu-bf16", "seed"): {"precision": "bf16", "compile": False, "channels_last": True, "conv_as_conv": True},
    # without AVX512-BF16 the bf16 kernels are emulated and slower: float32.
    ("cpu", "seed"): {"precision": "fp32", "compile": False, "channels_last": True, "conv_as_conv": True},
    # default (ConvVAE, 1.7M parameters, batch 128) on CPU: bf16 autocast is the fastest variant measured;
    # its 2,000-step test loss is 0.04% from float32. channels-last and compile measured no faster.
    ("cpu-bf16", "conv"): {"precision": "bf16", "compile": False, "channels_last": False, "conv_as_conv": False},
    ("cpu", "conv"): {"precision": "fp32", "compile": False, "channels_last": False, "conv_as_conv": False},
    # hierarchical on CPU: bf16 autocast + channels-last measured fastest (93 ms/step against float32's 135 ms
    # on a loaded 2-core AMD EPYC, by the measured plan; docs/SPEED.md).
    ("cpu-bf16", "hierarchical"): {"precision": "bf16", "compile": False, "channels_last": True,
                                   "conv_as_conv": False},
    ("cpu", "hierarchical"): {"precision": "fp32", "compile": False, "channels_last": False, "conv_as_conv": False},
    # GPUs: the whole step in one CUDA graph, TF32 matmuls, bf16 autocast (per the H100 numbers in SPEED.md).
    ("cuda", "seed"): {"precision": "bf16", "compile": False, "channels_last": False, "conv_as_conv": True,
                       "cuda_graph": True},
    ("cuda", "conv"): {"precision": "bf16", "compile": False, "channels_last": False, "conv_as_conv": False,
                       "cuda_graph": True},
    ("cuda", "hierarchical"): {"precision": "bf16", "compile": False, "channels_last": False, "conv_as_conv": False,
                               "cuda_graph": True},
}
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")  # train.precision: auto is measured (or AUTO's row)
COMPILE_MODES: tuple[str, ...] = ("auto", "on", "off")  # train.compile: auto is measured (or AUTO's row)
GRAPH_WARMUP = 3  # eager steps (on a side stream) before capture: lazy state such as Adam's moments


@dataclass(frozen=True)
class Plan:
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward pass)
    compile: bool = False
    channels_last: bool = False
    conv_as_conv: bool = False
    cuda_graph: bool = False
    keep_memory: bool = False
    reason: str = ""

    def describe(self) -> str:
        switches = ("compile", "channels_last", "conv_as_conv", "cuda_graph", "keep_memory")
        on = [k for k in switches if getattr(self, k)]
        return f"{self.precision}" + (f" + {' + '.join(on)}" if on else "") + (f" ({self.reason})" if self.reason else "")


# ----------------------------------------------------------------------------- choosing
@functools.cache
def cpu_has_bf16() -> bool:
    """Native bfloat16 dot products on this CPU (AVX512-BF16 or AMX)? Linux flags; elsewhere oneDNN's own check."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        return " avx512_bf16" in flags or " amx_bf16" in flags
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_class(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda"
    return "cpu-bf16" if device.type == "cpu" and cpu_has_bf16() else "cpu"


def choose_plan(train_cfg, arch: str, device: torch.device, distributed: bool = False) -> Plan:
    """Settle cfg.train.precision / cfg.train.compile ('auto' takes AUTO's row) into a Plan for `device`.

    This is the static plan; training then lets autotune.settle measure what is 'auto' (train.autotune)."""
    cls = device_class(device)
    row = dict(AUTO.get((cls, arch), {}))
    reason = f"auto for {cls}/{arch}"
    if train_cfg.precision != "auto":
        row["precision"], reason = train_cfg.precision, "as asked"
    if train_cfg.compile != "auto":
        row["compile"] = train_cfg.compile == "on"
        reason = "as asked"
    if (cls, arch) not in AUTO:
        # said once, in the plan's description that training prints when it starts
        missing = f"no fast-path row for {cls}/{arch} in fastpath.AUTO, so the plain settings"
        reason = missing if reason.startswith("auto") else f"{reason}; {missing}"
    if row.get("precision") == "bf16" and cls == "cpu" and train_cfg.precision == "auto":
        row["precision"] = "fp32"
    if device.type != "cuda":
        row["cuda_graph"] = False
    row["keep_memory"] = device.type == "cpu"
    if row.get("compile") or distributed:
        # torch.compile brings its own graphs; gradient all-reduce hooks run on the host between kernels.
        row["cuda_graph"] = False
    if arch != "seed":
        row["conv_as_conv"] = False
    return Plan(reason=reason, **row)


def use_fixed_shape_kernels(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest
    (cudnn.benchmark): training and the IWAE pass run the same few shapes thousands of times. Float32
    matmuls stay float32 (no TF32): the fp32 plan is the reference the others are checked against."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process (Linux; elsewhere nothing happens).

    By default glibc serves blocks above a threshold with mmap and returns them, and the top of its heap,
    to the OS when freed; a training step allocates and frees the same large tensors every time (the
    bf16 copy of a 10M-parameter weight, its gradient), so each step page-faults them back in. Raising
    both thresholds measured 13-25% faster steps on the CPU (docs/SPEED.md). Returns whether glibc agreed.
    """
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


# ----------------------------------------------------------------------------- noise
class Noise:
    """Training noise drawn for the global batch on every process; this process keeps rows [r*b, (r+1)*b).

    Uses the global torch RNG of the device (saved in checkpoints, registered with CUDA graphs).
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def _rows(self, t: torch.Tensor, b: int) -> torch.Tensor:
        return t[self.rank * b:(self.rank + 1) * b] if self.world > 1 else t

    def uniform_like(self, x: torch.Tensor) -> torch.Tensor:
        """u ~ U[0, 1) with x's shape [b, ...]."""
        return self._rows(torch.rand(self.world * x.shape[0], *x.shape[1:], device=x.device), x.shape[0])

    def keep_mask(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """A dropout keep mask, bool with x's shape [b, ...], True with probability 1 - p.

        Each element compares 16 random bits with p * 2^16 (so p counts in steps of 2^-16): a quarter of
        the generator calls of uniform floats, which dominate a CPU step's dropout cost (docs/SPEED.md).
        """
        n = self.world * x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
        shape = (self.world * x.shape[0], *x.shape[1:])
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # the mask in x's own (NHWC) layout: elementwise ops across layouts run at about half speed
            b, c, h, w = shape
            u16 = bits.view(torch.int16)[:n].view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            u16 = bits.view(torch.int16)[:n].view(shape)
        return self._rows(u16, x.shape[0]) >= -2 ** 15 + round(p * 2 ** 16)

    def normal_like(self, x: torch.Tensor) -> torch.Tensor:
        """eps ~ N(0, I) with x's shape [b, ...], float32."""
        return self._rows(torch.randn(self.world * x.shape[0], *x.shape[1:], device=x.device), x.shape[0])


class GlobalDropout(nn.Module):
    """nn.Dropout whose mask comes from `Noise` (the global batch's mask, this process's rows).

    Inverted dropout: keep with probability 1 - p and scale by 1 / (1 - p); identity in eval mode.
    """

    def __init__(self, p: float, noise: Noise):
        super().__init__()
        self.p, self.noise = p, noise

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return h
        # a bool mask multiplies without a cast of its own; the scale then goes in place (one pass less)
        return h.mul(self.noise.keep_mask(h, self.p)).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FlippedConvTranspose(nn.Module):
    """A stride-1 4x4 transposed conv followed by the (1, 2) crop, as one ordinary conv on the same weights.

    convT(x, W)[1:-2, 1:-2] = conv(pad(x, (2, 1, 2, 1)), W') with W' = W.transpose(0, 1).flip(2, 3). x: [B, C, H, W]
    -> [B, C', H, W]. The parameters stay those of the wrapped ConvTranspose2d (same state_dict entries).
    """

    def __init__(self, convt: nn.ConvTranspose2d):
        super().__init__()
        self.weight, self.bias = convt.weight, convt.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(0, 1).flip(2, 3)
        if h.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(F.pad(h, (2, 1, 2, 1)), w, self.bias)


def prepare_model(model: nn.Module, plan: Plan, noise: Noise) -> nn.Module:
    """Rewire `model` in place for the plan; parameter names and values are unchanged, so state_dicts and
    checkpoints are exactly those of the plain model. Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, GlobalDropout(child.p, noise))
        if plan.conv_as_conv and isinstance(module, nn.Sequential):
            kids = list(module)
            for i in range(len(kids) - 1):
                c = kids[i]
                if (isinstance(c, nn.ConvTranspose2d) and c.stride == (1, 1) and c.padding == (0, 0)
                        and c.kernel_size == (4, 4) and isinstance(kids[i + 1], SameCrop)):
                    # the parameters keep their names: index i holds the conv's weight and bias still
                    module[i] = FlippedConvTranspose(c)
                    module[i + 1] = nn.Identity()
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- the step
class Objective(nn.Module):
    """forward(x, y) -> stack(loss, recon, kl): float32 [3], batch means; the module DDP wraps (its parameters
    are the model's). The terms are the model's own, with this step's noise.

    loss is the objective as trained: recon + w * kl with the KL weight w (`kl_weight`, a device scalar set
    by FastStep: below 1 during train.kl_warmup), or with train.iwae_k = K > 1 the importance-weighted bound
    -L_K = -log (1/K) sum_j p(x|z_j) p(z_j)^w / q(z_j|x)^w (Burda et al. 2015), whose recon and kl are the
    means over the K samples of -log p(x|z_j) and log q(z_j|x) - log p(z_j).
    """

    def __init__(self, model: nn.Module, binarize: bool, plan: Plan, noise: Noise, iwae_k: int = 1):
        super().__init__()
        self.model, self.binarize, self.plan, self.noise, self.iwae_k = model, binarize, plan, noise, iwae_k
        self.kl_weight = torch.ones(())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.binarize:  # dynamic binarization x ~ Bernoulli(pixel)
            x = (self.noise.uniform_like(x) < x).to(x.dtype)
        if self.plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y if self.model.n_classes else None
        w = self.kl_weight.to(x.device)
        with autocast(x.device, self.plan):
            if self.iwae_k > 1:
                log_px, log_ratio = self.model.log_weight_terms(x, y, self.iwae_k, self.noise.normal_like,
                                                                chunk=self.iwae_k)
                loss = -iwae_bound(log_px + w * log_ratio).mean()
                return torch.stack([loss, -log_px.mean(), -log_ratio.mean()])
            recon, kl, _ = self.model.elbo_terms(x, y, self.noise.normal_like)
        recon, kl = recon.mean(), kl.mean()
        return torch.stack([recon + w * kl, recon, kl])


def inference_autocast(device: torch.device, precision: str = "auto"):
    """Autocast for decoding pictures. auto: bfloat16 where the device computes it natively (CUDA,
    AVX512-BF16 CPUs; pixel means move by a few grey levels at most and FD by 0.03%, docs/SPEED.md),
    else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device_class(device) == "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def autocast(device: torch.device, plan: Plan):
    if plan.precision != "bf16":
        return contextlib.nullcontext()
    # no weight-cast cache: inside a CUDA graph a cache would hold casts of stale weights
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def make_optimizer(model: nn.Module, cfg, device: torch.device, plan: Plan) -> torch.optim.Adam:
    """Adam with a fused kernel (CUDA, and CPU: one pass over the 10M parameters instead of ~10), capturable
    with a device-tensor learning rate when the step is a CUDA graph."""
    t = cfg.train
    kw: dict = {"fused": True}
    lr: float | torch.Tensor = t.lr
    if plan.cuda_graph:
        kw["capturable"] = True
        lr = torch.tensor(t.lr, dtype=torch.float32, device=device)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(t.beta1, t.beta2), eps=t.eps, **kw)


def restore_optimizer_flags(opt: torch.optim.Adam, like: torch.optim.Adam) -> None:
    """After load_state_dict: keep this process's kernel flags and lr type (a checkpoint may come from
    another device)."""
    for g, ref in zip(opt.param_groups, like.param_groups):
        for key in ("fused", "foreach", "capturable", "differentiable"):
            if key in ref:
                g[key] = ref[key]
        if torch.is_tensor(ref["lr"]) and not torch.is_tensor(g["lr"]):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=ref["lr"].device)


def optimizer_state_for_saving(opt: torch.optim.Adam) -> dict:
    """opt.state_dict() with a tensor learning rate as a float (checkpoints keep hyperparameters as JSON)."""
    state = opt.state_dict()
    for g in state["param_groups"]:
        if torch.is_tensor(g["lr"]):
            g["lr"] = float(g["lr"])
    return state


class FastStep:
    """One optimizer step per call, as the plan says. See the module docstring for shapes.

    `ddp`: wrap the objective in DistributedDataParallel (gradients averaged over processes).
    With a CUDA graph, the returned stats tensor is a static buffer overwritten by the next call: read or
    accumulate it before calling again (the stream orders this).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Adam, cfg, plan: Plan, noise: Noise | None = None,
                 ddp: bool = False):
        self.model, self.opt, self.plan = model, opt, plan
        if plan.keep_memory:
            keep_freed_memory()
        self.noise = noise or Noise()
        self.grad_clip = cfg.train.grad_clip
        self.core = Objective(model, cfg.data.binarize == "dynamic", plan, self.noise, iwae_k=cfg.train.iwae_k)
        self.core.kl_weight = self.core.kl_weight.to(next(model.parameters()).device)
        objective: nn.Module = self.core
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = next(model.parameters()).device
            objective = DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None,
                            gradient_as_bucket_view=True)
        self.objective = objective
        self.forward = torch.compile(objective) if plan.compile else objective
        self.compile_s: float | None = None  # seconds spent in the first (compiling) call
        self._lr: float | None = None
        self._kl_weight = 1.0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._calls = 0

    def set_lr(self, lr: float) -> None:
        if lr == self._lr:
            return
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)  # in place: the captured graph reads this tensor
            else:
                g["lr"] = lr
        self._lr = lr

    def set_kl_weight(self, w: float) -> None:
        if w != self._kl_weight:
            self.core.kl_weight.fill_(w)  # in place: the captured graph reads this tensor
            self._kl_weight = w

    def _eager(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        stats = self.forward(x, y)
        stats[0].backward()
        if self.grad_clip > 0:
            # on the device, no host sync: gradients scaled by min(1, clip / global norm)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.opt.step()
        return stats.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, lr: float, kl_weight: float = 1.0) -> torch.Tensor:
        self.set_lr(lr)
        self.set_kl_weight(kl_weight)
        self._calls += 1
        if self.plan.cuda_graph:
            return self._graphed(x, y)
        if self.plan.compile and self.compile_s is None:
            t0 = time.perf_counter()
            out = self._eager(x, y)
            out.sum().item()  # one sync, once: the compile time is the wall time of the first call
            self.compile_s = time.perf_counter() - t0
            return out
        return self._eager(x, y)

    def _graphed(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self._graph is None and self._calls <= GRAPH_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is None:
            self._x = x.clone()
            self._y = None if y is None else y.clone()
            self.opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            self._graph = torch.cuda.CUDAGraph()
            # torch.cuda.graph registers the default CUDA generator: every replay advances its philox offset,
            # so bernoulli/dropout/eps draw fresh noise at each step (benchmarks/gpu_check.py verifies this).
            with torch.cuda.graph(self._graph):
                self._out = self._eager(self._x, self._y)
        else:
            self._x.copy_(x)
            if y is not None:
                self._y.copy_(y)
        self._graph.replay()
        return self._out


def announce(plan: Plan, device: torch.device, file=None) -> None:
    # sys.stderr looked up when called, not when imported: it may have been redirected since
    print(f"vaedraw: fast path on {device}: {plan.describe()}", file=file or sys.stderr)
