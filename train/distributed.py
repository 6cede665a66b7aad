"""Data-parallel phase 1 under `torchrun`: one process per GPU (or per CPU worker with gloo).

`torchrun --nproc_per_node N -m mmap_train.cli phase1 ...` starts N copies;
each sees RANK, WORLD_SIZE and LOCAL_RANK in its environment. Every process
draws the same epoch permutation and cuts it into global micro-batches of
`batch_size * world` spots; each process encodes its share (every world-th
spot of the batch, as torch's DistributedSampler deals them), and DDP sums
the gradients, weighted so that one step is the step a single process would
take on the whole global batch. Rank 0 alone validates and writes the
checkpoints; `--resume` reads them in every process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DataParallel:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def main(self) -> bool:
        """The process that validates, logs and writes checkpoints."""
        return self.rank == 0

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This process's spots of a global micro-batch: every world-th one, from its rank on."""
        return rows[self.rank::self.world]

    def sum(self, value: float, device: torch.device) -> float:
        """The sum of `value` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`module` under DistributedDataParallel (itself when not distributed)."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, module: torch.nn.Module, sync: bool):
        """Gradients stay local until the last micro-batch of an accumulated step."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return module.no_sync()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def data_parallel(device: str) -> DataParallel:
    """Join the process group `torchrun` describes in the environment (WORLD_SIZE > 1); else one process.

    The backend is NCCL for CUDA devices and gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DataParallel()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not torch.distributed.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        owns = True
    return DataParallel(rank, world, local, owns)
