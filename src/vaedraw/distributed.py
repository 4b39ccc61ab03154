"""Data-parallel training across processes: process-group setup from torchrun's environment, rank helpers.

`torchrun --nproc-per-node N -m vaedraw train ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; `setup()` reads them, joins the group (NCCL on GPUs, gloo on CPUs) and
pins each process to its GPU (cuda:LOCAL_RANK). Without those variables everything here is a no-op
for a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import EXIT_SIGNAL_BASE, EXIT_WORKER, VaedrawError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes checkpoints and pictures."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> Context:
    """Join the process group torchrun describes (idempotent), or return the single-process context.

    `device`: the resolved device; with CUDA each process takes cuda:LOCAL_RANK.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise VaedrawError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                               "start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kw)
    return Context(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of `t` over processes (in place, returned); identity for one process."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(ctx.world)
    return t


def any_flag(flag: bool, ctx: Context, device: torch.device) -> bool:
    """True on every process if `flag` is true on any (e.g. a signal that reached only some of them)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `vaedraw <argv>` in `nproc` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "vaedraw", *argv]


def is_peer_failure(e: BaseException) -> bool:
    """Whether a collective failed because another process went away (killed, crashed), not a bug here."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(e).lower()
    return isinstance(e, backend_error) or any(w in text for w in (
        "connection closed", "connection reset", "broken pipe", "peer", "timed out", "socket", "gloo"))


# Lines a worker prints for the user (its progress, its messages); everything else torchrun and dying workers
# write (tracebacks, the elastic agent's failure report) is held back and summed up in one line.
_USER_LINE = re.compile(r"^(vaedraw[: ]|step \d)")
_PEER_LOST = "lost contact with another worker"


def _without_nproc(argv: list[str]) -> list[str]:
    i = next((i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc=")), None)
    if i is None:
        return list(argv)
    return argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]


def _root_cause(report: str) -> tuple[str, int | None]:
    """(rank, exit code) of the first failed worker in torchrun's failure report ("?" / None if absent)."""
    part = report.split("Root Cause", 1)[-1]
    rank = re.search(r"rank\s*:\s*(\d+)", part)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", part)
    return (rank.group(1) if rank else "?"), (int(code.group(1)) if code else None)


def _relay(proc: subprocess.Popen) -> tuple[list[str], set[str]]:
    """Pass the workers' own lines on (each message once); hold the rest. -> (held lines, shown lines)."""
    held: list[str] = []
    shown: set[str] = set()
    for line in proc.stderr:
        if _USER_LINE.match(line) and _PEER_LOST not in line:
            if line not in shown or not line.startswith("vaedraw"):
                sys.stderr.write(line)
                sys.stderr.flush()
            shown.add(line)
        else:
            held.append(line)
    return held, shown


def launch(nproc: int, argv: list[str]) -> int:
    """Run `vaedraw <argv>` (without its --nproc) in `nproc` local processes under torchrun. -> exit status.

    The workers' own lines pass through (once each). When a worker dies (killed, out of memory), the others
    stop; the tracebacks and torchrun's report become one line naming the worker and the command that
    continues the run (exit 9). A worker that failed with a vaedraw error has said why: its status is kept.
    """
    argv = _without_nproc(argv)
    proc = subprocess.Popen(torchrun_command(nproc, argv), stderr=subprocess.PIPE, text=True, errors="replace")
    stopped: list[int] = []

    def stop(signum, frame):  # Ctrl-C reaches the workers from the terminal; a SIGTERM is passed on
        stopped.append(signum)
        if signum == signal.SIGTERM:
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        held, shown = _relay(proc)
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code == 0:
        return 0
    if stopped:  # the workers saved a checkpoint and rank 0 said how to continue
        return EXIT_SIGNAL_BASE + stopped[0]
    rank, worker_code = _root_cause("".join(held))
    if worker_code is not None and worker_code > 1 and any(s.startswith("vaedraw: ") for s in shown):
        return worker_code  # the worker's own one-line message was shown
    if worker_code is None or worker_code < 0 or any(_PEER_LOST in h for h in held):
        how = f"was killed by {signal.Signals(-worker_code).name}" if worker_code and worker_code < 0 and \
            -worker_code in signal.valid_signals() else f"ended abnormally (status {worker_code})"
        again = argv if "--resume" in argv else [*argv, "--resume"]
        sys.stderr.write(f"vaedraw: error: worker {rank} of {nproc} {how}, so the others stopped; the last checkpoint "
                         f"is intact: continue with: {shlex.join(['vaedraw', *again, '--nproc', str(nproc)])}\n")
        return EXIT_WORKER
    sys.stderr.writelines(held)  # a bug: its traceback
    return code
