"""The web explorer's JSON API: happy paths return valid PNGs and codes, every bad request a 4xx; the
Host header check, the address and port checks of `vaedraw serve`, a broken run refused at startup,
and a colour run served through the same latent interface."""

from __future__ import annotations

import base64
import io
import math
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vaedraw import web
from vaedraw.errors import EXIT_SERVE, EXIT_USAGE, CheckpointError, ServeError, VaedrawError

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
    ("/api/decode", {"z": [0, 0, True, 0], "digit": 1}, 422, "z.2"),  # a boolean is not a number
    ("/api/decode", {"z": [0, "0.5", 0, 0], "digit": 1}, 422, "z.1"),  # nor is a numeric string
    ("/api/decode", {"z": [0, 0, None, 0], "digit": 1}, 422, "z.2"),
    ("/api/decode", {"z": [[0], 0, 0, 0], "digit": 1}, 422, "z.0"),
    ("/api/decode", {"z": [0.0] * (web.MAX_CODE + 1), "digit": 1}, 422, "z"),
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
    ("/api/random", {"digit": 1, "seed": "7"}, 422, "seed"),
    ("/api/random", {"digit": 1, "seed": True}, 422, "seed"),
    ("/api/random", {"digit": 1, "seed": 7.0}, 422, "seed"),
    ("/api/random", {"digit": 1e3}, 422, "digit"),
    ("/api/encode", {"pixels": [0.0] * 100, "digit": 1}, 422, "pixels"),
    ("/api/encode", {"pixels": [0.0] * 1000, "digit": 1}, 400, "square"),
    ("/api/encode", {"pixels": [2.0] * 784, "digit": 1}, 422, "pixels"),
    ("/api/encode", {"pixels": [True] * 784, "digit": 1}, 422, "pixels.0"),
    ("/api/encode", {"pixels": ["0"] * 784, "digit": 1}, 422, "pixels.0"),
    ("/api/encode", {"pixels": [0.0] * (web.DRAW_MAX ** 2 + 1), "digit": 1}, 422, "pixels"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 12}, 422, "to_digit"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": 1}, 422, "steps"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": 1000}, 422, "steps"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": True}, 422, "steps"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": "5"}, 422, "steps"),
    ("/api/interpolate", {"from_digit": 1, "to_digit": 2, "steps": 5.0}, 422, "steps"),
    ("/api/interpolate", {"from_digit": "1", "to_digit": 2}, 422, "from_digit"),
    ("/api/interpolate", {"from_digit": False, "to_digit": 2}, 422, "from_digit"),
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


# ----------------------------------------------------------------------------- Host header (DNS rebinding)
@pytest.fixture(scope="module")
def guarded(client):
    """The same explorer behind the Host check `serve` installs for 127.0.0.1:8000."""
    ex = client.app.state.explorer
    test = SimpleNamespace(images=ex.test_images, labels=ex.test_labels)
    app = web.create_app(ex.run, n_map=300, hosts=web.HostRule.for_bind("127.0.0.1", 8000), test=test)
    return TestClient(app, base_url="http://127.0.0.1:8000")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST:8000",
                                  "localhost.:8000"])
def test_the_servers_own_names_are_answered(guarded, host):
    r = guarded.get("/api/info", headers={"host": host})
    assert r.status_code == 200 and r.json()["latent_dim"] == 4


@pytest.mark.parametrize("host", ["evil.example:8000", "evil.example", "127.0.0.1.nip.io:8000", "127.0.0.1:8001",
                                  "127.0.0.1", "localhost:80", "", "127.0.0.1:8000:1", "[::1", "10.0.0.1:8000",
                                  "localhost:8000@evil.example", "localhost:abc"])
def test_a_foreign_host_header_is_refused(guarded, host):
    for r in (guarded.get("/api/info", headers={"host": host}),
              guarded.post("/api/decode", json={"z": Z, "digit": 1}, headers={"host": host}),
              guarded.get("/", headers={"host": host})):
        assert r.status_code == 403, (host, r.text)
        assert "not an address this explorer serves" in r.json()["detail"]


def test_host_rules_for_other_bindings():
    every = web.HostRule.for_bind("0.0.0.0", 8080, ("box.lan",))
    assert all(every.allows(h) for h in ("192.168.1.5:8080", "[fe80::1]:8080", "box.lan:8080", "localhost:8080"))
    assert not any(every.allows(h) for h in ("evil.example:8080", "192.168.1.5:8081", "box.lan.evil.example:8080"))
    one = web.HostRule.for_bind("192.168.1.5", 80)
    assert one.allows("192.168.1.5") and one.allows("192.168.1.5:80")
    assert not one.allows("192.168.1.6") and not one.allows("localhost")
    assert web.HostRule.for_bind("::1", 8000).allows("[::1]:8000")


# ----------------------------------------------------------------------------- serve: address and port
@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "*", " 0.0.0.0 "])
def test_every_interface_needs_allow_remote(host, capsys):
    with pytest.raises(VaedrawError, match="--allow-remote") as e:
        web.check_address(host, 8000)
    assert e.value.exit_code == EXIT_USAGE
    web.check_address(host, 8000, allow_remote=True)
    assert "warning" in capsys.readouterr().err


@pytest.mark.parametrize("port", [0, -1, 65536, 10**20, True])
def test_ports_out_of_range_are_refused(port):
    with pytest.raises(VaedrawError, match="--port"):
        web.check_address("127.0.0.1", port)


def test_a_busy_port_is_a_serve_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is already in use") as e:
            web.open_socket("127.0.0.1", port)
        assert e.value.exit_code == EXIT_SERVE == 8
    with pytest.raises(ServeError, match="not an address"):
        web.open_socket("no-such-host.invalid", 8000)


def _serve(argv, capsys):
    from vaedraw.cli import main

    code = main(["serve", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_serve_command_reports_a_busy_port_before_loading_the_run(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _serve([str(tmp_path / "no-run"), "--port", str(port)], capsys)  # no run there either
    assert code == EXIT_SERVE and len(err.splitlines()) == 1 and "already in use" in err


def test_serve_command_refuses_every_interface_without_the_flag(tmp_path, capsys):
    code, err = _serve([str(tmp_path), "--host", "0.0.0.0"], capsys)
    assert code == EXIT_USAGE and len(err.splitlines()) == 1 and "--allow-remote" in err


# ----------------------------------------------------------------------------- a broken run is refused at startup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_reports_a_corrupt_mixture_in_one_line(tiny_conditional_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from vaedraw.errors import EXIT_CHECKPOINT
    from vaedraw.sample import GMM_NAME

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_conditional_run, run_dir)
    gmm = load_file(run_dir / GMM_NAME)
    gmm["means"] = torch.full_like(gmm["means"], float("nan"))
    save_file(gmm, run_dir / GMM_NAME)
    port = _free_port()
    code, err = _serve([str(run_dir), "--port", str(port), "--device", "cpu"], capsys)
    assert code == EXIT_CHECKPOINT and len(err.splitlines()) == 1 and "non-finite" in err, err
    with socket.socket() as again:  # the refused start let its port go
        again.bind(("127.0.0.1", port))


def test_weights_that_give_non_finite_codes_are_refused_at_startup(client):
    import copy

    ex = client.app.state.explorer
    run = copy.copy(ex.run)
    run.model = copy.deepcopy(run.model)
    with torch.no_grad():
        for p in run.model.parameters():
            p.fill_(float("nan"))
    test = SimpleNamespace(images=ex.test_images[:50], labels=ex.test_labels[:50])
    with pytest.raises(CheckpointError, match="not finite"):
        web.create_app(run, n_map=50, test=test)


# ----------------------------------------------------------------------------- any image shape, grey or colour
@pytest.fixture(scope="module")
def colour_client():
    """An untrained conditional model of 3x12x16 colour images over random pictures with 3 classes."""
    from vaedraw.config import build_config
    from vaedraw.models import build_model
    from vaedraw.run import Run

    cfg = build_config("default", overrides={"model.latent_dim": 3, "model.channels": 4, "model.hidden": 16,
                                             "model.n_classes": 3, "sample.sampler": "prior"})
    torch.manual_seed(0)
    model = build_model(cfg.model, image_shape=(3, 12, 16)).eval()
    run = Run(run_dir=None, config=cfg, model=model, step=0, metrics={})
    g = torch.Generator().manual_seed(0)
    test = SimpleNamespace(images=torch.randint(0, 256, (60, 12, 16, 3), dtype=torch.uint8, generator=g),
                           labels=torch.arange(60) % 3)
    return TestClient(web.create_app(run, n_map=60, test=test))


def rgb(b64: str, size=(16, 12)) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG" and img.size == size and img.mode == "RGB"
    return np.asarray(img)


def test_a_colour_run_is_served_in_colour(colour_client):
    info = colour_client.get("/api/info").json()
    assert info["image_shape"] == [3, 12, 16] and not info["drawable"]
    assert info["n_classes"] == info["label_classes"] == 3
    z = [0.3, -0.2, 1.0]
    a = rgb(colour_client.post("/api/decode", json={"z": z, "digit": 2}).json()["png"])
    x = colour_client.app.state.explorer.run.decode(torch.tensor([z]), torch.tensor([2]))[0]
    assert np.abs(a.astype(int) - np.round(x.permute(1, 2, 0).numpy() * 255)).max() <= 1
    rgb(colour_client.post("/api/random", json={"digit": 0, "seed": 1}).json()["png"])
    out = colour_client.post("/api/interpolate", json={"from_digit": 0, "to_digit": 2, "steps": 4}).json()
    assert len(out["linear"]) == 4 and all(rgb(b).shape == (12, 16, 3) for b in out["spherical"])
    r = colour_client.post("/api/encode", json={"pixels": [0.0] * 784, "digit": 0})
    assert r.status_code == 400 and "grey" in r.json()["detail"]
    # the class count is the run's, not MNIST's
    for body in ({"z": z, "digit": 3}, {"z": z, "digit": 9}):
        r = colour_client.post("/api/decode", json=body)
        assert r.status_code == 422 and "digit: must be in 0..2" in r.json()["detail"]
    r = colour_client.post("/api/interpolate", json={"from_digit": 0, "to_digit": 3})
    assert r.status_code == 422 and "to_digit" in r.json()["detail"]
