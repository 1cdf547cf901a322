"""The processes of a training run: one, or many launched by torchrun.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in each process's environment; `Distributed.from_env()` reads
them, joins the default process group (NCCL when CUDA is available, gloo on the CPU) and builds a one-dimensional
`DeviceMesh` over all ranks, which `parallel.parallelize` uses both for FSDP2 and for expert parallelism. It
gives the training loop what it needs to run the same code on one process or many: each rank's part of a global
batch, the global batch gathered back, means over ranks for logging, a barrier. With one process (no WORLD_SIZE,
or WORLD_SIZE=1) there is no process group and every method is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None
    owns_group: bool = False  # this object initialised the process group, so `close` destroys it

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("ep",))
        return cls(dist.get_rank(), dist.get_world_size(), device, mesh, owns)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, progress and the final model."""
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (dim 0 divisible by the world size, checked at start)."""
        if self.world == 1:
            return batch
        size = batch.shape[0] // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The inverse of `shard`: every rank's part, concatenated in rank order (no gradient)."""
        if self.world == 1:
            return part
        parts = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)

    def mean(self, *values: float) -> list[float]:
        """Each value averaged over the ranks (every rank has the same number of tokens)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Destroy the group this object made. With `wait`, first once every rank has reached here: a gloo rank
        that destroys its group while a peer is still working (rank 0 writing the final model) can abort at exit
        with "terminate called without an active exception". Without it (a rank that failed), at once: its
        peers may never arrive."""
        if self.owns_group:
            if wait:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(wait=exc_type is None)
