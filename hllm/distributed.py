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


def configure_cuda_kernels() -> None:
    """Process-wide CUDA kernel choices for HLLM's shapes.

    cuDNN's fused attention (the first SDPA backend PyTorch tries for bf16 on Hopper) builds an
    execution plan per new (batch, length) shape; length bucketing and deduplication make nearly
    every Item LLM call a new shape, so under bf16 a step spent more time planning than computing
    (H100, MiniLM: 9.1 steps/s with it, 18.8 without; `benchmarks/train_throughput.py`). Flash /
    memory-efficient SDPA need no plan. ``HLLM_CUDNN_SDPA=1`` keeps cuDNN attention on.
    """
    if torch.cuda.is_available() and os.environ.get("HLLM_CUDNN_SDPA", "0") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)


def single_device(device: str = "auto", setting: str = "eval.device") -> torch.device:
    """The one device a single-process job (evaluation, export, recommend) runs on."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{setting} must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}=cuda but no CUDA device is visible")
    if device != "cpu" and torch.cuda.is_available():
        configure_cuda_kernels()
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join (or create from torchrun's environment) the default process group.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    A group created by the caller (tests) is reused as is.
    """
    want_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    owns = False
    backend: str | None
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
        configure_cuda_kernels()
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


def _all_gather_single(out: torch.Tensor, x: torch.Tensor) -> None:
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x)


def _reduce_scatter_single(out: torch.Tensor, x: torch.Tensor) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the
    gradients w.r.t. its own slice (every rank's loss used every slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        k = grad.shape[0] // world
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((k, *grad.shape[1:]))
            _reduce_scatter_single(mine, grad)
            return mine
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum everything, keep our slice
        return grad[rank * k : (rank + 1) * k].clone()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [k, ...] from every rank in rank order, keeping the
    autograd graph: each rank's loss back-propagates into every rank's slice
    (the paper's shared negative pool). Every rank must pass the same k.
    Identity in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """All ranks' ids in rank order (no gradient), matching ``gather_with_grad``'s rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids.contiguous())
    return torch.cat(out)


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's tensor on every rank, in place (a no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(x, src=src)
    return x


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


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised multi-process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
