"""Tests for vaedraw.cli: a tiny end-to-end run (train, sample, reconstruct) and one-line user errors."""

from __future__ import annotations

import argparse
import errno
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaedraw import data
from vaedraw.cli import build_parser, digit_labels, main
from vaedraw.errors import VaedrawError
from vaedraw.run import load_run, resolve_device


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

    # exactly -n images, however n divides among the classes asked for; each row still shows one class
    code, out, err = _cli(["sample", run_dir, "-n", 64, "--digit", "all", "--out", tmp_path / "64.png",
                           "--npz", tmp_path / "64.npz"], capsys)
    assert code == 0, err
    assert "64 samples" in out
    with np.load(tmp_path / "64.npz") as f:
        assert f["x"].shape == (64, 28, 28)
        assert np.bincount(f["y"]).tolist() == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    with Image.open(tmp_path / "64.png") as img:
        assert img.size == (2 * (7 * 30 + 2), 2 * (10 * 30 + 2))  # a row of (up to) 7 per class
        last = np.asarray(img.convert("L"))[::2, ::2][2 + 9 * 30: 2 + 9 * 30 + 28, 2 + 6 * 30: 2 + 6 * 30 + 28]
        assert (last == 64).all()  # the 9s' row has 6 digits: its seventh cell is the background grey
    code, _, err = _cli(["sample", run_dir, "-n", 25, "--digit", "1,4,7", "--out", tmp_path / "147.png",
                         "--npz", tmp_path / "147.npz"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "147.npz")["y"].tolist() == [1] * 9 + [4] * 8 + [7] * 8
    code, _, err = _cli(["sample", run_dir, "-n", 2, "--digit", "1,4,7", "--out", tmp_path / "few.png"], capsys)
    assert code == 2 and "-n 2" in err and not (tmp_path / "few.png").exists()
    code, _, err = _cli(["sample", run_dir, "-n", 4, "--digit", "10", "--out", tmp_path / "ten.png"], capsys)
    assert code == 2 and "--digit 10" in err and "0-9" in err


# ----------------------------------------------------------------------------- user errors
def _bad_inputs(run: Path, tmp: Path, mnist_dir: Path) -> dict[str, tuple[int, list]]:
    """case -> (exit status, argv): 2 usage, 4 data, 5 checkpoint, 6 a path (errors.py)."""
    out = tmp / "new_run"
    return {
        "unknown preset": (2, ["train", "--preset", "nope", "--out", out, "--data-dir", mnist_dir]),
        "unknown --set key": (2, ["train", "--set", "model.widht=3", "--out", out, "--data-dir", mnist_dir]),
        "bad --set value": (2, ["train", "--set", "model.latent_dim=two", "--out", out, "--data-dir", mnist_dir]),
        "--set without =": (2, ["train", "--set", "model.latent_dim", "--out", out, "--data-dir", mnist_dir]),
        "steps and epochs": (2, ["train", "--steps", 3, "--epochs", 1, "--out", out, "--data-dir", mnist_dir]),
        "zero steps": (2, ["train", "--steps", 0, "--out", out, "--data-dir", mnist_dir]),
        "missing data dir": (4, ["train", "--steps", 1, "--out", out, "--data-dir", tmp / "nowhere"]),
        "existing run": (2, ["train", "--steps", 1, "--out", run, "--data-dir", mnist_dir]),
        "negative -n": (2, ["sample", run, "-n", "-3", "--out", tmp / "x.png"]),
        "zero -n": (2, ["sample", run, "-n", "0", "--out", tmp / "x.png"]),
        "huge -n": (2, ["sample", run, "-n", "10000000", "--out", tmp / "x.png"]),
        "--digit 12": (2, ["sample", run, "--digit", "12", "--out", tmp / "x.png"]),
        "--digit word": (2, ["sample", run, "--digit", "seven", "--out", tmp / "x.png"]),
        "--digit, unconditional": (2, ["sample", run, "--digit", "3", "--out", tmp / "x.png"]),
        "missing run": (2, ["sample", tmp / "no_run", "--out", tmp / "x.png"]),
        "no command": (2, []),
        "unknown command": (2, ["paint"]),
        "reconstruct without data": (4, ["reconstruct", run, "--data-dir", tmp / "nowhere", "--out", tmp / "x.png"]),
        "--out is a folder": (6, ["sample", run, "--out", tmp / "pics.png"]),
        "--out in a file": (6, ["sample", run, "--out", tmp / "file" / "x.png"]),
        "--out .jpg": (2, ["sample", run, "--out", tmp / "x.jpg"]),
        "--npz .png": (2, ["sample", run, "--out", tmp / "x.png", "--npz", tmp / "y.png"]),
        "reconstruct --out .gif": (2, ["reconstruct", run, "--out", tmp / "x.gif"]),
        "eval --json in a file": (6, ["eval", run, "--json", tmp / "file" / "x.json"]),
        "eval --json is a folder": (6, ["eval", run, "--json", tmp / "figures.json"]),
        "device mps": (2, ["sample", run, "--device", "mps", "--out", tmp / "x.png"]),
        "device meta": (2, ["sample", run, "--device", "meta", "--out", tmp / "x.png"]),
        "device xla": (2, ["reconstruct", run, "--device", "xla", "--out", tmp / "x.png"]),
        "device garbage": (2, ["eval", run, "--device", "gpu please"]),
        "device cuda:99": (2, ["sample", run, "--device", "cuda:99", "--out", tmp / "x.png"]),
        "reconstruct -n 10^6": (2, ["reconstruct", run, "-n", 10**6, "--out", tmp / "x.png"]),
        "iwae-k 10^9": (2, ["eval", run, "--iwae-k", 10**9]),
        "eval -n 10^9": (2, ["eval", run, "-n", 10**9]),
        "eval --n-samples 10^9": (2, ["eval", run, "--n-samples", 10**9]),
        "fit-gmm 10^6 components": (2, ["fit-gmm", run, "--components", 10**6]),
        "fit-gmm shrinks": (2, ["fit-gmm", run, "--components", 2]),
        "--data-dir is a file": (4, ["reconstruct", run, "--data-dir", tmp / "file", "--out", tmp / "x.png"]),
        "sample --seed 2^64": (2, ["sample", run, "--seed", 2**64, "--out", tmp / "x.png"]),
        "sample --seed -1": (2, ["sample", run, "--seed", -1, "--out", tmp / "x.png"]),
        "eval --seed 10^30": (2, ["eval", run, "--seed", 10**30]),
        "--temperature 1e308": (2, ["sample", run, "--temperature", "1e308", "--out", tmp / "x.png"]),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(Path("r"), Path("t"), Path("m"))))
def test_bad_input_is_one_line_and_its_exit_status(case, tiny_run, tmp_path, mnist_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "pics.png").mkdir()
    (tmp_path / "figures.json").mkdir()
    expected, argv = _bad_inputs(tiny_run, tmp_path, mnist_dir)[case]
    code, out, err = _cli(argv, capsys)
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vaedraw") and "error" in lines[0]
    assert "Traceback" not in err
    # nothing was written
    assert not (tmp_path / "new_run").exists() and not (tmp_path / "x.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json", "file", "pics.png"]
    assert not any((tmp_path / "pics.png").iterdir())
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before


@pytest.mark.parametrize("argv,words", [
    (["train", "--preset", "nope"], ["nope", "default"]),
    (["train", "--set", "model.widht=3"], ["model.widht"]),
    (["sample", "{run}", "--digit", "12"], ["--digit", "12"]),
    (["sample", "{run}", "--digit", "3"], ["not conditional"]),
    (["sample", "{run}", "-n", "-3"], ["-n"]),
])
def test_error_messages_say_what_is_wrong(argv, words, tiny_run, tmp_path, capsys):
    argv = [str(tiny_run) if a == "{run}" else a for a in argv] + ["--out", str(tmp_path / "o.png")]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    for word in words:
        assert word in err


# ----------------------------------------------------------------------------- labels for a grid
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("n", [10, 11, 25, 64, 99])
def test_digit_labels_give_exactly_n_images_a_row_per_class(k, n):
    digits = list(range(10))[:k]
    labels, row, cells = digit_labels(digits, n)
    assert len(labels) == n == len(cells) == len(set(cells))
    counts = torch.bincount(labels, minlength=10)[:k]
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert all(cell // row == digits.index(int(d)) for cell, d in zip(cells, labels))  # row r shows class r


# ----------------------------------------------------------------------------- outputs and foreseeable errors
def test_outputs_are_checked_before_the_run_is_loaded(tmp_path, capsys):
    code, _, err = _cli(["sample", tmp_path / "no_run", "--out", tmp_path / "x.jpg"], capsys)
    assert code == 2 and "--out" in err and ".png" in err  # the extension, not the missing run
    (tmp_path / "dir.png").mkdir()
    code, _, err = _cli(["sample", tmp_path / "no_run", "--out", tmp_path / "dir.png"], capsys)
    assert code == 6 and "is a folder" in err
    target = tmp_path / "target.png"
    target.write_bytes(b"keep")
    (tmp_path / "link.png").symlink_to(target)
    code, _, err = _cli(["sample", tmp_path / "no_run", "--out", tmp_path / "link.png"], capsys)
    assert code == 6 and "symbolic link" in err and target.read_bytes() == b"keep"


def test_a_failing_second_output_says_the_first_was_written(tiny_run, tmp_path, capsys, monkeypatch):
    from vaedraw import sample

    def full_disk(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sample, "save_npz", full_disk)
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    code, _, err = _cli(["sample", tiny_run, "-n", 4, "--out", png, "--npz", npz, "--device", "cpu"], capsys)
    assert code == 6, err
    assert len(err.strip().splitlines()) == 1
    assert f"written: grid {png}" in err and f"not written: array {npz}" in err
    assert png.exists() and not npz.exists()


def test_file_system_errors_are_one_line_naming_the_path_with_exit_6(tiny_run, tmp_path, capsys, monkeypatch):
    from vaedraw import plots

    for number in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EISDIR):
        def fail(x, path, *a, _n=number, **k):
            raise OSError(_n, os.strerror(_n), str(path))

        monkeypatch.setattr(plots, "save_grid", fail)
        code, _, err = _cli(["sample", tiny_run, "-n", 2, "--out", tmp_path / "s.png", "--device", "cpu"], capsys)
        assert code == 6, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert str(tmp_path / "s.png") in err


def test_a_name_that_is_not_utf8_is_written_and_reported_printably(tiny_run, tmp_path, capsys):
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")  # a Latin-1 file name on a UTF-8 system
    code, out, err = _cli(["sample", tiny_run, "-n", 2, "--out", name, "--device", "cpu"], capsys)
    assert code == 0, err
    assert os.path.exists(os.fsencode(name))
    assert "caf\ufffd.png" in out
    out.encode("utf-8")  # nothing unprintable reached the terminal
    bad_dir = os.fsdecode(bytes(tmp_path) + b"/d\xe9.png")
    os.mkdir(bad_dir)
    code, _, err = _cli(["sample", tiny_run, "--out", bad_dir, "--device", "cpu"], capsys)
    assert code == 6 and "d\ufffd.png" in err
    err.encode("utf-8")


@pytest.mark.parametrize("raised,code,words", [
    (KeyboardInterrupt(), 130, ["stopped"]),
    (MemoryError(), 2, ["out of memory", "-n"]),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, ["UTF-8"]),
    (OSError(errno.ENOSPC, "No space left on device"), 6, ["no space"]),
])
def test_foreseeable_errors_are_one_line_with_their_exit_status(raised, code, words, tmp_path, capsys, monkeypatch):
    from vaedraw import run as run_module

    def fail(*a, **k):
        raise raised

    monkeypatch.setattr(run_module, "load_run", fail)
    got, _, err = _cli(["sample", tmp_path, "--out", tmp_path / "x.png"], capsys)
    assert got == code
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    from vaedraw import run as run_module

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(run_module, "load_run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["sample", str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_devices_that_do_not_exist_are_refused(monkeypatch):
    for name in ("mps", "xla", "meta", "tpu", "cuda:x", "cpu:1", "", "cuda:-1"):
        with pytest.raises(VaedrawError) as e:
            resolve_device(name)
        assert "\n" not in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(VaedrawError, match="2 CUDA GPUs"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VaedrawError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_fit_gmm_says_what_it_replaces_and_refuses_to_shrink_unless_forced(tiny_run, tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    gmm = run_dir / "gmm.safetensors"
    before = gmm.read_bytes()
    assert len(load_run(run_dir, device="cpu").gmm.weights) == 5
    code, _, err = _cli(["fit-gmm", run_dir, "--components", 3, "--data-dir", mnist_dir, "--device", "cpu"], capsys)
    assert code == 2 and "5 components" in err and "--force" in err
    assert gmm.read_bytes() == before
    code, out, err = _cli(["fit-gmm", run_dir, "--components", 3, "--force", "--data-dir", mnist_dir,
                           "--device", "cpu"], capsys)
    assert code == 0, err
    assert "3-component" in out and "replaces the 5-component" in out
    assert len(load_run(run_dir, device="cpu").gmm.weights) == 3
    # a damaged mixture is not a reason to refuse refitting it
    gmm.write_bytes(b"not a mixture")
    code, out, err = _cli(["fit-gmm", run_dir, "--data-dir", mnist_dir, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "replaces the unreadable one" in out and len(load_run(run_dir, device="cpu").gmm.weights) == 5


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            if action.default is not None and action.default is not False and action.default != []:
                line = " ".join(sub.format_help().split())
                assert f"default: {action.default}" in line or "default" in action.help, \
                    f"{name} {action.option_strings[0]}: the help does not show its default"


def test_train_seed_is_bounded_by_the_config_when_parsed(tmp_path, capsys):
    from vaedraw.config import value_range

    hi = int(value_range("train.seed").hi)
    code, _, err = _cli(["train", "--seed", str(hi + 1), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and f"{hi:,}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
