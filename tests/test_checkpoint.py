"""Tests for vaedraw.checkpoint: round trips, the self-describing header, atomic writes, refusals, no pickle."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vaedraw import checkpoint as ckpt_io
from vaedraw.config import build_config
from vaedraw.errors import CheckpointError
from vaedraw.models import build_model

SMALL = {"model.latent_dim": "3", "model.channels": "4", "model.hidden": "16", "model.dropout": "0.3"}


def _trained(cfg):
    """A small model and its Adam optimizer after two steps (so the optimizer has state)."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        logits, mu, logvar, _ = model(torch.rand(4, 1, 28, 28))
        loss = logits.pow(2).mean() + mu.pow(2).mean() + logvar.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


@pytest.fixture()
def saved(tmp_path):
    cfg = build_config("default", overrides=SMALL)
    model, opt = _trained(cfg)
    path = tmp_path / ckpt_io.CHECKPOINT_NAME
    rng = torch.get_rng_state()
    ckpt_io.save(path, ckpt_io.Checkpoint(
        config=cfg, model_state=model.state_dict(), step=17, optim_state=opt.state_dict(),
        rng={"cpu": rng}, metrics={"test": {"loss": 1.5}}))
    return path, cfg, model, opt, rng


def _rewrite_header(path: Path, change) -> None:
    """Rewrite the file with the same tensors and change(header) as its header."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["vaedraw"])
    change(header)
    save_file(tensors, str(path), metadata={"vaedraw": json.dumps(header)})


def test_save_load_gives_identical_outputs(saved):
    path, cfg, model, _, _ = saved
    ckpt = ckpt_io.load(path)
    loaded = ckpt_io.model_from_checkpoint(ckpt, path)
    assert type(loaded) is type(model)
    model.eval(), loaded.eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu_a, logvar_a = model.encode(x)
        mu_b, logvar_b = loaded.encode(x)
        assert torch.equal(mu_a, mu_b) and torch.equal(logvar_a, logvar_b)
        assert torch.equal(model.decode(mu_a), loaded.decode(mu_b))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt.model_state[k])


def test_the_optimizer_state_and_rng_round_trip(saved):
    path, cfg, model, opt, rng = saved
    ckpt = ckpt_io.load(path)
    fresh = build_model(cfg.model)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optim_state)
    a, b = opt.state_dict(), opt2.state_dict()
    # JSON turns the betas tuple into a list; the values are what matter
    assert json.loads(json.dumps(a["param_groups"])) == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])
    assert torch.equal(ckpt.rng["cpu"], rng)
    torch.set_rng_state(ckpt.rng["cpu"])
    a = torch.rand(5)
    torch.set_rng_state(rng)
    assert torch.equal(a, torch.rand(5))


def test_the_header_describes_the_checkpoint(saved):
    path, cfg, _, _, _ = saved
    header = ckpt_io.read_header(path)
    assert header["format"] == ckpt_io.FORMAT and header["format_version"] == ckpt_io.FORMAT_VERSION
    assert header["step"] == 17
    assert header["config"] == cfg.to_dict()
    assert header["metrics"] == {"test": {"loss": 1.5}}
    assert {"vaedraw", "torch", "safetensors", "numpy", "python"} <= set(header["versions"])
    assert header["versions"]["torch"] == torch.__version__
    ckpt = ckpt_io.load(path)
    assert ckpt.config == cfg and ckpt.step == 17
    # every tensor sits under a known prefix
    with safe_open(str(path), framework="pt") as f:
        assert {k.split("/")[0] for k in f.keys()} == {"model", "optim", "rng"}


def test_an_interrupted_write_leaves_the_old_checkpoint(saved, monkeypatch):
    path, cfg, model, _, _ = saved
    before = path.read_bytes()

    def save_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial" * 1000)  # half a file in the temporary path
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save(path, ckpt_io.Checkpoint(config=cfg, model_state=model.state_dict(), step=99))
    assert path.read_bytes() == before
    assert ckpt_io.load(path).step == 17
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was removed


def test_a_rewrite_replaces_the_file_whole(saved):
    path, cfg, model, _, _ = saved
    ckpt_io.save(path, ckpt_io.Checkpoint(config=cfg, model_state=model.state_dict(), step=18))
    ckpt = ckpt_io.load(path)
    assert ckpt.step == 18 and ckpt.optim_state is None and ckpt.rng == {}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("keep", [0, 8, 100, 0.5, 0.999])
def test_a_truncated_file_is_a_checkpoint_error(saved, keep):
    path = saved[0]
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError):
        ckpt_io.load(path)


def test_a_corrupted_header_is_a_checkpoint_error(saved):
    path = saved[0]
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = bytes(b ^ 0x5A for b in data[8:8 + n])  # garble the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        ckpt_io.load(path)
    path.write_bytes(b"\xff" * 8 + bytes(data[8:]))  # an absurd header length
    with pytest.raises(CheckpointError):
        ckpt_io.load(path)


def test_random_bytes_and_a_missing_file_are_checkpoint_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError):
        ckpt_io.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt_io.load(tmp_path / "absent.safetensors")


def test_a_file_without_our_header_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not written by vaedraw"):
        ckpt_io.load(path)
    save_file({"w": torch.zeros(3)}, str(path), metadata={"vaedraw": json.dumps({"format": "other"})})
    with pytest.raises(CheckpointError, match="not a vaedraw checkpoint"):
        ckpt_io.load(path)


@pytest.mark.parametrize("version", [ckpt_io.FORMAT_VERSION + 1, "1", None])
def test_a_newer_or_malformed_format_version_is_refused(saved, version):
    path = saved[0]
    _rewrite_header(path, lambda h: h.update(format_version=version))
    with pytest.raises(CheckpointError, match="newer vaedraw"):
        ckpt_io.load(path)


def test_a_newer_config_version_is_refused(saved):
    path = saved[0]
    _rewrite_header(path, lambda h: h["config"].update(version=h["config"]["version"] + 1))
    with pytest.raises(CheckpointError, match="newer"):
        ckpt_io.load(path)


def test_a_tampered_config_that_disagrees_with_the_weights_is_refused(saved):
    path = saved[0]
    _rewrite_header(path, lambda h: h["config"]["model"].update(latent_dim=5))
    ckpt = ckpt_io.load(path)  # the config itself is valid ...
    assert ckpt.config.model.latent_dim == 5
    with pytest.raises(CheckpointError, match="do not match"):  # ... but not for these weights
        ckpt_io.model_from_checkpoint(ckpt, path)
    def to_seed(h):  # the seed architecture, without the conv architecture's own options
        model = h["config"]["model"]
        for key in ("conv", "channels", "hidden"):
            model.pop(key, None)
        model.update(latent_dim=3, arch="seed")

    _rewrite_header(path, to_seed)
    with pytest.raises(CheckpointError, match="do not match"):
        ckpt_io.model_from_checkpoint(ckpt_io.load(path), path)


def test_an_invalid_stored_config_is_a_checkpoint_error(saved):
    path = saved[0]
    _rewrite_header(path, lambda h: h["config"]["model"].update(width=3))
    with pytest.raises(CheckpointError, match="model.width"):
        ckpt_io.load(path)


def test_an_unexpected_tensor_is_refused(saved):
    path = saved[0]
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["extra/w"] = torch.zeros(2)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="extra/w"):
        ckpt_io.load(path)


class _Marker:
    """Unpickling this touches a file: proof that a loader executed code from the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_loading_never_unpickles(saved, tmp_path, monkeypatch):
    path = saved[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load used pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt = ckpt_io.load(path)
    ckpt_io.model_from_checkpoint(ckpt, path)
    monkeypatch.undo()

    # a pickle (as torch.save writes) under the checkpoint's name is refused, and its payload never runs
    marker = tmp_path / "executed"
    evil = tmp_path / "evil" / ckpt_io.CHECKPOINT_NAME
    evil.parent.mkdir()
    torch.save({"model": _Marker(str(marker))}, evil)
    with pytest.raises(CheckpointError):
        ckpt_io.load(evil)
    evil.write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(CheckpointError):
        ckpt_io.load(evil)
    assert not marker.exists()


def test_atomic_write_gives_the_file_the_usual_mode(tmp_path):
    """mkstemp's private 0600 must not leak into run directories that others read."""
    import os

    from vaedraw.checkpoint import _UMASK, atomic_write_text

    path = tmp_path / "config.json"
    atomic_write_text(path, "{}")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_UMASK


@pytest.mark.parametrize("change, words", [
    (lambda h: h.update(step=-1), "step -1"),
    (lambda h: h.update(step=2.5), "step 2.5"),
    (lambda h: h.update(step=True), "step True"),
    (lambda h: h.update(image_shape=[1, 28]), "image shape"),
    (lambda h: h.update(image_shape=[0, 28, 28]), "image shape"),
], ids=["negative step", "fractional step", "boolean step", "two-number image shape", "zero channels"])
def test_a_header_with_impossible_numbers_is_refused(saved, change, words):
    path = saved[0]
    _rewrite_header(path, change)
    with pytest.raises(CheckpointError, match=words):
        ckpt_io.load(path)


@pytest.mark.parametrize("prefix", ["model/", "optim/"])
def test_non_finite_weights_or_moments_are_refused(saved, prefix):
    path = saved[0]
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    name = next(k for k, v in tensors.items() if k.startswith(prefix) and v.is_floating_point() and v.numel() > 1)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[-1] = float("inf")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        ckpt_io.load(path)


def test_shapes_are_checked_before_any_network_is_built(saved, monkeypatch):
    """A header describing a huge network is refused from the shapes alone: no weights are allocated."""
    path = saved[0]
    _rewrite_header(path, lambda h: h["config"]["model"].update(latent_dim=5))
    ckpt = ckpt_io.load(path)
    built = []
    real_build = ckpt_io.build_model

    def spy(cfg, shape):
        built.append(torch.empty(0).device.type)  # the device new tensors are created on
        return real_build(cfg, shape)

    monkeypatch.setattr(ckpt_io, "build_model", spy)
    with pytest.raises(CheckpointError, match="do not match"):
        ckpt_io.model_from_checkpoint(ckpt, path)
    assert built == ["meta"]  # only the shape skeleton was built
    monkeypatch.setattr(ckpt_io, "MAX_PARAMETERS", 1000)
    with pytest.raises(CheckpointError, match="parameters, more than"):
        ckpt_io.model_from_checkpoint(ckpt_io.load(saved[0]), path)


def test_a_checkpoint_without_an_image_shape_loads_as_28x28(saved):
    path = saved[0]
    _rewrite_header(path, lambda h: h.pop("image_shape", None))
    ckpt = ckpt_io.load(path)
    assert ckpt.image_shape is None
    assert tuple(ckpt_io.model_from_checkpoint(ckpt, path).image_shape) == (1, 28, 28)


def test_a_checkpoint_saved_before_shapes_were_recorded_fits_only_28x28_grey(tiny_run):
    from vaedraw.errors import CheckpointError
    from vaedraw.rundir import check_checkpoint_fits

    ckpt = ckpt_io.load(tiny_run / ckpt_io.CHECKPOINT_NAME)
    ckpt.image_shape = None  # as written by earlier versions
    check_checkpoint_fits(ckpt, (1, 28, 28), tiny_run)
    with pytest.raises(CheckpointError, match=r"\(1, 28, 28\)"):
        check_checkpoint_fits(ckpt, (3, 32, 32), tiny_run)
