"""Data-parallel training across processes: process-group setup from torchrun's environment, rank helpers.

`torchrun --nproc-per-node N -m vaedraw train ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; `setup()` reads them, joins the group (NCCL on GPUs, gloo on CPUs) and
pins each process to its GPU (cuda:LOCAL_RANK). Without those variables everything here is a no-op
for a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import VaedrawError


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
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "vaedraw", *argv]
