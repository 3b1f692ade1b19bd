"""Slices of an evaluation: where a model wins or loses, beside its overall Recall@K / NDCG@K.

Each test (or validation) user falls into slices by its target item and by its history:

- ``new_items``: the target never occurred in the training part of any sequence: a cold-start item
  (under the temporal split: an item whose first interaction came after the validation cutoff).
  Text-based item towers (HLLM) embed it from its text; an ID model cannot score it at all, so for
  ID models these targets are misses and these items are no candidates (``evaluate`` makes sure),
  never a lucky rank from an untrained embedding row.
- ``head_items`` / ``tail_items``: seen targets among the most popular ``eval.slices.head_share`` of
  the seen catalogue by training interactions, and the rest.
- ``short_history`` / ``long_history``: users with at most ``eval.slices.short_history`` items before
  the target, and the others.

A slice's metrics are the means of the per-user metrics over its users (``n`` of them); an empty
slice is reported with ``n = 0`` and no metrics. Pure functions of arrays: tested on hand-made data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hllm.data.dataset import Sequences, SplitPlan, train_sequences

SLICES = ("new_items", "head_items", "tail_items", "short_history", "long_history")


def item_train_counts(sequences: Sequences, n_items: int, plan: SplitPlan | None = None) -> np.ndarray:
    """Interactions per item idx in the training part of every sequence: ``plan``'s (the temporal split's
    interactions up to the validation cutoff), by default leave-one-out's (all but the last two)."""
    train = train_sequences(sequences, plan)
    return np.bincount(train.items.astype(np.int64), minlength=n_items)[:n_items]


def head_items(counts: np.ndarray, head_share: float) -> np.ndarray:
    """Bool mask over item idx: the most popular ``head_share`` of the items seen in training
    (at least one), ties at the cut included."""
    seen = np.nonzero(counts[1:] > 0)[0] + 1
    mask = np.zeros(len(counts), dtype=bool)
    if len(seen) == 0 or head_share <= 0:
        return mask
    n_head = max(1, int(round(head_share * len(seen))))
    cut = np.sort(counts[seen])[::-1][n_head - 1]
    mask[seen[counts[seen] >= cut]] = True
    return mask


def slice_masks(targets: np.ndarray, history_lengths: np.ndarray, counts: np.ndarray, *, head_share: float,
                short_history: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-user bool masks, one per slice (see the module docstring)."""
    targets = np.asarray(targets, dtype=np.int64)
    new = counts[targets] == 0
    head = head_items(counts, head_share)[targets] & ~new
    short = np.asarray(history_lengths) <= short_history
    return {"new_items": new, "head_items": head, "tail_items": ~new & ~head, "short_history": short,
            "long_history": ~short}  # fmt: skip


def slice_metrics(per_user: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{slice: {"n": users, metric: mean over them}}`` for every metric except the raw ``rank``."""
    out: dict[str, dict[str, float]] = {}
    for name, mask in masks.items():
        n = int(mask.sum())
        row: dict[str, float] = {"n": float(n)}
        if n:
            row.update({k: float(np.asarray(v)[mask].mean()) for k, v in per_user.items() if k != "rank"})
        out[name] = row
    return out
