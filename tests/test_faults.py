"""Faults, bad input and interruptions: each ends with a message that says what is wrong and what to do,
and nothing already on disk is lost.

Complements the refusals tested next to each module (test_data, test_checkpoint, test_train, test_cli,
test_web); docs/ROBUSTNESS.md maps every case to its test. Training runs here use a tiny model on the
first few hundred real MNIST digits, so a run starts in a second or two; the signal tests start real
`python -m vaedraw train` processes and signal or kill them.
"""

from __future__ import annotations

import errno
import importlib
import hashlib
import importlib.util
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from conftest import QuietHandler

from vaedraw import checkpoint as ckpt_io
from vaedraw import data, fastpath
from vaedraw.cli import main
from vaedraw.config import build_config
from vaedraw import errors
from vaedraw.errors import CheckpointError, DataError, VaedrawError
from vaedraw.plots import read_metrics
from vaedraw.run import load_run
from vaedraw.train import TrainingDiverged, train


REPO = Path(__file__).resolve().parent.parent
train_mod = importlib.import_module("vaedraw.train")  # the module (the package exports the function)
rundir_mod = importlib.import_module("vaedraw.rundir")
# A model and budgets small enough for a step to take a millisecond.
SMALL = {"model.channels": "4", "model.hidden": "16", "model.latent_dim": "4", "train.batch_size": "16",
         "train.eval_images": "64", "sample.fit_gmm": "false", "sample.sampler": "prior", "train.compile": "off",
         "train.lr_schedule": "constant", "train.log_every": "4", "train.eval_every": "1000",
         "train.picture_every": "1000", "train.checkpoint_every": "1"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEDRAW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEDRAW_DATA_DIR", raising=False)
    monkeypatch.delenv("VAEDRAW_MIRRORS", raising=False)
    data._reset_state()
    yield
    data._reset_state()


def _idx(array: np.ndarray) -> bytes:
    return (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape) \
        + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def small_mnist(mnist_dir, tmp_path_factory) -> Path:
    """The first 512 training and 128 test digits of the official files, as the four raw IDX files."""
    folder = tmp_path_factory.mktemp("small-mnist")
    for split, n in (("train", 512), ("t10k", 128)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            (folder / name).write_bytes(_idx(data.read_idx(mnist_dir / f"{name}.gz")[:n]))
    return folder


def _cfg(steps: int, **extra: str):
    return build_config("default", overrides={**SMALL, "train.steps": str(steps), **extra})


def _cli(argv, capsys) -> tuple[int, str]:
    """The command line in-process: (exit status, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaedraw") and "Traceback" not in err, err
    return lines[0]


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")] and not [p for p in folder.rglob("*.part")]


# ============================================================================= data
class _StallsMidFile(QuietHandler):
    """Sends the headers and the first bytes of the file, then nothing: a mirror that hangs mid-download."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"\x00" * 998)
        self.wfile.flush()
        time.sleep(3)


@pytest.fixture
def labels_dir(official_test_files) -> Path:
    return official_test_files.folder


def test_a_full_disk_while_downloading_stops_at_once_and_leaves_no_partial_file(serve, labels_dir, tmp_path,
                                                                             monkeypatch):
    """ENOSPC on a write into the cache: a DataError naming the folder and the fix, no fallback, no litter."""
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(data.download, "open", open_on_a_full_disk, raising=False)
    monkeypatch.setenv("VAEDRAW_MIRRORS", serve(labels_dir))
    with pytest.raises(DataError, match=r"cannot write to the cache folder .*No space left on device.*VAEDRAW_CACHE_DIR"):
        data.load_split("mnist", "test", progress=False)  # not the bundled subset: the disk, not the network, failed
    assert _no_temp_files(tmp_path / "cache") and not list((tmp_path / "cache" / "mnist").iterdir())


def test_a_read_only_cache_is_refused_with_the_fix_and_a_data_dir_still_works(tmp_path, monkeypatch, labels_dir,
                                                                             official_test_files):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(data.tempfile, "mkstemp", read_only)
    monkeypatch.setenv("VAEDRAW_MIRRORS", "http://127.0.0.1:9/")  # never reached: the cache fails first
    with pytest.raises(DataError, match=r"cannot write to the cache folder .*Read-only file system.*--data-dir"):
        data.load_split("mnist", "test", progress=False)
    assert len(data.load_split("mnist", "test", labels_dir)) == official_test_files.n  # the advice works


def test_a_mirror_that_stalls_mid_file_times_out_and_the_next_is_used(serve, labels_dir, tmp_path):
    dest = tmp_path / "dl" / "t10k-labels-idx1-ubyte.gz"
    dest.parent.mkdir()
    md5 = data._MD5["mnist"]["t10k-labels-idx1-ubyte"]
    start = time.monotonic()
    data.download_file([serve(labels_dir, _StallsMidFile) + dest.name, serve(labels_dir) + dest.name], dest, md5,
                       timeout=0.5, progress=False)
    assert time.monotonic() - start < 2.5  # one read timeout, not the stalled server's 3 s
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # the stalled part was removed
    with pytest.raises(DataError, match=r"read failed"):
        data.download_file([serve(labels_dir, _StallsMidFile) + dest.name], tmp_path / "x.gz", md5, timeout=0.5,
                           progress=False)


# ============================================================================= training: non-finite loss
def test_a_huge_learning_rate_stops_with_the_step_the_causes_and_the_last_good_checkpoint(small_mnist, tmp_path,
                                                                                        capsys):
    """Three good steps, then a resume with --lr 1e30: the first huge step makes the weights overflow."""
    out = tmp_path / "run"
    args = ["train", "--out", out, "--data-dir", small_mnist, "--device", "cpu", "--no-progress"]
    assert _cli([*args, "--steps", 3, *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]], capsys)[0] == 0
    good = ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME)
    code, err = _cli([*args, "--resume", "--keep", "new", "--steps", 40, "--lr", "1e30"], capsys)
    line = _one_line(err.strip().splitlines()[-1])
    assert code == 3, err
    assert "non-finite near step 4" in line and "smaller --lr" in line
    assert f"still holds the last good state (step 3); continue from it with `vaedraw train --out {out} --resume" in line
    ckpt = ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME)
    assert ckpt.step == 3 and all(torch.equal(ckpt.model_state[k], v) for k, v in good.model_state.items())
    assert load_run(out, device="cpu").sample(2, sampler="prior", seed=0).isfinite().all()
    assert all(np.isfinite(r["loss"]) for r in read_metrics(out / "metrics.jsonl"))


def test_a_nan_between_log_points_never_reaches_the_checkpoint_and_the_advice_works(small_mnist, tmp_path,
                                                                                  monkeypatch):
    """Weights overflow at step 6; the loss is logged every 4 steps, a checkpoint is written every step."""
    real_call = fastpath.FastStep.__call__

    def overflow_at_step_6(self, x, y, lr, kl_weight=1.0):
        if self._calls == 5:  # this call makes step 6
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))
        return real_call(self, x, y, lr, kl_weight)

    monkeypatch.setattr(fastpath.FastStep, "__call__", overflow_at_step_6)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite near step 6.*last good state \(step 5\)"):
        train(_cfg(20), out, device="cpu", data_dir=small_mnist, progress=False, argv=["t"])
    ckpt = ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME)
    assert ckpt.step == 5 and _finite(ckpt.model_state)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [4]

    monkeypatch.undo()  # the advice: resume from the last good state with a new learning rate
    train(_cfg(8, **{"train.lr": "1e-4"}), out, device="cpu", data_dir=small_mnist, resume=True, keep="new",
          progress=False, argv=["t"])
    again = ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME)
    assert again.step == 8 and _finite(again.model_state) and again.config.train.lr == 1e-4


def test_a_run_that_diverged_before_its_first_checkpoint_is_not_a_dead_end(small_mnist, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"no checkpoint had been saved yet: delete"):
        train(_cfg(40, **{"train.lr": "1e30", "train.checkpoint_every": "1000"}), out, device="cpu",
              data_dir=small_mnist, progress=False, argv=["t"])
    assert not (out / ckpt_io.CHECKPOINT_NAME).exists()
    for resume in (False, True):  # neither a new start nor --resume sends the user to the other
        with pytest.raises(VaedrawError, match=r"stopped before its first checkpoint.*delete it or choose another"):
            train(_cfg(4), out, device="cpu", data_dir=small_mnist, resume=resume, progress=False)


# ============================================================================= training: a full disk
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(small_mnist, tmp_path, monkeypatch):
    real_save = ckpt_io.save_file
    calls = []

    def fills_the_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # as safetensors reports it: half a file, then its own error type
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_io, "save_file", fills_the_disk)
    out = tmp_path / "run"
    with pytest.raises(VaedrawError, match=r"No space left.*checkpoint of step 3 is intact.*--resume"):
        train(_cfg(9, **{"train.checkpoint_every": "3"}), out, device="cpu", data_dir=small_mnist, progress=False)
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 3 and _no_temp_files(out)
    monkeypatch.undo()
    train(_cfg(9), out, device="cpu", data_dir=small_mnist, resume=True, progress=False)
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 9


def test_a_full_disk_on_the_metrics_log_is_one_line_with_the_fix(small_mnist, tmp_path, monkeypatch, capsys):
    real_open = open

    def metrics_fill_the_disk(path, mode="r", *args, **kwargs):
        if Path(path).name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rundir_mod, "open", metrics_fill_the_disk, raising=False)
    out = tmp_path / "run"
    code, err = _cli(["train", "--out", out, "--data-dir", small_mnist, "--device", "cpu", "--no-progress",
                      "--steps", 8, *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]], capsys)
    line = _one_line(err.strip().splitlines()[-1])
    assert code == errors.EXIT_OUTPUT and "No space left on device" in line and "metrics.jsonl" in line
    assert "--resume" in line
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 3  # saved at 1..3, the log at 4 failed


# ============================================================================= training: signals and kills
def _start_training(out: Path, data_dir: Path, cache: Path, resume: bool = False) -> subprocess.Popen:
    """`python -m vaedraw train` for a million steps (a new run, or --resume of `out`)."""
    env = {**os.environ, "VAEDRAW_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("VAEDRAW_DATA_DIR", None)
    argv = [sys.executable, "-m", "vaedraw", "train", "--out", str(out), "--data-dir", str(data_dir),
            "--device", "cpu", "--no-progress", "--steps", "1000000"]
    if resume:
        argv.append("--resume")
    else:
        argv += [a for k, v in {**SMALL, "train.log_every": "50"}.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("training did not reach the expected point in time")
        time.sleep(0.001)


def _step_on_disk(out: Path) -> int:
    path = out / ckpt_io.CHECKPOINT_NAME
    return ckpt_io.read_header(path)["step"] if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_exits_128_plus_n_and_says_how_to_resume(signum, small_mnist, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    proc = _start_training(out, small_mnist, tmp_path / "cache")
    _wait_for(lambda: _step_on_disk(out) >= 3, proc)  # well into the loop
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    line = _one_line(err.strip().splitlines()[-1])
    step = ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step
    # not an error: where it stopped, and the exact command that continues it (its data and device included)
    assert line == (f"vaedraw: stopped at step {step}, checkpoint saved; continue with: vaedraw train --out {out} "
                    f"--resume --data-dir {small_mnist} --device cpu"), line
    assert "error" not in err and "Traceback" not in err
    # the resume the message asks for (here with a nearer end) continues from that step
    code, err = _cli(["train", "--out", out, "--resume", "--steps", step + 3, "--no-progress", "--device", "cpu",
                      "--data-dir", small_mnist], capsys)
    assert code == 0, err
    assert f"steps {step}->{step + 3}" in err
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == step + 3


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_and_resume_works(small_mnist, tmp_path,
                                                                                   capsys):
    """SIGKILL the moment a checkpoint's temporary file appears (a save in progress); if the save won the race,
    again on the resumed run."""
    out = tmp_path / "run"
    temp_prefix = f".{ckpt_io.CHECKPOINT_NAME}."
    caught_mid_write = 0
    for attempt in range(4):
        before = _step_on_disk(out)
        proc = _start_training(out, small_mnist, tmp_path / "cache", resume=attempt > 0)
        _wait_for(lambda: _step_on_disk(out) > before + 3, proc)
        _wait_for(lambda: any(e.name.startswith(temp_prefix) for e in os.scandir(out)), proc, timeout=30)
        proc.kill()
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        caught_mid_write += any(p.name.startswith(temp_prefix) for p in out.iterdir())
        ckpt = ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME)  # the previous checkpoint, whole
        assert ckpt.step > before and _finite(ckpt.model_state)
        load_run(out, device="cpu")
        if caught_mid_write:
            break
    assert caught_mid_write >= 1, "no kill landed while a checkpoint was being written"

    step = _step_on_disk(out)
    code, err = _cli(["train", "--out", out, "--resume", "--steps", step + 2, "--no-progress", "--device", "cpu",
                      "--data-dir", small_mnist], capsys)
    assert code == 0, err
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == step + 2
    assert _no_temp_files(out)  # the killed writes' temporary files were cleared on resume
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps))  # log lines from after a checkpoint were dropped, not doubled


# ============================================================================= command line
def _damage(run: Path, how: str, tmp: Path) -> Path:
    """A copy of `run` damaged one way."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bad = tmp / f"damaged-{how}"
    shutil.copytree(run, bad)
    path = bad / ckpt_io.CHECKPOINT_NAME
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "bit-flipped header":
        raw = bytearray(path.read_bytes())
        raw[20:60] = bytes(b ^ 0xFF for b in raw[20:60])
        path.write_bytes(bytes(raw))
    elif how == "garbage mixture":
        (bad / "gmm.safetensors").write_bytes(b"\x00" * 100)
    else:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(f.metadata()["vaedraw"])
        if how == "newer format":
            header["format_version"] += 1
        elif how == "nan weights":
            name = next(k for k in tensors if k.startswith("model/") and k.endswith("weight"))
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[0] = float("nan")
        elif how == "negative step":
            header["step"] = -3
        elif how == "tampered shapes":
            header["config"]["model"]["latent_dim"] += 1
        save_file(tensors, str(path), metadata={"vaedraw": json.dumps(header)})
    return bad


@pytest.mark.parametrize("how, words", [
    ("truncated", "truncated or corrupted"), ("bit-flipped header", "checkpoint"), ("newer format", "upgrade vaedraw"),
    ("tampered shapes", "do not match"), ("garbage mixture", "vaedraw fit-gmm"), ("nan weights", "NaN or infinite"),
    ("negative step", "step -3"),
], ids=lambda v: v if v in ("truncated", "bit-flipped header", "newer format", "tampered shapes",
                            "garbage mixture", "nan weights", "negative step") else "")
def test_a_damaged_run_directory_is_one_line_and_nothing_is_written(how, words, tiny_run, tmp_path, capsys):
    bad = _damage(tiny_run, how, tmp_path)
    before = {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    commands = [["sample", bad, "--out", tmp_path / "x.png"]]
    if how != "garbage mixture":  # (training refits the mixture at the end: resuming repairs that one)
        commands.append(["train", "--out", bad, "--resume", "--steps", 9, "--no-progress", "--device", "cpu"])
    for argv in commands:
        code, err = _cli(argv, capsys)
        assert code == errors.EXIT_CHECKPOINT and words in _one_line(err), (argv[0], err)
    assert not (tmp_path / "x.png").exists()
    assert {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, words", [
    (["train", "--dataset", "cifar"], ["data.dataset", "cifar", "fashion-mnist"]),
    (["train", "--set", "sample.sampler=best"], ["sample.sampler", "best", "prior, gmm"]),
    (["train", "--set", "model.latent_dim=0"], ["model.latent_dim"]),
    (["train", "--set", "train.batch_size=-16"], ["train.batch_size"]),
    (["train", "--batch-size", "0"], ["--batch-size", "positive"]),
    (["train", "--lr", "-1"], ["--lr", "positive"]),
    (["train", "--lr", "nan"], ["--lr"]),
    (["train", "--epochs", "inf"], ["--epochs"]),
    (["train", "--keep", "both"], ["--keep", "stored", "new"]),
    (["train", "--device", "tpu"], ["tpu"]),
    (["sample", "{run}", "--sampler", "best"], ["--sampler", "best"]),
    (["sample", "{run}", "--temperature", "0"], ["--temperature"]),
    (["sample", "{run}", "--digit", "-1"], ["--digit"]),
    (["sample", "{run}", "--digit", "1,12"], ["--digit", "1,12"]),
    (["manifold", "{run}", "--digit", "10"], ["--digit", "not conditional"]),
    (["manifold", "{run}", "--grid", "0"], ["--grid"]),
    (["interpolate", "{run}", "--from-index", "-1", "--to-index", "3"], ["out of range"]),
    (["eval", "{run}", "--iwae-k", "0"], ["--iwae-k"]),
    (["serve", "{run}", "--port", "70000"], ["--port", "65535"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0] in ("train", "sample", "manifold", "interpolate",
                                                                           "eval", "serve") else "")
def test_more_bad_options_are_one_line_and_exit_status_2(argv, words, tiny_run, tmp_path, mnist_dir, capsys):
    argv = [str(tiny_run) if a == "{run}" else a for a in argv]
    picture, data_dir = ["--out", tmp_path / "x.png"], ["--data-dir", mnist_dir]
    argv += {"train": ["--out", tmp_path / "new", *data_dir, *([] if "--epochs" in argv else ["--steps", 1])],
             "sample": picture, "manifold": picture + data_dir, "interpolate": picture + data_dir,
             "eval": data_dir, "serve": data_dir}[argv[0]]
    code, err = _cli(argv, capsys)
    line = _one_line(err)
    assert code == 2, err
    for word in words:
        assert word in line, line
    assert not (tmp_path / "new").exists() and not (tmp_path / "x.png").exists()


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _vaedraw(*argv, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vaedraw", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_real_command_line_refuses_a_pickle_and_bad_options_in_one_line(tiny_run, tmp_path):
    """Through `python -m vaedraw`, as a user sees it: stderr is one line, status 2, no payload runs."""
    evil = tmp_path / "evil-run"
    evil.mkdir()
    marker = tmp_path / "payload-ran"
    torch.save({"model/w": _Payload(str(marker))}, evil / ckpt_io.CHECKPOINT_NAME)
    cases = [
        (["sample", evil, "--out", tmp_path / "x.png"], "not a readable safetensors checkpoint"),
        (["sample", tiny_run, "--digit", "3", "--out", tmp_path / "x.png"], "not conditional"),
    ]
    for (argv, words), status in zip(cases, (errors.EXIT_CHECKPOINT, errors.EXIT_USAGE)):
        proc = _vaedraw(*argv, cwd=tmp_path)
        assert proc.returncode == status and words in _one_line(proc.stderr), proc.stderr
        assert proc.stdout == ""
    assert not marker.exists() and not (tmp_path / "x.png").exists()
    with pytest.raises(CheckpointError):  # the same refusal from the Python API
        load_run(evil)
    assert not marker.exists()
    # the pickle really carries a payload: unpickling it the unsafe way would have run it
    (tmp_path / "evil.pt").write_bytes((evil / ckpt_io.CHECKPOINT_NAME).read_bytes())
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert not marker.exists()


# ============================================================================= web API
@pytest.fixture(scope="module")
def client(tiny_conditional_run, mnist_dir):
    from fastapi.testclient import TestClient

    from vaedraw import web

    return TestClient(web.create_app(load_run(tiny_conditional_run, device="cpu"), mnist_dir, n_map=300))


@pytest.mark.parametrize("body, words", [
    (b"[" * 20000 + b"]" * 20000, "pars"),  # nesting deeper than the JSON parser's recursion
    (b'{"z": [0, 0, 0, 0], "digit": 1, "seed": ' + b"9" * 5000 + b"}", "pars"),  # an integer too long to read
    (b'{"z": [1' + b"0" * 400 + b'.0, 0, 0, 0], "digit": 1}', "finite"),  # a float that overflows to inf
    (b'{"z": [0, 0, 0, 0], "digit": "\\ud800"}', "digit"),  # a lone surrogate
    (b'{"z": [0, 0, 0, 0], "digit": 1e400}', "digit"),
    (b'{"z": "0000", "digit": 1}', "z"),
    (b'{"z": {"0": 0}, "digit": 1}', "z"),
], ids=["deep nesting", "5000-digit integer", "float overflow", "lone surrogate", "digit 1e400", "z a string",
        "z an object"])
def test_hostile_json_is_a_4xx_with_a_message(client, body, words):
    r = client.post("/api/decode", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert words in r.json()["detail"].lower()


@pytest.mark.parametrize("path", [
    "/static/%252e%252e%252fweb.py", "/static/..%5cweb.py", "/static/..%5C..%5Cweb.py", "/static/.%2e/web.py",
    "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/static/index.html%00.py",
    "/static/%2fetc%2fpasswd", "/static/web_static%2findex.html", "/api/../static/../web.py",
])
def test_more_path_traversal_forms_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["detail"]
    assert "import" not in r.text and "root:" not in r.text


def test_twenty_concurrent_clients_get_no_error(tiny_conditional_run, mnist_dir):
    """A real uvicorn server on 127.0.0.1 and benchmarks/web_load.py's load: 20 clients, 200 decodes."""
    import httpx
    import uvicorn

    from vaedraw import web

    spec = importlib.util.spec_from_file_location("web_load", REPO / "benchmarks" / "web_load.py")
    web_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(web_load)
    app = web.create_app(load_run(tiny_conditional_run, device="cpu"), mnist_dir, n_map=300)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        info = httpx.get(f"{base}/api/info").json()
        latencies, wall = web_load.run_load(base, info, n_requests=200, n_clients=20)  # raises on any non-200
        assert len(latencies) == 200 and all(0 < t < 30 for t in latencies)
        assert httpx.get(f"{base}/api/info").status_code == 200  # still serving afterwards
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ============================================================================= training: data provenance
def test_a_resume_uses_the_data_the_run_recorded_or_refuses(small_mnist, mnist_dir, tmp_path, capsys):
    """Trained with --data-dir: a resume without it finds the same files; other files, or the files gone,
    are refused with the option that fixes it, and nothing in the run changes."""
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(small_mnist, folder)
    out = tmp_path / "run"
    args = ["train", "--out", out, "--device", "cpu", "--no-progress"]
    assert _cli([*args, "--data-dir", folder, "--steps", 2,
                 *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]], capsys)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = _cli([*args, "--resume", "--steps", 4, "--data-dir", mnist_dir], capsys)  # other files
    assert code == errors.EXIT_DATA and "other train files" in _one_line(err), err
    folder.rename(tmp_path / "moved")
    code, err = _cli([*args, "--resume", "--steps", 4], capsys)  # the recorded folder is gone
    assert code == errors.EXIT_DATA and f"--data-dir {folder}" in _one_line(err), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "moved").rename(folder)
    code, err = _cli([*args, "--resume", "--steps", 4], capsys)  # found where it was trained
    assert code == 0, err
    assert ckpt_io.load(out / ckpt_io.CHECKPOINT_NAME).step == 4
    assert json.loads((out / "data.json").read_text())["train"]["path"] == str(folder)
