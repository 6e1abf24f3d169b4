"""Data-parallel training with PyTorch's own stack: ``torch.distributed`` (NCCL on GPUs, gloo on CPU),
``DistributedDataParallel``, processes started by ``torchrun`` (``torch.distributed.run``), and ``srun`` across
SLURM nodes.

The unit of work is the *global* batch (``training.batch_size``): every epoch has one permutation of the
training scans, drawn from ``(seed, epoch)`` alone, cut into global batches; rank ``r`` of ``W`` takes the
``r``-th of ``W`` near-equal slices of each. Each rank's loss is weighted by its share of the global batch, so
the gradients DDP averages are those of the global batch's mean loss, whatever the number of processes: a run
on 2 processes follows the loss curve of a run on one with the same global batch (tests/test_vae_distributed.py),
up to the reparameterisation noise, which each rank draws from its own stream.

Only rank 0 writes checkpoints and outputs; every rank reads the checkpoint when resuming.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "GlobalBatchSampler", "launch_command", "rendezvous_host", "run_launched",
           "world_from_env"]

#: Port of the rendezvous on the first node (``--rdzv-endpoint``), unless MASTER_PORT is set.
DEFAULT_PORT = 29_531


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job: its rank, the number of processes, its GPU on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU (``cuda:<local_rank>``) on CUDA."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def init(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU); torchrun's environment gives the rendezvous."""
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks (in place; a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def world_from_env() -> DistributedContext:
    """The context torchrun sets up (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    return DistributedContext(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                              local_rank=int(os.environ.get("LOCAL_RANK", 0)))


class GlobalBatchSampler:
    """This rank's part of every global batch of one epoch's permutation (a DataLoader ``batch_sampler``).

    The permutation depends on ``(seed, epoch)`` only (:meth:`set_epoch`), so it is the same on every rank,
    in a resumed run and in an uninterrupted one. Slices of one global batch differ by at most one scan;
    :meth:`global_sizes` tells the loop each global batch's size, by which it weights each rank's loss. In
    training (``shuffle=True``) every rank needs a scan of every batch (DDP averages gradients at each step), so
    with several ranks a last global batch with fewer scans than ranks is left out of that epoch. Validation
    (``shuffle=False``: the scans in order) scores every scan once; a rank simply skips its empty slices.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if shuffle and batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the number of processes {world_size}: "
                             "every process needs at least one scan of each global batch")
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), shuffle, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def global_batches(self) -> list[list[int]]:
        order = self.order()
        batches = [order[i: i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return [b for b in batches if len(b) >= self.world_size] if self.shuffle else batches

    def global_sizes(self) -> list[int]:
        return [len(b) for b in self.global_batches()]

    def _slice(self, batch: Sequence[int]) -> list[int]:
        bounds = [round(len(batch) * r / self.world_size) for r in range(self.world_size + 1)]
        return list(batch[bounds[self.rank]: bounds[self.rank + 1]])

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            part = self._slice(batch)
            if part:
                yield part

    def __len__(self) -> int:
        return sum(1 for batch in self.global_batches() if self._slice(batch))


def rendezvous_host() -> str:
    """The first node of the SLURM job (``scontrol show hostnames``), else this host."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return socket.gethostname()


def launch_command(entry: Sequence[str], *, processes_per_node: int, nodes: int = 1,
                   port: int | None = None, python: str | None = None) -> list[str]:
    """The command that runs ``python -m <entry...>`` on ``nodes`` x ``processes_per_node`` processes.

    One node: ``torchrun --standalone`` (a private rendezvous on this host). Several (inside a SLURM job that
    holds them): ``srun`` starts one ``torchrun`` per node, meeting on the job's first node.
    """
    python = python or sys.executable
    run = [python, "-m", "torch.distributed.run", f"--nproc-per-node={int(processes_per_node)}"]
    if nodes <= 1:
        return [*run, "--standalone", "-m", *entry]
    port = int(port or os.environ.get("MASTER_PORT") or DEFAULT_PORT)
    # --overlap: the job step that runs this (the executor's own srun) already holds the allocation's CPUs.
    return ["srun", "--overlap", f"--nodes={int(nodes)}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *run, f"--nnodes={int(nodes)}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous_host()}:{port}",
            f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'brainvae')}", "-m", *entry]


def run_launched(command: Sequence[str], env: dict[str, Any] | None = None) -> None:
    """Run a launch command to the end; a failed process fails the caller with the command in the message."""
    result = subprocess.run(list(command), env={**os.environ, **(env or {})}, check=False)
    if result.returncode:
        raise RuntimeError(f"distributed training failed (exit {result.returncode}): {shlex.join(command)}")
