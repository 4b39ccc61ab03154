"""Data-parallel training: 2 CPU processes (gloo on 127.0.0.1) follow the single-process run.

The real training path is used, dropout and dynamic binarization included: every process draws the
global batch's noise and keeps its rows (fastpath.Noise), so the two processes together see exactly the
batches and the noise of one process; only the order of floating-point sums differs. float32 is asked
for: bfloat16 rounds the half-batches' activations differently, which Adam's first steps magnify.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vaedraw import distributed
from vaedraw.checkpoint import load as load_checkpoint
from vaedraw.config import apply_overrides, preset
from vaedraw.models import build_model
from vaedraw.train import Batcher, train

SETS = {"model.channels": 4, "model.hidden": 16, "model.latent_dim": 4, "model.dropout": 0.2,
        "train.steps": 4, "train.batch_size": 32, "train.log_every": 2, "train.eval_every": 1000,
        "train.picture_every": 1000, "train.checkpoint_every": 1000, "train.eval_images": 100,
        "sample.fit_gmm": False, "sample.sampler": "prior", "train.precision": "fp32"}


# the hierarchy with the importance-weighted objective: K samples per image, each drawn for the global batch
HIERARCHICAL_SETS = {**{k: v for k, v in SETS.items() if not k.startswith("model.")},
                     "model.hierarchical.channels": 4, "model.hierarchical.latent_channels": 2,
                     "model.hierarchical.hidden": 16, "model.latent_dim": 4, "train.iwae_k": 2,
                     "train.kl_warmup": 3, "train.grad_clip": 50.0}


@pytest.mark.parametrize("name, sets", [("default", SETS), ("hierarchical", HIERARCHICAL_SETS)])
def test_two_processes_match_one(mnist_dir, tmp_path, name, sets):
    env = {**os.environ, "VAEDRAW_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["train", "--preset", name, "--device", "cpu", "--data-dir", str(mnist_dir), "--no-progress",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    two = tmp_path / "two"
    proc = subprocess.run(distributed.torchrun_command(2, [*args, "--out", str(two)]), env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr

    cfg = preset(name)
    apply_overrides(cfg, sets)
    one = train(cfg, tmp_path / "one", device="cpu", data_dir=mnist_dir, progress=False, argv=["t"])
    a = load_checkpoint(one / "checkpoint.safetensors")
    b = load_checkpoint(two / "checkpoint.safetensors")
    assert a.step == b.step == 4
    torch.manual_seed(cfg.train.seed)  # the initial weights both runs started from (same draws as training's)
    init = build_model(cfg.model).state_dict()
    assert a.model_state.keys() == b.model_state.keys() == init.keys()
    for k, v in a.model_state.items():
        torch.testing.assert_close(b.model_state[k], v, rtol=1e-4, atol=1e-5, msg=k)  # the two runs agree
        assert not torch.equal(b.model_state[k], init[k]), k  # and every weight trained away from its start
        assert (b.model_state[k] - init[k]).abs().max() > 1e-5, k
    # rank 0 alone wrote the run: one metrics line per log point, not one per process
    rows = (two / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"train"' in r]) == 2


def test_batcher_ranks_split_every_global_batch():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1).expand(40, 28, 28).contiguous()
    labels = torch.arange(40)
    whole = Batcher(images, labels, 8, seed=3)
    parts = [Batcher(images, labels, 8, seed=3, rank=r, world=2) for r in range(2)]
    for step in (0, 4, 5, 11):
        assert torch.equal(torch.cat([p.indices(step) for p in parts]), whole.indices(step))


def test_single_process_context_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.setup(torch.device("cpu"))
    assert not ctx.enabled and ctx.is_main and ctx.world == 1
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(distributed.all_mean(t.clone(), ctx), t)
    cmd = distributed.torchrun_command(3, ["train", "--steps", "2"])
    assert cmd[cmd.index("--nproc-per-node") + 1] == "3" and cmd[-3:] == ["train", "--steps", "2"]
    assert sys.executable == cmd[0]


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc), children before grandchildren."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


def test_a_killed_worker_ends_in_one_line_naming_it(mnist_dir, tmp_path):
    env = {**os.environ, "VAEDRAW_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    sets = {**SETS, "train.steps": 1_000_000, "train.checkpoint_every": 2}
    proc = subprocess.Popen([sys.executable, "-m", "vaedraw", "train", "--nproc", "2", "--device", "cpu",
                             "--data-dir", str(mnist_dir), "--no-progress", "--out", str(out),
                             *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    workers = [p for p in _descendants(proc.pid) if b"vaedraw" in Path(f"/proc/{p}/cmdline").read_bytes()
               and b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 9, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "error" not in "".join(lines[:-1]), err[-3000:]
    assert lines[-1].startswith("vaedraw: error: worker ") and "of 2 was killed by SIGKILL" in lines[-1]
    assert f"vaedraw train --device cpu --data-dir {mnist_dir}" in lines[-1]
    assert lines[-1].endswith("--resume --nproc 2")
