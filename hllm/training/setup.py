"""Training setup, built once before the loop (:class:`TrainSetup`): seeding, data and model, DDP/FSDP2
wrapping, gradient checkpointing, optimizer parameter groups and the LR schedule."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hllm import distributed as D
from hllm import lineage
from hllm.config import Config
from hllm.data import versioning
from hllm.data.dataset import BuiltData
from hllm.models.base import SeqRecModel
from hllm.models.losses import LogitScale
from hllm.training.batching import GlobalBatches, negatives_per_rank

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


# --------------------------------------------------------------------------- everything built once


@dataclass
class TrainSetup:
    """What the loop needs, built once before it (:func:`build_setup`) and never re-assigned: the
    data, the model and its DDP/FSDP wrapping, the step schedule, the optimizer and LR schedule."""

    built: BuiltData
    model: SeqRecModel  # the bare model: what checkpoints save and validation calls
    step_module: _Step  # model + loss as one module: the unit DDP/FSDP wrap
    wrapped: nn.Module  # what a step calls: DDP(step_module), or step_module (sharded in place by FSDP2)
    fsdp: bool
    windows: np.ndarray  # [n, L + 1] training windows of item idx
    batches: GlobalBatches
    total_steps: int
    k_local: int  # negatives this rank samples per step
    optimizer: torch.optim.Optimizer | None  # None: nothing to optimise (popularity)
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    lr_keys: list[str]  # per param group: logged as train/lr or train/lr_new
    scales: list[LogitScale]  # learnable similarity scales, clamped after each step
    content_hash: str | None  # of the built tables (rank 0), recorded in every checkpoint
    code_sha: str | None

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None


def build_setup(cfg: Config, info: D.DistInfo) -> TrainSetup:
    """Check the settings, seed, load data and model (tokenising once for all ranks), wrap it for
    DDP/FSDP2 and build AdamW + warmup/cosine. Collective under torchrun."""
    from hllm.data.dataset import load_built, train_sequences, training_windows
    from hllm.evaluation.evaluate import check_protocol
    from hllm.models import TEXT_KINDS, build_model

    t = cfg.train
    for name, v in (("batch_size", t.batch_size), ("grad_accum", t.grad_accum), ("epochs", t.epochs)):
        if v < 1:
            raise ValueError(f"train.{name} must be >= 1, got {v}")
    if t.eval_every_epoch:  # a bad protocol should fail now, not after the first epoch
        check_protocol(cfg.eval.protocol)
    seed_everything(t.seed)
    built = load_built(cfg.paths.built_dir)
    tokens = None
    if cfg.model.kind in TEXT_KINDS:
        from hllm.data.text import ensure_tokens

        if info.is_main:  # tokenise once, then the other ranks read the cache
            tokens = ensure_tokens(cfg, built.dir)
        D.barrier()
        if not info.is_main:
            tokens = ensure_tokens(cfg, built.dir)
    model = build_model(cfg, built, tokens).to(info.device)
    # identical init on every rank (above), then distinct dropout streams per rank
    torch.manual_seed(t.seed + 1_000_003 * info.rank)
    trainable = any(p.requires_grad for p in model.parameters())
    if t.gradient_checkpointing:
        log.info("gradient checkpointing on %d backbone(s)", _enable_gradient_checkpointing(model))
    # the training part of eval.protocol's split (temporal: only interactions up to the validation cutoff)
    train_part = train_sequences(built.sequences, built.split_plan(cfg.eval.protocol))
    windows = training_windows(train_part, cfg.build.max_seq_len, cfg.build.window_mode)
    batches = GlobalBatches(len(windows), t.batch_size, info.world_size, t.grad_accum, t.seed)
    spe = batches.steps_per_epoch
    total_steps = t.epochs * spe if t.max_steps <= 0 else min(t.max_steps, t.epochs * spe)
    k_local = negatives_per_rank(t.num_negatives, info.world_size)
    if k_local * info.world_size != t.num_negatives:
        log.warning("train.num_negatives=%d is not a multiple of %d ranks: the pool holds %d",
                    t.num_negatives, info.world_size, k_local * info.world_size)  # fmt: skip
    step_module, wrapped, fsdp = _wrap(model, cfg, info, trainable)
    optimizer, scheduler, lr_keys = _optimizer(model, cfg, total_steps) if trainable else (None, None, [])
    return TrainSetup(
        built=built, model=model, step_module=step_module, wrapped=wrapped, fsdp=fsdp, windows=windows,
        batches=batches, total_steps=total_steps, k_local=k_local, optimizer=optimizer, scheduler=scheduler,
        lr_keys=lr_keys, scales=_scale_modules(model),
        content_hash=versioning.content_hash(built.dir) if info.is_main else None,
        code_sha=lineage.code_version().label if info.is_main else None,
    )  # fmt: skip


def _wrap(model: SeqRecModel, cfg: Config, info: D.DistInfo, trainable: bool) -> tuple[_Step, nn.Module, bool]:
    """(step module, what a step calls, whether FSDP2 sharded it): FSDP2 when ``train.fsdp`` under
    torchrun, else DDP under torchrun, else the step module itself."""
    step_module = _Step(model)
    if trainable and cfg.train.fsdp and info.distributed:
        _fsdp_shard(step_module)
        return step_module, step_module, True
    if trainable and info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # during a frozen stage (train.frozen_share) the Item LLM's trainable weights get no gradient yet
        unused = cfg.model.kind == "hllm" and cfg.train.frozen_share > 0
        return step_module, DDP(step_module, device_ids=ids, find_unused_parameters=unused), False
    return step_module, step_module, False


def _optimizer(
    model: nn.Module, cfg: Config, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[str]]:
    t = cfg.train
    groups = param_groups(model, t.weight_decay, t.lr, t.new_params_lr or None)
    # logged as train/lr (pretrained parameters, train.lr) and train/lr_new (train.new_params_lr)
    new_lr = t.new_params_lr and t.new_params_lr != t.lr
    lr_keys = ["lr_new" if new_lr and g["lr"] == t.new_params_lr else "lr" for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, t.warmup_ratio))
    return optimizer, scheduler, lr_keys


def describe(setup: TrainSetup, cfg: Config, info: D.DistInfo) -> str:
    """The one-line summary logged when training starts."""
    t, s = cfg.train, setup
    mode = " (FSDP2)" if s.fsdp else (" (DDP)" if info.distributed and s.trainable else "")
    params = sum(p.numel() for p in s.model.parameters() if p.requires_grad) / 1e6
    return (
        f"train {cfg.model.kind}: {len(s.windows)} windows, {s.batches.steps_per_epoch} steps/epoch x {t.epochs} "
        f"epochs -> {s.total_steps} steps; global batch {s.batches.global_batch} ({info.world_size} ranks x "
        f"{t.batch_size} x accum {t.grad_accum}), {s.k_local * info.world_size} negatives/step, {params:.2f}M "
        f"trainable params{mode}, device {info.device}"
    )
