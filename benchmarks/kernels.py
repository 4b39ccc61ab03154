"""Kernel times of one training step of a preset, layer by layer, in each precision and memory layout.

    python benchmarks/kernels.py [--preset default] [--device cpu] [--reps 30]

For every conv, transposed conv and dense layer of the preset's model at its training batch size, times
the three kernels of a training step separately (forward, gradient of the input, gradient of the
weight and bias; the first layer needs no input gradient) in float32 and bfloat16, with NCHW and
channels-last tensors, through the same aten operators eager PyTorch calls. The last lines add up, per
layer, the fastest choice of each kernel: a bound on what choosing precision and layout per kernel could
give, next to the plain eager step of the whole model measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Trainer, sync  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vaedraw.config import preset  # noqa: E402
from vaedraw.run import resolve_device  # noqa: E402

LAYOUTS = {"": torch.contiguous_format, " channels-last": torch.channels_last}  # dense layers: the first only
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Layer:
    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    first: bool  # the input is data: no input gradient


def layers_of(model: nn.Module, batch: int, device: torch.device) -> list[Layer]:
    """Every conv / dense layer with the input shape it sees, found by one forward pass with hooks."""
    found: list[Layer] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: found.append(Layer(n, m, tuple(i[0].shape), not found)))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.rand(batch, *model.image_shape, device=device))
    model.train()
    for h in hooks:
        h.remove()
    return found


def timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over 3 rounds of `reps` calls."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - t0) / reps * 1000)
    return statistics.median(rounds)


def kernel_times(layer: Layer, dtype: torch.dtype, layout, device: torch.device, reps: int) -> dict[str, float]:
    m = layer.module
    x = torch.randn(layer.in_shape, device=device, dtype=dtype)
    w, b = m.weight.detach().to(dtype), m.bias.detach().to(dtype)  # cast once, outside the timed calls
    if isinstance(m, nn.Linear):
        if layout is torch.channels_last:
            return {}
        y = x @ w.t()
        g = torch.randn_like(y)
        out = {"fwd": timed(lambda: torch.addmm(b, x, w.t()), device, reps),
               "grad_w": timed(lambda: (g.t() @ x, g.sum(0)), device, reps)}
        if not layer.first:
            out["grad_in"] = timed(lambda: g @ w, device, reps)
        return out
    transposed = isinstance(m, nn.ConvTranspose2d)
    x, w = x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)
    conv_args = (list(m.stride), list(m.padding), list(m.dilation), transposed, [0, 0], m.groups)
    y = torch.ops.aten.convolution(x, w, None, *conv_args)
    g = torch.randn_like(y).contiguous(memory_format=layout)
    bias_sizes = [m.out_channels]

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(g, x, w, bias_sizes, *conv_args, mask)

    out = {"fwd": timed(lambda: torch.ops.aten.convolution(x, w, b, *conv_args), device, reps),
           "grad_w": timed(backward([False, True, True]), device, reps)}
    if not layer.first:
        out["grad_in"] = timed(backward([True, False, False]), device, reps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    dev = resolve_device(args.device)
    eager = Trainer(cfg, dev, None)  # the plain eager step, and its model's layers
    model = eager.model
    b = cfg.train.batch_size
    layers = layers_of(model, b, dev)

    print(f"{args.preset}: batch {b}, {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ms per call (median of 3 rounds of {args.reps})\n")
    print("| layer | input | variant | forward | grad input | grad weight |\n|---|---|---|---:|---:|---:|")
    best_total, fp32_total = 0.0, 0.0
    for layer in layers:
        per_variant = {}
        for dname, dtype in DTYPES.items():
            for lname, layout in LAYOUTS.items():
                t = kernel_times(layer, dtype, layout, dev, args.reps)
                if t:
                    per_variant[dname + lname] = t
        for v, t in per_variant.items():
            cells = [f"{t[k]:.2f}" if k in t else "-" for k in ("fwd", "grad_in", "grad_w")]
            name = f"{layer.name} ({type(layer.module).__name__})"
            print(f"| {name} | {list(layer.in_shape)} | {v} | " + " | ".join(cells) + " |")
        kinds = per_variant["fp32"].keys()
        best_total += sum(min(t[k] for t in per_variant.values()) for k in kinds)
        fp32_total += sum(per_variant["fp32"].values())

    x = torch.rand(b, *model.image_shape, device=dev)
    y = torch.zeros(b, dtype=torch.long, device=dev)
    step = timed(lambda: eager.step(x, y, cfg.train.lr).sum().item(), dev, max(5, args.reps // 3))
    print(f"\nconv and dense kernels, float32 NCHW: {fp32_total:.1f} ms per step")
    print(f"conv and dense kernels, the fastest variant of each: {best_total:.1f} ms per step")
    print(f"the plain eager step of the whole model (elementwise ops, loss and Adam included): {step:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
