"""Training setup: seeding, optimizer parameter groups, LR schedule, gradient checkpointing, FSDP wrapping."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from hllm.models.base import SeqRecModel
from hllm.models.losses import LogitScale

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, new_lr: float | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, 1-d params and anything the
    model lists in ``no_weight_decay()`` (the [ITEM] vector, the similarity scale).

    With ``new_lr``, parameters under the model's ``new_parameter_prefixes()``
    (created from scratch rather than loaded pretrained: a User LLM built from
    config, the [ITEM] vector, the projection, the scale) get that learning rate
    (the reference code had one rate for everything). Empty groups are dropped."""
    no_weight_decay = getattr(model, "no_weight_decay", None)
    new_prefixes = getattr(model, "new_parameter_prefixes", None) if new_lr else None
    explicit = set(no_weight_decay()) if no_weight_decay is not None else set()
    prefixes = tuple(new_prefixes()) if new_prefixes is not None else ()
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name in explicit or name.endswith(".bias") or "norm" in name.lower()
        new = any(name == x or name.startswith(x + ".") for x in prefixes)
        groups.setdefault((no_decay, new), []).append(p)
    out = []
    for (no_decay, new), params in sorted(groups.items()):
        g: dict[str, Any] = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if lr is not None:
            g["lr"] = new_lr if new else lr
        out.append(g)
    return out


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to 0 (the paper's schedule)."""
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _enable_gradient_checkpointing(model: nn.Module) -> int:
    """Non-reentrant activation checkpointing per block of every HF backbone in ``model``."""
    n = 0
    for m in model.modules():
        if not getattr(m, "supports_gradient_checkpointing", False):
            continue
        if (enable := getattr(m, "activation_checkpointing_enable", None)) is not None:  # transformers >= 5.2x name
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif (enable := getattr(m, "gradient_checkpointing_enable", None)) is not None:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            continue
        n += 1
    return n


def _fsdp_shard(step_module: _Step) -> None:
    """FSDP2: shard every transformer block (HF ``_no_split_modules``), then the root.

    A block holding a backbone's word-embedding table (e.g. ``BertEmbeddings``)
    stays in the root group: the Item LLM looks that table up outside the
    block's own forward (to splice in the [ITEM] vector), where a separately
    sharded table would still be a DTensor shard."""
    from torch.distributed.fsdp import fully_shard

    names: set[str] = set()
    embeddings = []
    for m in step_module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
        get_input_embeddings = getattr(m, "get_input_embeddings", None)
        if get_input_embeddings is not None and hasattr(m, "config"):
            try:
                emb = get_input_embeddings()
            except (NotImplementedError, AttributeError):  # the User LLM's table was dropped
                emb = None
            if emb is not None:
                embeddings.append(emb)
    blocks = [
        m
        for m in step_module.modules()
        if type(m).__name__ in names and not any(e is sub for e in embeddings for sub in m.modules())
    ]
    for b in blocks:
        fully_shard(b)
    fully_shard(step_module)
    log.info("FSDP2: sharded %d blocks + root", len(blocks))


def _scale_modules(model: nn.Module) -> list[LogitScale]:
    return [m for m in model.modules() if isinstance(m, LogitScale)]


class _Step(nn.Module):
    """Routes ``train_loss`` through ``forward`` so DDP/FSDP hooks see the step."""

    def __init__(self, model: SeqRecModel):
        super().__init__()
        self.model = model

    def forward(self, windows: torch.Tensor, negatives: torch.Tensor):
        return self.model.train_loss(windows, negatives)
