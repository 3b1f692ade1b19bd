"""Process-group setup and the collectives training needs (gloo on CPU, NCCL on GPU).

Works unchanged under ``torchrun`` (env:// rendezvous: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), inside tests that spawn processes with a
``file://`` init method, and in a plain single process (no group at all).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join (or create from torchrun's environment) the default process group.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    A group created by the caller (tests) is reused as is.
    """
    want_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if want_cuda else "gloo"
        if want_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
    else:
        rank, world, backend = 0, 1, None
    local_rank = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    if want_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend, owns_group=owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [k, ...] from every rank in rank order, keeping the
    autograd graph: each rank's loss back-propagates into every rank's slice
    (the paper's shared negative pool). Identity in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a few float stats over ranks (for logging only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
