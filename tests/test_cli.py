"""Tests for vaedraw.cli: a tiny end-to-end run (train, sample, reconstruct) and one-line user errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaedraw import data
from vaedraw.cli import main
from vaedraw.run import load_run


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEDRAW_DATA_DIR", raising=False)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the command line in-process: (exit status, stdout, stderr). argparse errors exit via SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _tiles(png: Path, n: int, nrow: int) -> np.ndarray:
    """Cut the 28x28 tiles back out of a grid picture (2-pixel gaps, scaled by 2): uint8 [n, 28, 28]."""
    rows = math.ceil(n / nrow)
    with Image.open(png) as img:
        assert img.size == (2 * (nrow * 30 + 2), 2 * (rows * 30 + 2))
        canvas = np.asarray(img.convert("L"))[::2, ::2]
    out = []
    for i in range(n):
        r, c = divmod(i, nrow)
        out.append(canvas[2 + r * 30: 2 + r * 30 + 28, 2 + c * 30: 2 + c * 30 + 28])
    return np.stack(out)


def _uint8(x: torch.Tensor) -> np.ndarray:
    """Pixel means [n, 1, 28, 28] -> uint8 [n, 28, 28] = round(255 * mean)."""
    return torch.round(255 * x[:, 0]).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- end to end
def test_sample_writes_a_grid_and_the_npz_interchange_array(tiny_run, tmp_path, capsys):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    code, out, err = _cli(["sample", tiny_run, "-n", 7, "--seed", 3, "--out", png, "--npz", npz,
                           "--device", "cpu"], capsys)
    assert code == 0, err
    assert str(png) in out and str(npz) in out
    with np.load(npz) as f:
        assert set(f.files) == {"x"}
        x = f["x"]
    assert x.dtype == np.uint8 and x.shape == (7, 28, 28)
    run = load_run(tiny_run, device="cpu")
    assert run.config.sample.sampler == "gmm" and run.gmm is not None
    expected = _uint8(run.decode(run.codes(7, seed=3)))
    assert np.array_equal(x, expected)
    assert np.array_equal(_tiles(png, 7, 3), x)  # the picture shows the same digits
    # the same seed gives the same digits; another sampler gives others
    code, _, err = _cli(["sample", tiny_run, "-n", 7, "--seed", 3, "--out", tmp_path / "t.png",
                         "--npz", tmp_path / "t.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "t.npz")["x"], x)
    code, _, err = _cli(["sample", tiny_run, "-n", 7, "--seed", 3, "--sampler", "prior", "--temperature", 0.5,
                         "--out", tmp_path / "p.png", "--npz", tmp_path / "p.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    prior = np.load(tmp_path / "p.npz")["x"]
    assert np.array_equal(prior, _uint8(run.decode(run.codes(7, sampler="prior", seed=3, temperature=0.5))))
    assert not np.array_equal(prior, x)


def test_reconstruct_shows_test_images_over_their_reconstructions(tiny_run, tmp_path, mnist_dir, capsys):
    png = tmp_path / "r.png"
    code, out, err = _cli(["reconstruct", tiny_run, "-n", 5, "--out", png, "--data-dir", mnist_dir,
                           "--device", "cpu"], capsys)
    assert code == 0, err
    assert str(png) in out
    tiles = _tiles(png, 10, 5)
    test = data.load_split("mnist", "test", mnist_dir)
    assert np.array_equal(tiles[:5], test.images[:5].numpy())
    run = load_run(tiny_run, device="cpu")
    rec = run.reconstruct(test.images[:5].unsqueeze(1).float() / 255)
    assert np.array_equal(tiles[5:], _uint8(rec))


def test_a_conditional_run_draws_the_digits_asked_for(tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "cond"
    code, _, err = _cli(["train", "--preset", "conditional", "--out", run_dir, "--data-dir", mnist_dir,
                         "--steps", 2, "--no-progress", "--device", "cpu", "--set", "train.batch_size=16",
                         "--set", "train.eval_images=100", "--set", "model.channels=4", "--set", "model.hidden=16",
                         "--set", "sample.fit_gmm=false", "--set", "sample.sampler=prior"], capsys)
    assert code == 0, err
    assert not (run_dir / "gmm.safetensors").exists() and (run_dir / "samples.png").exists()
    run = load_run(run_dir, device="cpu")
    assert run.conditional

    code, _, err = _cli(["sample", run_dir, "-n", 4, "--digit", 3, "--seed", 1, "--out", tmp_path / "3.png",
                         "--npz", tmp_path / "3.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "3.npz") as f:
        assert f["y"].tolist() == [3, 3, 3, 3]
        assert np.array_equal(f["x"], _uint8(run.decode(run.codes(4, seed=1), torch.full((4,), 3))))

    code, _, err = _cli(["sample", run_dir, "-n", 20, "--digit", "all", "--out", tmp_path / "all.png",
                         "--npz", tmp_path / "all.npz"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "all.npz")["y"].tolist() == [d for d in range(10) for _ in range(2)]
    with Image.open(tmp_path / "all.png") as img:
        assert img.size == (2 * (2 * 30 + 2), 2 * (10 * 30 + 2))  # one row of two per digit

    code, _, err = _cli(["sample", run_dir, "-n", 2, "--sampler", "gmm", "--out", tmp_path / "g.png"], capsys)
    assert code == 2 and "fit-gmm" in err


# ----------------------------------------------------------------------------- user errors
def _bad_inputs(run: Path, tmp: Path, mnist_dir: Path) -> dict[str, list]:
    out = tmp / "new_run"
    return {
        "unknown preset": ["train", "--preset", "nope", "--out", out, "--data-dir", mnist_dir],
        "unknown --set key": ["train", "--set", "model.widht=3", "--out", out, "--data-dir", mnist_dir],
        "bad --set value": ["train", "--set", "model.latent_dim=two", "--out", out, "--data-dir", mnist_dir],
        "--set without =": ["train", "--set", "model.latent_dim", "--out", out, "--data-dir", mnist_dir],
        "steps and epochs": ["train", "--steps", 3, "--epochs", 1, "--out", out, "--data-dir", mnist_dir],
        "zero steps": ["train", "--steps", 0, "--out", out, "--data-dir", mnist_dir],
        "missing data dir": ["train", "--steps", 1, "--out", out, "--data-dir", tmp / "nowhere"],
        "existing run": ["train", "--steps", 1, "--out", run, "--data-dir", mnist_dir],
        "negative -n": ["sample", run, "-n", "-3", "--out", tmp / "x.png"],
        "zero -n": ["sample", run, "-n", "0", "--out", tmp / "x.png"],
        "huge -n": ["sample", run, "-n", "10000000", "--out", tmp / "x.png"],
        "--digit 12": ["sample", run, "--digit", "12", "--out", tmp / "x.png"],
        "--digit word": ["sample", run, "--digit", "seven", "--out", tmp / "x.png"],
        "--digit, unconditional": ["sample", run, "--digit", "3", "--out", tmp / "x.png"],
        "missing run": ["sample", tmp / "no_run", "--out", tmp / "x.png"],
        "no command": [],
        "unknown command": ["paint"],
        "reconstruct without data": ["reconstruct", run, "--data-dir", tmp / "nowhere", "--out", tmp / "x.png"],
    }


@pytest.mark.parametrize("case", list(_bad_inputs(Path("r"), Path("t"), Path("m"))))
def test_bad_input_is_one_line_and_exit_status_2(case, tiny_run, tmp_path, mnist_dir, capsys):
    before = sorted(p.name for p in tiny_run.iterdir())
    code, out, err = _cli(_bad_inputs(tiny_run, tmp_path, mnist_dir)[case], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vaedraw") and "error" in lines[0]
    assert "Traceback" not in err
    # nothing was written
    assert not (tmp_path / "new_run").exists() and not (tmp_path / "x.png").exists()
    assert sorted(p.name for p in tiny_run.iterdir()) == before


@pytest.mark.parametrize("argv,words", [
    (["train", "--preset", "nope"], ["nope", "default"]),
    (["train", "--set", "model.widht=3"], ["model.widht"]),
    (["sample", "{run}", "--digit", "12"], ["--digit", "12"]),
    (["sample", "{run}", "--digit", "3"], ["not conditional"]),
    (["sample", "{run}", "-n", "-3"], ["-n"]),
])
def test_error_messages_say_what_is_wrong(argv, words, tiny_run, tmp_path, capsys):
    argv = [str(tiny_run) if a == "{run}" else a for a in argv] + ["--out", str(tmp_path / "o")]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    for word in words:
        assert word in err
