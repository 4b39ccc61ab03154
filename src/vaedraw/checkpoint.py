"""Self-describing checkpoints that load without executing code.

A checkpoint is one safetensors file (`RUN_DIR/checkpoint.safetensors`): tensors only, under the
prefixes `model/`, `optim/` and `rng/`, and a JSON header (metadata key `vaedraw`) holding the format
version, the full run config, the step, metrics, the optimizer's hyperparameters and library versions.
It is written to a temporary file in the same directory, fsynced and renamed over the old one, so an
interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import RunConfig
from .errors import CheckpointError, ConfigError
from .models import SEED_IMAGE_SHAPE, VAE, build_model, check_image_shape

FORMAT = "vaedraw-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights; the largest preset has about 10 million


def versions() -> dict[str, str]:
    import safetensors

    return {
        "vaedraw": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename onto `path`: readers see the old or the new file, never half.

    Only a regular file (or nothing) at `path` is replaced: a folder, a symbolic link or a device there
    is an OutputError, never silently swapped for a file.
    """
    from .outputs import refuse_non_regular

    refuse_non_regular(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda p: p.write_text(text))


@dataclass
class Checkpoint:
    config: RunConfig
    model_state: dict[str, torch.Tensor]
    step: int = 0
    optim_state: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the model's images; None in older files


def _flatten_optim(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch.optim state_dict -> (tensors, JSON). Non-tensor per-parameter values go to JSON."""
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` atomically to `path` (a .safetensors file)."""
    tensors = {f"model/{k}": v.detach().float().contiguous().cpu() if v.is_floating_point() else v.cpu()
               for k, v in ckpt.model_state.items()}
    optim_meta = None
    if ckpt.optim_state is not None:
        t, optim_meta = _flatten_optim(ckpt.optim_state)
        tensors.update({k: v.cpu() for k, v in t.items()})
    tensors.update({f"rng/{k}": v.cpu() for k, v in ckpt.rng.items()})
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": ckpt.step,
        "config": ckpt.config.to_dict(), "metrics": ckpt.metrics,
        "optim": optim_meta, "versions": versions(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if ckpt.image_shape is not None:
        header["image_shape"] = list(ckpt.image_shape)
    meta = {"vaedraw": json.dumps(header)}
    atomic_write_bytes(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a checkpoint, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train a run first (vaedraw train --out DIR)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({e}); it may be truncated "
                              "or corrupted: retrain, or restore it from a backup") from None
    return _parse_header(path, meta)


def _parse_header(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    try:
        header = json.loads(meta["vaedraw"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has no vaedraw header; it was not written by vaedraw") from None
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is not a vaedraw checkpoint (format {fmt!r})")
    if not isinstance(header.get("format_version"), int) or header["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer vaedraw (checkpoint format "
                              f"{header.get('format_version')!r} > {FORMAT_VERSION}); upgrade vaedraw to load it")
    return header


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint; raise CheckpointError if it is corrupt, foreign or from a newer version."""
    path = Path(path)
    header = read_header(path)
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} could not be read ({e}); it may be truncated or corrupted") from None
    try:
        config = RunConfig.from_dict(header["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is invalid: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: its header has no usable config ({type(e).__name__}: {e}); it was altered "
                              "or damaged: retrain, or restore it from a backup") from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for name, value in tensors.items():
        prefix, _, rest = name.partition("/")
        if prefix not in groups:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        groups[prefix][rest if prefix != "optim" else name] = value
    try:  # a header that parses as JSON can still lack a field or hold one of the wrong type
        optim = _unflatten_optim(groups["optim"], header["optim"]) if header.get("optim") else None
        ckpt = Checkpoint(
            config=config, model_state=groups["model"], step=header["step"], optim_state=optim,
            rng=groups["rng"], metrics=header.get("metrics", {}), image_shape=header.get("image_shape"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: its header is damaged ({type(e).__name__}: {e}); retrain, or restore it "
                              "from a backup") from None
    _check_contents(path, ckpt, groups)
    return ckpt


def _check_contents(path: Path, ckpt: Checkpoint, groups: dict[str, dict[str, torch.Tensor]]) -> None:
    """Refuse a checkpoint whose numbers cannot be a training state: a negative or non-integer step, an
    image shape that is not (C, H, W), non-finite weights or optimizer moments. Such a file is never loaded,
    in particular never as the last good state of a run."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; it was altered or damaged: retrain, or restore it from a backup")

    if type(ckpt.step) is not int or ckpt.step < 0:
        raise bad(f"its step {ckpt.step!r} is not a whole number >= 0")
    if ckpt.image_shape is not None:
        try:
            ckpt.image_shape = check_image_shape(ckpt.image_shape)
        except (ConfigError, TypeError, ValueError) as e:
            raise bad(f"its image shape is invalid ({e})") from None
    for group in ("model", "optim"):
        for name, t in groups[group].items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise bad(f"tensor {name!r} holds NaN or infinite numbers")


def model_from_checkpoint(ckpt: Checkpoint, path: str | Path = "checkpoint") -> VAE:
    """Rebuild the network from the stored config and image shape and load its weights (shapes are checked).
    A checkpoint saved before image shapes were recorded holds a 1x28x28 model."""
    try:
        image_shape = SEED_IMAGE_SHAPE if ckpt.image_shape is None else ckpt.image_shape  # checked on load
        with torch.device("meta"):  # shapes only, no memory: the header is checked before any network is built
            skeleton = build_model(ckpt.config.model, image_shape)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its header does not describe a model this vaedraw builds ({e})") from None
    n_params = sum(p.numel() for p in skeleton.parameters())
    if n_params > MAX_PARAMETERS:
        raise CheckpointError(f"{path}: its config describes a network of {n_params:,} parameters, more than the "
                              f"{MAX_PARAMETERS:,} vaedraw loads; the config was altered or is not vaedraw's")
    _check_weights(path, skeleton.state_dict(), ckpt.model_state)
    model = build_model(ckpt.config.model, image_shape)
    model.load_state_dict(ckpt.model_state)
    return model


def _check_weights(path, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [k for k in expected if k in got and got[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape mismatch for {wrong[:3]}" if wrong else "") if s)
        raise CheckpointError(f"{path}: weights do not match the stored model config ({detail}); "
                              "the config or the weights were altered")
