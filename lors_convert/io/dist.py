"""This process's place in a ``torchrun`` job: rank, world size and the few collectives lors uses."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch


def _destroy_process_group() -> None:
    """Tear the process group down before interpreter exit: left to finalization, gloo's threads
    aborted 2 runs in 6 with "terminate called without an active exception" (SIGABRT, exit -6)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            atexit.register(_destroy_process_group)
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
