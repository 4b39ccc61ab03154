"""The web explorer's JSON API: happy paths return valid PNGs and codes, every bad request a 4xx."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vaedraw import web

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_conditional_run, mnist_dir):
    from vaedraw.run import load_run

    run = load_run(tiny_conditional_run, device="cpu")
    return TestClient(web.create_app(run, mnist_dir, n_map=300))


@pytest.fixture(scope="module")
def wide_client(mnist_dir):
    """An untrained unconditional model with a 20-d latent: sliders over principal directions."""
    from vaedraw.config import build_config
    from vaedraw.models import build_model
    from vaedraw.run import Run

    cfg = build_config("default", overrides={"model.latent_dim": 20, "model.channels": 4, "model.hidden": 16,
                                             "sample.sampler": "prior"})
    torch.manual_seed(0)
    run = Run(run_dir=None, config=cfg, model=build_model(cfg.model).eval(), step=0, metrics={})
    return TestClient(web.create_app(run, mnist_dir, n_map=300))


def png(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG" and img.size == (28, 28) and img.mode == "L"
    return np.asarray(img)


# ----------------------------------------------------------------------------- happy paths
def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "app.js" in r.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


def test_info_and_map(client):
    info = client.get("/api/info").json()
    assert info["latent_dim"] == 4 and info["conditional"] and info["sampler"] == "gmm"
    assert info["basis"]["kind"] == "axes" and np.allclose(info["basis"]["directions"], np.eye(4))
    m = client.get("/api/map").json()
    assert len(m["points"]) == len(m["labels"]) == 300 and m["method"] == "pca"
    assert set(m["labels"]) == set(range(10))


def test_decode_is_the_models_decode(client):
    z = [0.5, -1.0, 0.0, 2.0]
    a = png(client.post("/api/decode", json={"z": z, "digit": 3}).json()["png"])
    run = client.app.state.explorer.run
    x = run.decode(torch.tensor([z]), torch.tensor([3]))
    assert np.abs(a.astype(int) - np.round(x[0, 0].numpy() * 255)).max() <= 1
    b = png(client.post("/api/decode", json={"z": z, "digit": 8}).json()["png"])
    assert not np.array_equal(a, b)  # the label matters


def test_random_uses_the_runs_sampler_and_is_seeded(client):
    r1 = client.post("/api/random", json={"digit": 5, "seed": 7}).json()
    r2 = client.post("/api/random", json={"digit": 5, "seed": 7}).json()
    assert r1["sampler"] == "gmm" and r1["z"] == r2["z"] and len(r1["z"]) == 4
    np.testing.assert_allclose(r1["coords"], r1["z"], atol=1e-6)  # axes basis: coordinates are the code
    png(r1["png"])


def test_encode_a_drawing(client, mnist_dir):
    from vaedraw import data

    test = data.load_split("mnist", "test", mnist_dir)
    x = Image.fromarray(test.images[0].numpy()).resize((56, 56))  # a real 7, enlarged as the page sends it
    pixels = (np.asarray(x, dtype=np.float64) / 255).round(3).ravel().tolist()
    out = client.post("/api/encode", json={"pixels": pixels, "digit": int(test.labels[0])}).json()
    seen, rec = png(out["input_png"]), png(out["png"])
    assert seen.sum() > 0 and rec.shape == (28, 28)
    assert len(out["z"]) == 4 and len(out["map"]) == 2 and all(map(math.isfinite, out["map"]))


def test_interpolate(client):
    out = client.post("/api/interpolate", json={"from_digit": 1, "to_digit": 7, "steps": 5}).json()
    assert len(out["linear"]) == len(out["spherical"]) == 5 and out["labels"] == [1, 1, 7, 7, 7]
    assert not np.array_equal(png(out["linear"][0]), png(out["linear"][-1]))


def test_wide_latent_uses_principal_directions(wide_client):
    info = wide_client.get("/api/info").json()
    b = info["basis"]
    assert b["kind"] == "principal" and len(b["directions"]) == web.MAX_AXES and len(b["mean"]) == 20
    d = np.array(b["directions"])
    np.testing.assert_allclose(d @ d.T, np.eye(web.MAX_AXES), atol=1e-4)
    r = wide_client.post("/api/random", json={"seed": 1}).json()
    assert r["sampler"] == "prior" and len(r["coords"]) == web.MAX_AXES
    assert wide_client.post("/api/decode", json={"z": [0.0] * 20}).status_code == 200
    assert wide_client.post("/api/decode", json={"z": [0.0] * 20, "digit": 3}).status_code == 400


# ----------------------------------------------------------------------------- every bad request is a 4xx
Z = [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/decode", {"z": Z[:3], "digit": 1}, 400, "4 numbers"),
    ("/api/decode", {"z": Z * 2, "digit": 1}, 400, "4 numbers"),
    ("/api/decode", {"z": Z}, 400, "conditional"),
    ("/api/decode", {"z": [0, 0, 0, 1e6], "digit": 1}, 422, "less than or equal"),
    ("/api/decode", {"z": [0, 0, 0, -51], "digit": 1}, 422, "greater than or equal"),
    ("/api/decode", {"z": [0, 0, "a", 0], "digit": 1}, 422, "z.2"),
    ("/api/decode", {"z": Z, "digit": 10}, 422, "digit"),
    ("/api/decode", {"z": Z, "digit": -1}, 422, "digit"),
    ("/api/decode", {"z": Z, "digit": "3"}, 422, "digit"),
    ("/api/decode", {"z": Z, "digit": 2.5}, 422, "digit"),
    ("/api/decode", {"z": Z, "digit": True}, 422, "digit"),
    ("/api/decode", {"z": Z, "digit": 1, "extra": 1}, 422, "extra"),
    ("/api/decode", {"digit": 1}, 422, "z"),
    ("/api/decode", [1, 2], 422, ""),
    ("/api/random", {"digit": 11}, 422, "digit"),
    ("/api/random", {"digit": 1, "seed": -3}, 422, "seed"),
    ("/api/encode", {"pixels": [0.0] * 100, "digit": 1}, 422, "pixels"),
    ("/api/encode", {"pixels": [0.0] * 1000, "digit": 1}, 400, "square"),
    ("/api/encode", {"pixels": [2.0] * 784, "digit": 1}, 422, "pixels"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 12}, 422, "to_digit"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": 1}, 422, "steps"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": 1000}, 422, "steps"),
])
def test_validation(client, path, body, status, words):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize("raw", [b'{"z": [NaN, 0, 0, 0], "digit": 1}', b'{"z": [Infinity, 0, 0, 0], "digit": 1}',
                                 b'{"z": [1e999, 0, 0, 0], "digit": 1}', b'{"z": [0, 0', b"", b"\xff\xfe",
                                 b"null"])
def test_malformed_or_non_finite_json(client, raw):
    r = client.post("/api/decode", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]


def test_oversized_bodies(client):
    big = b'{"z": [' + b"0," * 40000 + b'0], "digit": 1}'
    r = client.post("/api/decode", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():  # no Content-Length: refused by the bytes that arrive
        for _ in range(100):
            yield b" " * 1000

    r = client.post("/api/decode", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/api/decode", content=b"{}", headers={"content-type": "application/json",
                                                          "content-length": "abc"})
    assert 400 <= r.status_code < 500


def test_routes_and_static_files_are_confined(client):
    for path in ("/nope", "/api/nope", "/static/../web.py", "/static/..%2fweb.py", "/static/%2e%2e/web.py",
                 "/static/", "/static/__init__.py", "/static//etc/passwd"):
        r = client.get(path)
        assert r.status_code == 404, path
    assert client.get("/api/decode").status_code == 405
    assert client.put("/api/info").status_code == 405


def test_serve_binds_localhost_by_default():
    from vaedraw.cli import build_parser

    args = build_parser().parse_args(["serve", "somewhere"])
    assert args.host == "127.0.0.1"
