"""Fuzzing with a bounded budget: the IDX parser, the checkpoint reader, the web API's validation and the
command line's checks of devices, output paths and options.

Random and mutated inputs may only ever produce the errors the user is meant to see: DataError from the
IDX parser, CheckpointError from the checkpoint reader, a 4xx (never a 5xx) from the web API, one
printable line and a documented exit status from the command line. Each test is limited to a fixed
number of examples and takes a few seconds.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaedraw import checkpoint as ckpt_io
from vaedraw import data
from vaedraw.config import build_config
from vaedraw.errors import CheckpointError, DataError, VaedrawError
from vaedraw.models import build_model


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def _idx(array: np.ndarray) -> bytes:
    return (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape) \
        + array.astype(np.uint8).tobytes()


# Valid files to mutate: 3 images and their 3 labels, raw and gzipped.
_VALID = [_idx(np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256), _idx(np.array([7, 2, 1]))]
_VALID += [gzip.compress(b) for b in _VALID]


@st.composite
def _mutated(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "extend", "header"]))
        if kind == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[draw(st.integers(0, len(raw))):]
        elif kind == "extend":
            raw += draw(st.binary(max_size=64))
        elif kind == "header" and len(raw) >= 16:  # magic and dimensions, where a parser trusts the file most
            i = draw(st.integers(0, 15))
            raw[i:i + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(raw)


@FAST
@given(raw=st.one_of(st.binary(max_size=256), _mutated()))
def test_the_idx_parser_only_ever_raises_data_error(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz.idx"
    path.write_bytes(raw)
    try:
        array = data.read_idx(path)
    except DataError as e:
        assert str(path) in str(e)  # every message names the file
        return
    # what parses is what the header promised
    assert array.dtype == np.uint8 and array.ndim in (1, 3)
    assert array.ndim == 1 or array.shape[1:] == (28, 28)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    cfg = build_config("default", overrides={"model.channels": "4", "model.hidden": "16", "model.latent_dim": "2"})
    path = tmp_path_factory.mktemp("ckpt") / ckpt_io.CHECKPOINT_NAME
    ckpt_io.save(path, ckpt_io.Checkpoint(config=cfg, model_state=build_model(cfg.model).state_dict(), step=1))
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_the_checkpoint_reader_only_ever_raises_checkpoint_error(checkpoint_file, tmp_path_factory, edits, cut):
    raw = bytearray(checkpoint_file.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for where, value in edits:  # mostly in the JSON header and the 8-byte length, where parsing happens
        raw[min(int(where * header_end * 1.1), len(raw) - 1)] = value
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        ckpt = ckpt_io.load(path)
        ckpt_io.model_from_checkpoint(ckpt, path)
    except CheckpointError:
        pass


# ----------------------------------------------------------------------------- web API
@pytest.fixture(scope="module")
def client(tiny_conditional_run, mnist_dir):
    from fastapi.testclient import TestClient

    from vaedraw import web
    from vaedraw.run import load_run

    return TestClient(web.create_app(load_run(tiny_conditional_run, device="cpu"), mnist_dir, n_map=300))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                     st.none(), st.text(max_size=3))
# Bodies close to valid ones: the right keys with values of any type, lengths and ranges.
_near_valid = st.fixed_dictionaries({}, optional={
    "z": st.one_of(st.lists(_numbers, max_size=8), _json), "digit": _numbers, "seed": _numbers,
    "pixels": st.one_of(st.lists(st.floats(-1, 2), min_size=0, max_size=900), st.just([0.5] * 784),
                        st.just([0.0] * 1000)),
    "from_digit": _numbers, "to_digit": _numbers, "steps": _numbers, "extra": _json,
})
_PATHS = ["/api/decode", "/api/random", "/api/encode", "/api/interpolate"]


@FAST
@given(path=st.sampled_from(_PATHS), body=st.one_of(_json, _near_valid))
def test_random_json_bodies_never_get_a_5xx(client, path, body):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, body, r.text)
    if r.status_code >= 400:
        assert r.json()["detail"]  # a message, not an empty error


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_PATHS), raw=st.binary(max_size=200),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_random_bytes_never_get_a_5xx(client, path, raw, content_type):
    r = client.post(path, content=raw, headers={"content-type": content_type} if content_type else {})
    assert 400 <= r.status_code < 500, (path, raw, r.text)


def test_the_fuzzers_reach_the_success_paths(client, tmp_path):
    """The strategies above are not all refusals: valid inputs of the same shapes get through."""
    assert client.post("/api/decode", json={"z": [0.0] * 4, "digit": 3}).status_code == 200
    assert client.post("/api/encode", json={"pixels": [0.5] * 784, "digit": 3}).status_code == 200
    path = tmp_path / "ok"
    path.write_bytes(_VALID[2])
    assert data.read_idx(path).shape == (3, 28, 28)
    assert torch.equal(torch.from_numpy(data.read_idx(path)), torch.arange(3 * 28 * 28).reshape(3, 28, 28) % 256)


# ----------------------------------------------------------------------------- command line
_NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12)


@FAST
@given(name=st.one_of(st.text(max_size=12), st.sampled_from(["cuda:1", "cuda:99", "cpu:0", "mps", "meta", "xla",
                                                             "cuda:-1", "CUDA", " cpu ", "cuda:0x1", "vulkan"])))
def test_the_device_check_only_accepts_devices_that_exist(name):
    from vaedraw.run import resolve_device

    try:
        device = resolve_device(name)
    except VaedrawError as e:
        assert "\n" not in str(e)
        return
    assert device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()
                                    and (device.index or 0) < torch.cuda.device_count())


@FAST
@given(name=_NAMES, raw=st.binary(min_size=1, max_size=6), kind=st.sampled_from([".png", ".gif", ".npz"]),
       make=st.sampled_from(["nothing", "file", "folder", "link", "fifo"]))
def test_the_output_check_refuses_in_one_printable_line_or_returns_the_path(tmp_path_factory, name, raw, kind, make):
    import os

    from vaedraw.outputs import check_output

    folder = tmp_path_factory.mktemp("out")
    raw = raw.replace(b"/", b"_").replace(b"\x00", b"_")
    path = folder / (name + os.fsdecode(raw) + kind) if len(name) < 6 else folder / name
    try:
        if make == "file":
            path.write_bytes(b"old")
        elif make == "folder":
            path.mkdir()
        elif make == "link":
            path.symlink_to(folder / "elsewhere")
        elif make == "fifo":
            os.mkfifo(path)
    except OSError:  # a name the file system itself refuses (too long, ...)
        return
    try:
        got = check_output(path, (kind,))
    except VaedrawError as e:
        message = str(e)
        message.encode("utf-8")  # printable: no lone surrogates
        assert "\n" not in message and message.isprintable()
        assert make in ("folder", "link", "fifo") or not path.name.lower().endswith(kind)
        return
    assert got == path and make in ("nothing", "file") and path.name.lower().endswith(kind)


_TOKENS = st.sampled_from(["-n", "--out", "--npz", "--seed", "--sampler", "--temperature", "--digit", "--device",
                           "gmm", "prior", "all", "1,2", "-1", "0", "1e308", "nan", "x.png", "x.jpg", "y.npz",
                           "cpu", "mps", "cuda:7", "999999999999999999999", "--components", "--iwae-k", "",
                           "--grid", "--gif", "x.gif", "--method", "tsne", "--from-index", "--to-digit"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["sample", "reconstruct", "eval", "fit-gmm", "interpolate", "latent-map",
                                 "manifold"]),
       tokens=st.lists(st.one_of(_TOKENS, st.text(max_size=6)), max_size=6))
def test_random_command_lines_end_in_one_line_and_a_documented_status(tmp_path_factory, capsys, command, tokens):
    """A run directory that does not exist: nothing may be written, whatever the options say."""
    import os

    from vaedraw.cli import main

    folder = tmp_path_factory.mktemp("cli")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        try:
            code = main([command, str(folder / "no_run"), *tokens])
        except SystemExit as e:
            code = e.code
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert code in (0, 2, 5, 6), (tokens, err)
    if code:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (tokens, err)
    else:
        assert "usage" in out  # only --help / -h succeed without a run
    assert list(folder.iterdir()) == []
