"""The interface every recommender (HLLM, SASRec, popularity) implements, so that
training, evaluation, export and serving are one code path for all of them.

Shapes: B sequences, W = L + 1 window width, K negatives, d embedding size.
Item index 0 is padding everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from hllm.models.losses import RepeatScore


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean over valid target positions of the local batch
    stats: dict[str, float] = field(default_factory=dict)  # scale, surviving negatives, top-k accuracy, ...


class SeqRecModel(nn.Module):
    """Item tower + user tower trained on next-item prediction.

    - ``train_loss(windows, negatives)``: windows int64 [B, W] left-padded item
      idx (inputs = [:, :-1], targets = [:, 1:]); negatives int64 [K_local]
      sampled on this rank. Implementations gather negatives across ranks.
    - ``item_embeddings(idx)``: [n, d] for item idx (eval/export; no grad needed).
    - ``user_embeddings(history_emb, mask)``: history_emb [B, L, d] item
      embeddings (from ``item_embeddings``), mask bool [B, L] (True = real item,
      left padding). Returns [B, d]: the prediction of the next item.
    - ``normalize``: whether scores are cosine (L2-normalise both sides) or a raw dot product.
    """

    normalize: bool = True
    # state_dict key prefixes of the item tower (None: the whole model counts), so that a retrained
    # user tower alone does not invalidate exported item embeddings (``hllm.serving.export.item_model_version``)
    item_state_prefixes: tuple[str, ...] | None = None
    # whether the item table is worth an on-disk cache (``hllm.evaluation.item_cache.cached_item_embeddings``):
    # yes for an encoder over item text, no for an ID-table lookup that costs nothing to recompute
    cache_item_embeddings: bool = True
    # whether an item that never occurred in training gets a meaningful embedding: yes when items are
    # embedded from their content (HLLM's text), no for an ID table whose row of such an item is untrained
    # (evaluation then treats those items as no candidates and their targets as misses)
    scores_unseen_items: bool = False

    # a learned score for items already in the history (``model.repeat_score``; losses.RepeatScore), None when off
    # (annotation only: a class attribute would shadow the submodule nn.Module registers)
    repeat: RepeatScore | None

    def seen_bonus(self) -> float | None:
        """What an item of the history the model read adds to its score in evaluation and serving, in their
        units (cosine when ``normalize``: the training logit is scale x cosine + repeat), None when off."""
        repeat = getattr(self, "repeat", None)
        if repeat is None:
            return None
        value = float(repeat.value.detach())
        scale = getattr(self, "scale", None)
        return value / float(scale()) if self.normalize and scale is not None else value

    def item_inputs_fingerprint(self) -> str | None:
        """Hash of what the item tower reads besides its weights (HLLM: the item token cache), or
        None when the weights alone decide the item embeddings."""
        return None

    def train_loss(self, windows: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def user_embeddings(self, history_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IdSeqModel(SeqRecModel):
    """An ID model (SASRec, GRU4Rec): an ``item_emb`` table and ``encode(emb, mask) -> [B, L, d]`` over left-padded
    histories; subclasses set ``item_emb``, ``scale`` (a ``LogitScale``), ``full_softmax`` and ``nce_threshold``.
    Trained with the family's InfoNCE at every valid position, over the sampled pool or, with ``full_softmax``,
    over every item (RecBole's CE)."""

    normalize = True  # cosine scores, as in the InfoNCE it is trained with
    cache_item_embeddings = False  # a table lookup: recomputing is cheaper than a disk cache
    item_emb: nn.Embedding
    scale: nn.Module
    full_softmax: bool
    nce_threshold: float

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_loss(self, windows: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        from hllm.data.dataset import PAD
        from hllm.distributed import gather_ids, gather_with_grad
        from hllm.models.losses import infonce, target_mask

        inputs, targets = windows[:, :-1], windows[:, 1:]
        valid = target_mask(windows)
        hidden = self.encode(self.item_emb(inputs), inputs != PAD)
        n_items = self.item_emb.num_embeddings
        if self.full_softmax:  # every real item is a candidate (the target itself is dropped by the threshold)
            neg = self.item_emb.weight[PAD + 1 :]
            pool_ids = torch.arange(PAD + 1, n_items, device=windows.device) if self.repeat is not None else None
        else:
            neg = gather_with_grad(self.item_emb(negatives))  # shared pool across ranks, with gradients
            pool_ids = gather_ids(negatives) if self.repeat is not None else None
        repeat = None
        if self.repeat is not None and pool_ids is not None:
            repeat = (self.repeat.value, *self.repeat.seen(windows, valid, pool_ids, n_items))
        loss, stats = infonce(hidden[valid], self.item_emb(targets[valid]), neg, self.scale(), self.nce_threshold,
                              repeat=repeat)  # fmt: skip
        return LossOutput(loss=loss, stats=stats)

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        return self.item_emb(idx)

    def user_embeddings(self, history_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode(history_emb, mask)[:, -1]


def unwrap(model: torch.nn.Module) -> SeqRecModel:
    """The bare model under a DDP wrapper (DDP keeps the SeqRecModel methods on ``.module``)."""
    # torch types a wrapper's ``.module`` as a plain nn.Module; what is wrapped here is always a SeqRecModel
    return cast(SeqRecModel, getattr(model, "module", model))


def model_device(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` for the block, then back to the mode it was in (train or eval)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
