"""Colour MNIST (scripts/make_colour_mnist.py) end to end: the builder, a tiny run trained on it with the
default pixel model of the user's own images (the logistic mixture), and every command on that run: sample
(PNG and .npz), reconstruct, interpolate, latent-map, manifold, train-evaluator and eval, fit-gmm, export
and the web explorer's API, each giving colour pictures."""

from __future__ import annotations

import base64
import colorsys
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN_ARGS
from PIL import Image

from vaedraw import data
from vaedraw.cli import main

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_colour_mnist.py"
N_TRAIN, N_TEST = 300, 60


def _builder():
    spec = importlib.util.spec_from_file_location("make_colour_mnist", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """(npz, run_dir): Colour MNIST from the bundled subset's first digits, and a 3-step run trained on it;
    VAEDRAW_CACHE_DIR points at a folder of this module's own while its tests run."""
    root = tmp_path_factory.mktemp("colour")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEDRAW_CACHE_DIR", str(root / "cache"))
        mp.delenv("VAEDRAW_DATA_DIR", raising=False)
        npz = root / "colour-mnist.npz"
        assert _builder().main(["--out", str(npz), "--subset", "--n-train", str(N_TRAIN),
                                "--n-test", str(N_TEST)]) == 0
        run_dir = root / "run"
        args = list(TINY_RUN_ARGS)
        args[args.index("--steps") + 1] = "3"
        assert main(["train", "--dataset", "array", "--data-dir", str(npz), "--out", str(run_dir), *args,
                     "--set", "model.latent_dim=4", "--set", "model.mixture_components=2",
                     "--set", "sample.gmm_components=3"]) == 0
        yield npz, run_dir


def _image(path_or_bytes) -> Image.Image:
    img = Image.open(path_or_bytes if isinstance(path_or_bytes, Path) else io.BytesIO(path_or_bytes))
    img.load()
    return img


def _is_colour(img: Image.Image) -> bool:
    a = np.asarray(img.convert("RGB")).astype(int)
    spread = np.abs(a[..., 0] - a[..., 1]) + np.abs(a[..., 1] - a[..., 2])  # 0 everywhere for a grey picture
    return img.mode in ("RGB", "RGBA", "P") and spread.max() > 0


def test_the_builder_colours_digits_on_32x32_backgrounds_deterministically():
    m = _builder()
    h, s, v = np.array([0.0, 0.3, 0.55, 0.99]), np.array([1.0, 0.5, 0.8, 0.2]), np.array([0.9, 0.4, 1.0, 0.6])
    np.testing.assert_allclose(m._hsv_to_rgb(h, s, v), [colorsys.hsv_to_rgb(*t) for t in zip(h, s, v)], atol=1e-12)
    mnist = data.mnist._bundled_split("train")
    grey, labels = mnist.images[:50].numpy(), mnist.labels[:50].numpy()
    arrays = m.build(grey, labels, grey[:10], labels[:10], seed=0)
    x = arrays["x_train"]
    assert x.dtype == np.uint8 and x.shape == (50, 32, 32, 3) and arrays["x_test"].shape == (10, 32, 32, 3)
    assert np.array_equal(arrays["y_train"], labels) and arrays["y_train"].dtype == np.uint8
    assert np.array_equal(m.build(grey, labels, grey, labels, seed=0)["x_train"], x)  # seeded
    assert not np.array_equal(m.build(grey, labels, grey, labels, seed=1)["x_train"], x)
    assert not np.array_equal(arrays["x_test"], x[:10])  # each split its own colours
    # each image: a background of one colour (MNIST's borders are blank, so all four corners show it) and
    # ink of a clearly other colour where the digit is
    corners = x[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(int)  # [N, 4, 3]
    assert (corners == corners[:, :1]).all()
    ink = np.abs(x.astype(int) - corners[:, :1, None]).sum(-1).reshape(50, -1).max(1)  # [N]
    assert (ink > 100).all()
    assert len({tuple(c) for c in corners[:, 0]}) == 50  # a random background each


def test_a_run_on_colour_mnist_models_its_8_bit_colour_pixels(colour):
    _, run_dir = colour
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["dataset"] == "array" and cfg["model"]["likelihood"] == "logistic_mixture"
    assert cfg["data"]["binarize"] == "none"
    from vaedraw.run import load_run

    run = load_run(run_dir, "cpu")
    assert run.image_shape == (3, 32, 32) and run.n_classes == 0
    assert _is_colour(_image(run_dir / "samples.png"))


def test_picture_commands_write_colour_pictures(colour, tmp_path, capsys, monkeypatch):
    _, run_dir = colour
    run = str(run_dir)
    out = {name: tmp_path / name for name in ("s.png", "s.npz", "r.png", "i.png", "i.gif", "m.png", "f.png")}
    assert main(["sample", run, "-n", "6", "--out", str(out["s.png"]), "--npz", str(out["s.npz"]),
                 "--device", "cpu"]) == 0
    assert "(6, 32, 32, 3)" in capsys.readouterr().out
    with np.load(out["s.npz"]) as f:
        assert f["x"].dtype == np.uint8 and f["x"].shape == (6, 32, 32, 3)
    assert main(["reconstruct", run, "-n", "4", "--out", str(out["r.png"]), "--device", "cpu"]) == 0
    assert main(["interpolate", run, "--frames", "3", "--out", str(out["i.png"]), "--gif", str(out["i.gif"]),
                 "--device", "cpu"]) == 0
    assert main(["manifold", run, "--grid", "3", "-n", "40", "--out", str(out["f.png"]), "--device", "cpu"]) == 0
    for name in ("s.png", "r.png", "i.png", "i.gif", "f.png"):
        assert _is_colour(_image(out[name])), name
    # the latent map is coloured by the digits' labels
    from vaedraw import plots

    seen = {}
    original = plots.plot_latent_map

    def spy(points, labels, *args, **kwargs):
        seen["labels"] = labels
        return original(points, labels, *args, **kwargs)

    monkeypatch.setattr(plots, "plot_latent_map", spy)
    assert main(["latent-map", run, "-n", "40", "--out", str(out["m.png"]), "--device", "cpu"]) == 0
    test = data.load_split("array", "test", colour[0])
    assert np.array_equal(seen["labels"], test.labels[:40].numpy()) and len(set(seen["labels"].tolist())) > 1
    assert _is_colour(_image(out["m.png"]))


def test_eval_reports_bits_per_dim_and_quality_once_an_evaluator_is_trained(colour, tmp_path, capsys):
    npz, run_dir = colour
    quick = ["--iwae-k", "2", "-n", "30", "--n-images", "20", "--fd-bootstrap", "0", "--device", "cpu", "--no-save"]
    first, second = tmp_path / "before.json", tmp_path / "after.json"
    assert main(["eval", str(run_dir), *quick, "--json", str(first)]) == 0
    before = json.loads(first.read_text())
    assert 0 < before["elbo_bpd"] and 0 < before["iwae_bpd"] and "8-bit pixels" in before["protocol"]
    assert before["quality_available"] is False
    assert f"vaedraw train-evaluator --dataset array --data-dir {npz}" in before["quality_note"]
    assert "likelihoods above are still valid" in capsys.readouterr().out
    assert main(["train-evaluator", str(run_dir), "--epochs", "1", "--batch-size", "32", "--no-progress"]) == 0
    assert main(["eval", str(run_dir), *quick, "--json", str(second)]) == 0
    after = json.loads(second.read_text())
    assert after["quality_available"] is True and after["samples"]["n"] == 30
    assert len(after["samples"]["class_shares"]) == 10 and after["elbo_bpd"] == before["elbo_bpd"]


def test_fit_gmm_and_export_work_on_the_colour_run(colour, tmp_path):
    _, run_dir = colour
    assert main(["fit-gmm", str(run_dir), "--components", "3", "--device", "cpu"]) == 0
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert main(["export", str(run_dir), "--onnx", str(out)]) == 0
    session = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    (x,) = session.run(None, {"code": np.zeros((2, 4), dtype=np.float32)})
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_the_web_explorer_serves_colour_pngs(colour):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vaedraw import web
    from vaedraw.run import load_run

    client = TestClient(web.create_app(load_run(colour[1], "cpu"), n_map=40))
    info = client.get("/api/info").json()
    assert info["image_shape"] == [3, 32, 32] and info["drawable"] is False and info["label_classes"] == 10
    assert len(client.get("/api/map").json()["labels"]) == 40

    def rgb(b64: str) -> Image.Image:
        img = _image(base64.b64decode(b64))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
        return img

    rgb(client.post("/api/decode", json={"z": [0.1, -0.2, 0.3, 0.0]}).json()["png"])
    rgb(client.post("/api/random", json={"seed": 3}).json()["png"])
    path = client.post("/api/interpolate", json={"from_digit": 1, "to_digit": 7, "steps": 3}).json()
    assert len(path["linear"]) == 3 and all(rgb(b) for b in path["linear"] + path["spherical"])
    r = client.post("/api/encode", json={"pixels": [0.0] * 784})  # the drawing canvas is for grey runs only
    assert r.status_code == 400 and "grey" in r.json()["detail"]
