"""Popularity baseline: every user gets the items most often seen in training.

It implements :class:`SeqRecModel` so that it goes through the same training
(nothing to optimise: the train loop only saves a checkpoint), evaluation and
export paths as HLLM. Scores are raw training interaction counts
(``normalize = False``): the item "embedding" is its count, the user
"embedding" the constant 1, so ``user . item = count``. Counts come only from
the training part of each sequence (``eval.protocol.split``), so validation and test
targets never leak into the scores. Many items share a count; the evaluator's
pessimistic tie rule ranks a target after every item with the same count.
"""

from __future__ import annotations

import numpy as np
import torch

from hllm.data.dataset import PAD, BuiltData, train_sequences
from hllm.models.base import LossOutput, SeqRecModel


class Popularity(SeqRecModel):
    normalize = False
    cache_item_embeddings = False  # a table lookup: recomputing is cheaper than a disk cache
    # an item never seen in training has count 0, its true popularity: a real (lowest) score that ties
    # with the other unseen items and ranks pessimistically among them, not an untrained row
    scores_unseen_items = True
    counts: torch.Tensor  # registered buffer

    def __init__(self, counts: np.ndarray | torch.Tensor):
        super().__init__()
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float32).clone()
        if counts.ndim != 1 or len(counts) < 2:
            raise ValueError(
                f"popularity counts must be a vector over item idx (incl. padding), got shape {tuple(counts.shape)}"
            )
        counts[PAD] = 0
        # a buffer, not a parameter: saved in model.safetensors, never optimised
        self.register_buffer("counts", counts)

    def train_loss(self, windows: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        raise RuntimeError("the popularity model has no trainable parameters; the train loop must skip optimisation")

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        return self.counts[idx].unsqueeze(-1)

    def user_embeddings(self, history_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.ones(history_emb.shape[0], 1, dtype=torch.float32, device=history_emb.device)


def train_counts(built: BuiltData, protocol=None) -> np.ndarray:
    """Interactions per item idx in the training part of every sequence, under the split of ``protocol``
    (an ``eval.protocol`` block; default leave-one-out)."""
    plan = built.split_plan(protocol) if protocol is not None else None
    return np.bincount(train_sequences(built.sequences, plan).items, minlength=built.n_items).astype(np.float32)


def build(cfg, built: BuiltData, tokens=None) -> Popularity:
    """Registered under ``model.kind = "pop"`` in :func:`hllm.models.build_model`."""
    return Popularity(train_counts(built, cfg.eval.protocol))
