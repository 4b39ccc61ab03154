"""ONNX export of a trained run, for clients without PyTorch: `vaedraw export RUN_DIR --onnx OUT_DIR`.

OUT_DIR receives three files:

    decoder.onnx   code [B, D] float32 (+ label [B] int64 for conditional models, + eps_0.. [B, *lower_shapes[i]]
                   float32 for models with latent groups below the code) -> x_mean [B, C, H, W] in [0, 1]
    encoder.onnx   image [B, C, H, W] float32 in [0, 1] (+ label [B] int64) -> mu [B, D], logvar [B, D]
    model.json     what a client needs beside them: image shape, code size, classes, preset, likelihood,
                   the graphs' inputs and outputs, and the sampler's parameters (the fitted Gaussian
                   mixture's weights, means and covariances; the prior's temperature)

The graphs hold no random operation: the decoder is a deterministic function of its inputs (the noise of
the lower latent groups is an input; zeros put them at their prior means, as `decode` does by default), and
both are exported in eval mode (dropout off). The batch size B is dynamic. x_mean is the same pixel mean
every picture of the package shows (objectives.pixel_mean of the decoder output).

Exporter: torch.onnx.export with the torch.export-based exporter (`dynamo=True`, PyTorch's default since
2.9; it needs onnxscript). The older TorchScript exporter is deprecated and slated for removal. Every export
is checked before it is written: onnx's checker, no random or dropout node, and onnxruntime's outputs on a
small batch against PyTorch's. The files appear together: the export is built in a temporary folder
beside (or inside) OUT_DIR and renamed into place, model.json last.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import OutputError, VaedrawError
from .outputs import check_output, show

DECODER_NAME, ENCODER_NAME, META_NAME = "decoder.onnx", "encoder.onnx", "model.json"
FORMAT, FORMAT_VERSION = "vaedraw-onnx", 1
INSTALL_HINT = "pip install 'vaedraw[onnx]'"
# ONNX operators that draw random numbers or drop units: an exported graph must hold none of them
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
              "Dropout"}
CHECK_BATCH = 3  # images in the export's own check against PyTorch
ATOL = 1e-4  # its tolerance: pixel means in [0, 1]; codes |mu|, |logvar| of order 1 get ATOL * (1 + |value|)


def require_onnx() -> None:
    """A VaedrawError naming the install command unless the exporter's packages can be imported."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise VaedrawError(f"export --onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                           f"not installed; install {'it' if len(missing) == 1 else 'them'} with `{INSTALL_HINT}`")


def check_out_dir(out: str | os.PathLike) -> Path:
    """Refuse, before any work, an OUT_DIR that cannot receive the three files (a file there, a link or a
    folder where one of the files belongs, no permission)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--onnx {show(out)} is a file, not a folder; give a folder for the exported model")
    for name, kind in ((DECODER_NAME, ".onnx"), (ENCODER_NAME, ".onnx"), (META_NAME, ".json")):
        check_output(out / name, (kind,), "--onnx")
    return out


# ----------------------------------------------------------------------------- the graphs
class _Decoder(nn.Module):
    """code [B, D] (, label [B]) (, eps: a list of [B, *lower_shapes[i]]) -> pixel means [B, C, H, W]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, code, label=None, eps=None):
        from .objectives import pixel_mean

        m = self.model
        return pixel_mean(m.decode(code, label, eps).float(), m.likelihood, m.image_shape[0])


class _Encoder(nn.Module):
    """image [B, C, H, W] (, label [B]) -> (mu, logvar) [B, D] each: the code's posterior."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image, label=None):
        mu, logvar = self.model.encode(image, label)
        return mu.float(), logvar.float()


def _arguments(spec: dict, inputs: dict[str, torch.Tensor]) -> tuple:
    """A graph's inputs by name -> the wrapper's positional arguments (first, label or None[, eps list or None])."""
    first = inputs[spec["inputs"][0]["name"]]
    eps = [inputs[i["name"]] for i in spec["inputs"] if i["name"].startswith("eps_")]
    args = (first, inputs.get("label"))
    return args + (eps or None,) if spec["file"] == DECODER_NAME else args


def _io(model) -> dict:
    """The graphs' inputs and outputs: {"decoder": {"inputs": [...], "outputs": [...]}, "encoder": ...},
    each entry {"name", "shape" (the first dimension "batch"), "dtype"}."""
    c, h, w = model.image_shape
    d = model.code_dim
    label = [{"name": "label", "shape": ["batch"], "dtype": "int64"}] if model.n_classes else []
    eps = [{"name": f"eps_{i}", "shape": ["batch", *map(int, s)], "dtype": "float32"}
           for i, s in enumerate(model.lower_shapes)]
    return {
        "decoder": {"file": DECODER_NAME,
                    "inputs": [{"name": "code", "shape": ["batch", d], "dtype": "float32"}, *label, *eps],
                    "outputs": [{"name": "x_mean", "shape": ["batch", c, h, w], "dtype": "float32"}]},
        "encoder": {"file": ENCODER_NAME,
                    "inputs": [{"name": "image", "shape": ["batch", c, h, w], "dtype": "float32"}, *label],
                    "outputs": [{"name": "mu", "shape": ["batch", d], "dtype": "float32"},
                                {"name": "logvar", "shape": ["batch", d], "dtype": "float32"}]},
    }


def example_inputs(model, spec: dict, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for one graph (`spec` an entry of `_io`): n seeded random codes, images in [0, 1], labels
    0, 1, ... and noise at temperature 0.5."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for inp in spec["inputs"]:
        shape = (n, *inp["shape"][1:])
        if inp["name"] == "label":
            out["label"] = torch.arange(n) % model.n_classes
        elif inp["name"] == "image":
            out["image"] = torch.rand(shape, generator=g)
        else:
            out[inp["name"]] = (0.5 if inp["name"].startswith("eps_") else 1.0) * torch.randn(shape, generator=g)
    return out


def _export_graph(wrapper: nn.Module, spec: dict, inputs: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """torch.onnx.export of one graph with a dynamic batch; an exporter failure is a VaedrawError saying why."""
    names = [i["name"] for i in spec["inputs"]]
    batch = torch.export.Dim("batch", min=1)
    part = "decoder" if spec["file"] == DECODER_NAME else "encoder"
    quiet = logging.getLogger("torch")  # e.g. that torchvision's operators are not registered
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # the exporter's notes on its internals, and the graphs it prints when tracing fails, are not the user's
        # concern: a failure is one line below
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            args = _arguments(spec, inputs)
            batch_dim = {0: batch}
            shapes = tuple(None if a is None else [batch_dim] * len(a) if isinstance(a, list) else batch_dim
                           for a in args)  # every tensor input has a dynamic batch
            torch.onnx.export(wrapper, args, str(path), dynamo=True,
                              input_names=names, output_names=[o["name"] for o in spec["outputs"]],
                              dynamic_shapes=shapes, external_data=False,
                              verbose=False, optimize=True)
    except Exception as e:  # the exporter's many failure types mean one thing here: this network does not export
        cause = e
        while cause.__cause__ is not None:  # the exporter wraps the error that says what failed
            cause = cause.__cause__
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
        reason = next((line.strip() for line in lines if line.strip()), "")[:300]
        raise VaedrawError(f"model.arch={arch} cannot be exported to ONNX: the exporter failed on its {part} "
                           f"({type(cause).__name__}: {reason}); its decode and encode must be traceable by "
                           "torch.export: no branch on tensor values, no .item() or numpy inside") from e
    finally:
        quiet.setLevel(level)


def _check_graph(path: Path, spec: dict, arch: str) -> int:
    """onnx's checker and the no-random-node rule. -> the graph's opset."""
    import onnx

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    part = "decoder" if spec["file"] == DECODER_NAME else "encoder"
    random_ops = sorted({n.op_type for n in graph.graph.node} & RANDOM_OPS)
    if random_ops:
        raise VaedrawError(f"model.arch={arch} cannot be exported to ONNX: its {part} draws random numbers or "
                           f"drops units inside the graph ({', '.join(random_ops)}); an exported graph must be "
                           "deterministic, with any noise given as an input (decode's eps)")
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0)


def run_onnx(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an exported graph with onnxruntime on the CPU (one thread). -> its outputs in order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _compare(path: Path, wrapper: nn.Module, model, spec: dict, arch: str) -> None:
    """onnxruntime's outputs on CHECK_BATCH inputs against PyTorch's, within ATOL."""
    inputs = example_inputs(model, spec, CHECK_BATCH, seed=1)
    with torch.no_grad():
        ref = wrapper(*_arguments(spec, inputs))
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = run_onnx(path, {k: v.numpy() for k, v in inputs.items()})
    for out, a, b in zip(spec["outputs"], got, ref):
        b = b.numpy()
        if a.shape != b.shape or not np.allclose(a, b, rtol=ATOL, atol=ATOL):
            err = float(np.max(np.abs(a - b))) if a.shape == b.shape else f"shape {a.shape} vs {b.shape}"
            raise VaedrawError(f"model.arch={arch}: the exported {spec['file']} computes another {out['name']} than "
                               f"PyTorch (largest difference {err}); it was not written")


# ----------------------------------------------------------------------------- the API
def model_description(model, *, preset: str, arch: str, step: int | None = None, gmm=None,
                      temperature: float = 1.0, default_sampler: str = "prior", opset: int | None = None) -> dict:
    """model.json's content (see the module docstring). gmm: a sample.GaussianMixture or None."""
    mixture = None
    if gmm is not None:
        tril = gmm.scale_tril.double()
        weights = gmm.weights.double()
        mixture = {"weights": (weights / weights.sum()).tolist(),  # float64, so they sum to 1 for numpy's choice
                   "means": gmm.means.double().tolist(),
                   "covariances": (tril @ tril.transpose(-1, -2)).tolist(),  # scale_tril @ scale_tril^T
                   "labels": None if gmm.labels is None else gmm.labels.tolist()}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "vaedraw": __version__,
        "preset": preset, "arch": arch, "likelihood": model.likelihood, "step": step,
        "image_shape": list(map(int, model.image_shape)), "latent_dim": int(model.code_dim),
        "n_classes": int(model.n_classes), "lower_shapes": [list(map(int, s)) for s in model.lower_shapes],
        "pixel_range": [0.0, 1.0], "opset": opset, **_io(model),
        "sampler": {
            "default": default_sampler if mixture is not None else "prior",
            # z ~ N(0, temperature^2 I); for models with lower groups, eps_i ~ N(0, temperature^2 I) too,
            # or zeros for the groups' prior means
            "prior": {"temperature": float(temperature)},
            # z = means[k] + L_k eps with covariances[k] = L_k L_k^T, k ~ weights (for a conditional model,
            # among the components whose label is the digit asked for)
            "gmm": mixture,
        },
    }


def export_model(model, out: str | os.PathLike, *, preset: str, arch: str, step: int | None = None, gmm=None,
                 temperature: float = 1.0, default_sampler: str = "prior") -> list[Path]:
    """Export `model` (any device; copied to the CPU, float32, eval mode) into `out`. -> the written paths.

    Raises VaedrawError when the network cannot be exported (and says why) or when the packages are missing;
    nothing in `out` changes then."""
    require_onnx()
    out = check_out_dir(out)
    model = copy.deepcopy(model).float().cpu().eval()
    specs = _io(model)
    staging = _staging_dir(out)
    try:
        opset = None
        for part, wrapper in (("decoder", _Decoder(model).eval()), ("encoder", _Encoder(model).eval())):
            spec = specs[part]
            path = staging / spec["file"]
            _export_graph(wrapper, spec, example_inputs(model, spec, 5), path, arch)
            opset = _check_graph(path, spec, arch)
            _compare(path, wrapper, model, spec, arch)
        meta = model_description(model, preset=preset, arch=arch, step=step, gmm=gmm, temperature=temperature,
                                 default_sampler=default_sampler, opset=opset)
        (staging / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_run(run, out: str | os.PathLike) -> list[Path]:
    """Export a loaded run (run.Run): its model, preset, step and sampler parameters."""
    cfg = run.config
    return export_model(run.model, out, preset=cfg.preset, arch=cfg.model.arch, step=run.step, gmm=run.gmm,
                        temperature=cfg.sample.temperature, default_sampler=run.default_sampler)


def _staging_dir(out: Path) -> Path:
    """A temporary folder on OUT_DIR's file system: inside it when it exists, else beside it."""
    if out.is_dir():
        return Path(tempfile.mkdtemp(prefix=".vaedraw-export.", suffix=".tmp", dir=out))
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _put_in_place(staging: Path, out: Path) -> list[Path]:
    """Move the staged files into `out`: a new folder is renamed whole; into an existing one the files are
    renamed one by one, model.json last, so a client that finds model.json finds graphs that match it."""
    names = [DECODER_NAME, ENCODER_NAME, META_NAME]
    for name in names:
        with open(staging / name, "rb") as f:
            os.fsync(f.fileno())
    if not out.exists():
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the mode mkdir would
        os.replace(staging, out)
    else:
        for name in names:
            os.replace(staging / name, out / name)
    return [out / name for name in names]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
