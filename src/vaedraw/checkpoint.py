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
from .models import VAE, build_model

FORMAT = "vaedraw-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"


def versions() -> dict[str, str]:
    import safetensors

    return {
        "vaedraw": __version__, "torch": torch.__version__, "numpy": np.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename onto `path`: readers see the old or the new file, never half."""
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
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able training state (e.g. best loss)
    header: dict[str, Any] = field(default_factory=dict)


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
        "config": ckpt.config.to_dict(), "metrics": ckpt.metrics, "extra": ckpt.extra,
        "optim": optim_meta, "versions": versions(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
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
        return Checkpoint(
            config=config, model_state=groups["model"], step=int(header["step"]), optim_state=optim,
            rng=groups["rng"], metrics=header.get("metrics", {}), extra=header.get("extra", {}), header=header,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: its header is damaged ({type(e).__name__}: {e}); retrain, or restore it "
                              "from a backup") from None


def model_from_checkpoint(ckpt: Checkpoint, path: str | Path = "checkpoint") -> VAE:
    """Rebuild the network from the stored config alone and load its weights (shapes are checked)."""
    model = build_model(ckpt.config.model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.model_state))
    unexpected = sorted(set(ckpt.model_state) - set(expected))
    wrong = [k for k in expected if k in ckpt.model_state and ckpt.model_state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape mismatch for {wrong[:3]}" if wrong else "") if s)
        raise CheckpointError(f"{path}: weights do not match the stored model config ({detail}); "
                              "the config or the weights were altered")
    model.load_state_dict(ckpt.model_state)
    return model
