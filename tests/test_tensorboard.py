"""Tests for vaedraw.tracking: TensorBoard's own reader finds what a tiny training run wrote; a resume appends
without doubling the curves; without the package, --tensorboard is a usage error naming the install command."""

from __future__ import annotations

import importlib
import sys

import pytest

from vaedraw.cli import main
from vaedraw.plots import read_metrics

from conftest import TINY_RUN_ARGS

train_mod = importlib.import_module("vaedraw.train")
FAST = [*TINY_RUN_ARGS, "--set", "sample.fit_gmm=false"]


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))


def _events(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_losses_pictures_and_config(tmp_path, mnist_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data-dir", str(mnist_dir), *FAST, "--tensorboard"]) == 0
    acc = _events(out)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/recon", "train/kl", "train/lr", "train/images_per_s",
            "test/loss", "test/recon", "test/kl", "hparam/test_loss"} <= scalars
    rows = read_metrics(out / "metrics.jsonl")
    for split in ("train", "test"):
        logged = [r for r in rows if r["split"] == split]
        events = acc.Scalars(f"{split}/loss")
        assert [e.step for e in events] == [r["step"] for r in logged]
        assert [e.value for e in events] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/lr")] == [2, 4, 6]
    last_test = [r for r in rows if r["split"] == "test"][-1]
    assert acc.Scalars("hparam/test_loss")[-1].value == pytest.approx(last_test["loss"], rel=1e-6)
    # the monitoring pictures (every 3 steps) and the final samples, as PNGs of the saved pictures' layout
    monitor = acc.Images("monitor")
    assert [im.step for im in monitor] == [3, 6]
    assert monitor[0].width == 10 * 30 + 2 and monitor[0].height == 5 * 30 + 2  # 5 rows of 10 28-pixel tiles
    assert monitor[0].encoded_image_string.startswith(b"\x89PNG")
    assert [im.step for im in acc.Images("samples")] == [6]
    # the config as hyperparameters (the hparams plugin's session record)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = data.session_start_info.hparams
    assert hp["model.latent_dim"].number_value == 16
    assert hp["train.tensorboard"].number_value == 1  # torch's hparams writes bools as numbers
    assert hp["preset"].string_value == "default"


def test_a_resume_appends_without_doubling_the_curves(tmp_path, mnist_dir, monkeypatch):
    """A run that stops after logging step 4 but with its checkpoint at step 3 logs step 4 again on resume:
    the resumed writer purges the first one, as metrics.jsonl is cut back to the checkpoint."""
    pytest.importorskip("tensorboard")

    class Crash(Exception):
        pass

    real = train_mod.learning_rate

    def crash_before_step_5(step, cfg):
        if step == 4:
            raise Crash
        return real(step, cfg)

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data-dir", str(mnist_dir), *FAST, "--tensorboard"]
    monkeypatch.setattr(train_mod, "learning_rate", crash_before_step_5)
    with pytest.raises(Crash):
        main(args)
    monkeypatch.setattr(train_mod, "learning_rate", real)
    assert [e.step for e in _events(out).Scalars("train/loss")] == [2, 4]
    assert main(["train", "--out", str(out), "--resume", "--data-dir", str(mnist_dir), "--device", "cpu",
                 "--no-progress"]) == 0
    acc = _events(out)
    train_rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train_rows] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("test/loss")] == [3, 6]
    assert [im.step for im in acc.Images("monitor")] == [3, 6]


def test_without_the_package_tensorboard_is_a_usage_error_before_any_work(tmp_path, mnist_dir, monkeypatch, capsys):
    # None in sys.modules makes `import tensorboard` (and torch's wrapper of it) raise ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    for flag in (["--tensorboard"], ["--set", "train.tensorboard=true"]):
        assert main(["train", "--out", str(out), "--data-dir", str(mnist_dir), *FAST, *flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'vaedraw[tensorboard]'" in err, err
        assert not out.exists()


def test_tracking_off_writes_no_tensorboard_folder(tiny_run):
    assert not (tiny_run / "tensorboard").exists()
