"""Item token batches for the Item LLM: padded or packed (varlen) layouts, length buckets."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from hllm.data.dataset import TokenCache

log = logging.getLogger(__name__)


@dataclass
class ItemBatch:
    """Item-LLM inputs for a set of items, padded [n, T] or packed [1, T].

    ``slot``: flat index (into the [n*T] or [T] token axis) of each item's
    [ITEM] slot, or of its last text token when no slot is appended.
    ``text_mask``: True on text tokens (for mean pooling).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # padded: [n, T] (1 = real token incl. [ITEM]); packed: None
    position_ids: torch.Tensor | None  # packed: [1, T], restarting at 0 per item
    item_slot: torch.Tensor  # bool, same shape as input_ids: the [ITEM] positions
    text_mask: torch.Tensor  # bool, same shape as input_ids
    seq_id: torch.Tensor | None  # packed: [T] item number of each token
    lengths: torch.Tensor  # [n] text tokens per item (without [ITEM])
    n_tokens: int  # real tokens (text + [ITEM])
    n_padded: int  # tokens actually run through the model (incl. padding)


def _gather_tokens(tokens: TokenCache, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = tokens.offsets[idx]
    lengths = tokens.offsets[idx + 1] - starts
    total = int(lengths.sum())
    rep = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    flat = tokens.ids[np.arange(total, dtype=np.int64) + rep] if total else np.zeros(0, dtype=np.int32)
    return flat, lengths


def padded_batch(tokens: TokenCache, idx: np.ndarray, pad_id: int, item_slot: bool) -> ItemBatch:
    """Right-padded [n, T]: item i's text, then (optionally) its [ITEM] slot, then padding.

    Right padding keeps each item's positions 0..len, so an item's embedding is
    the same whatever else shares its batch (tested against item-by-item)."""
    flat, lengths = _gather_tokens(tokens, idx)
    n = len(idx)
    extra = 1 if item_slot else 0
    width = int(lengths.max(initial=0)) + extra
    width = max(width, 1)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    cols = np.arange(width)[None, :]
    text = cols < lengths[:, None]
    ids[text] = flat
    slot = (cols == lengths[:, None]) if item_slot else np.zeros_like(text)
    att = text | slot
    if not item_slot:
        att[lengths == 0, 0] = True  # an empty text still needs one attended position
    return ItemBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(att.astype(np.int64)),
        position_ids=None,
        item_slot=torch.from_numpy(slot),
        text_mask=torch.from_numpy(text),
        seq_id=None,
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        n_tokens=int(att.sum()),
        n_padded=n * width,
    )


def packed_batch(tokens: TokenCache, idx: np.ndarray, pad_id: int, item_slot: bool) -> ItemBatch:
    """All items concatenated into one row [1, T] with no padding; positions
    restart at 0 per item (what varlen/flash attention kernels consume)."""
    flat, lengths = _gather_tokens(tokens, idx)
    extra = 1 if item_slot else 0
    seg = np.maximum(lengths + extra, 1)
    total = int(seg.sum())
    starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
    seq_id = np.repeat(np.arange(len(idx)), seg)
    pos = np.arange(total) - np.repeat(starts, seg)
    text = pos < np.repeat(lengths, seg)
    ids = np.full(total, pad_id, dtype=np.int64)
    ids[text] = flat
    slot = (pos == np.repeat(lengths, seg)) if item_slot else np.zeros(total, dtype=bool)
    return ItemBatch(
        input_ids=torch.from_numpy(ids)[None],
        attention_mask=None,
        position_ids=torch.from_numpy(pos.astype(np.int64))[None],
        item_slot=torch.from_numpy(slot)[None],
        text_mask=torch.from_numpy(text)[None],
        seq_id=torch.from_numpy(seq_id.astype(np.int64)),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        n_tokens=total,
        n_padded=total,
    )


def length_buckets(lengths: np.ndarray, max_tokens: int, extra: int = 1) -> list[np.ndarray]:
    """Split items (given their text lengths) into groups of similar length.

    Items are sorted by length and cut greedily so that each group's padded
    size (count x longest) stays within ``max_tokens`` (a group always holds at
    least one item). Returns positions into ``lengths``; sorting keeps padding
    waste small, the budget bounds activation memory per forward.
    """
    order = np.argsort(lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        end = start + 1
        while end < n and (end + 1 - start) * (int(lengths[order[end]]) + extra) <= max_tokens:
            end += 1
        groups.append(order[start:end])
        start = end
    return groups
