"""InfoNCE over a shared negative pool, as in the HLLM paper (section 2.1 of the brief).

Reusable by every model of the family (HLLM, SASRec): the caller supplies the
predictions, their positives and one pool of negatives shared by all rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TOPK = (1, 5, 10)


class LogitScale(nn.Module):
    """Learnable similarity scale, stored as its log (CLIP/HLLM style).

    Initialised to ``init`` (1/0.07 in the paper). :meth:`clamp_` keeps the
    scale within [1, ``max_scale``]; the trainer calls it after every optimizer
    step for every ``LogitScale`` in the model.
    """

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        if not 1.0 <= init <= max_scale:
            raise ValueError(f"scale init {init} must lie in [1, {max_scale}]")
        self.max_log = math.log(max_scale)
        self.log_scale = nn.Parameter(torch.tensor([math.log(init)]), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().reshape(())

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, self.max_log)


class RepeatScore(nn.Module):
    """A learned score for items the user already has in the history the model reads (RepeatNet's repeat mode, as
    one scalar): added to the logit of every candidate that occurred earlier in the row, in training, evaluation
    and serving alike. It learns the data's repeat habit: negative where users never consume an item twice
    (MovieLens ratings), positive where they come back to the same items. Zero at init: off until trained."""

    # the parameter is value / GAIN: Adam moves a parameter by about lr per step, and the logits it competes
    # with span +-scale (14 at init); at lr 1e-3 a plain scalar would need thousands of steps to matter
    GAIN = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(()))

    @property
    def value(self) -> torch.Tensor:
        return self.raw * self.GAIN

    @staticmethod
    def seen(
        windows: torch.Tensor, tmask: torch.Tensor, pool_ids: torch.Tensor, n_items: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the training targets ``tmask`` [B, W-1] of left-padded ``windows`` [B, W]: whether each target
        (bool [N]) and each pool item ``pool_ids`` [K] (bool [N, K]) occurred at or before the target's input
        position, i.e. in the history the prediction read. Memory [B, n_items] + [N, K], like the logits."""
        B, W = windows.shape
        inputs = windows[:, :-1]
        big = W  # "never": later than every position
        first = torch.full((B, n_items), big, dtype=torch.long, device=windows.device)
        pos = torch.arange(W - 1, device=windows.device).expand(B, -1)
        first.scatter_reduce_(1, inputs, pos, reduce="amin")
        first[:, 0] = big  # padding is nobody's history
        b_n, t_n = tmask.nonzero(as_tuple=True)
        pos_seen = first[b_n, windows[:, 1:][tmask]] <= t_n
        neg_seen = first[:, pool_ids.reshape(-1)][b_n] <= t_n[:, None]
        return pos_seen, neg_seen


def target_mask(windows: torch.Tensor) -> torch.Tensor:
    """bool [B, W-1]: positions whose input and next-item target are both real items.

    Windows are left-padded with 0, so every such position is a training target
    (the paper trains on every valid position, not only the last)."""
    return (windows[:, :-1] != 0) & (windows[:, 1:] != 0)


def infonce(
    pred: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    scale: torch.Tensor,
    threshold: float = 0.99,
    reduction: str = "mean",
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_valid: torch.Tensor | None = None,
    repeat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cosine InfoNCE with the positive in column 0 and a shared negative pool.

    pred, pos: [N, d] (row i predicts pos[i]); neg: [K, d]; scale: scalar tensor.
    Negatives whose cosine to row i's positive exceeds ``threshold`` are removed
    from row i (their logit set to the dtype's most negative value): this drops
    accidental copies of the positive, including items with identical text.

    With ``pos_ids`` [N] and ``neg_ids`` [K] (item idx), a negative that is the
    row's own target item is removed too, whatever its cosine: negatives read
    from a stale item table (a memory bank) are older copies of the positive.

    ``neg_valid`` [K] (bool) removes the negatives marked False from every row: items that did not exist
    at training time (never seen in the training part) are nobody's negative.

    ``repeat`` = (value, pos_seen [N], neg_seen [N, K]) adds the learned ``value`` to the logits of the
    positive and the negatives that occurred in the row's history (:class:`RepeatScore`).

    Returns the loss (mean or sum over rows) and float stats: the scale, the
    mean number of surviving negatives per row and the in-batch top-k accuracy
    of the positive.
    """
    if pred.shape != pos.shape or pred.ndim != 2 or neg.ndim != 2 or neg.shape[1] != pred.shape[1]:
        raise ValueError(f"infonce: shapes pred {tuple(pred.shape)}, pos {tuple(pos.shape)}, neg {tuple(neg.shape)}")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(pos.float(), dim=-1)
    n = F.normalize(neg.float(), dim=-1)
    pos_logit = (p * t).sum(-1, keepdim=True)
    neg_logit = p @ n.T
    with torch.no_grad():
        false_neg = (t @ n.T) > threshold
        if pos_ids is not None and neg_ids is not None:
            false_neg |= pos_ids.reshape(-1, 1) == neg_ids.reshape(1, -1)
        if neg_valid is not None:
            false_neg |= ~neg_valid.reshape(1, -1).to(false_neg.device)
    # Scale first, mask after: a masked entry then carries no gradient to the
    # scale (masking before scaling would make d/d scale = 0 * -inf = nan).
    logits = torch.cat([pos_logit, neg_logit], dim=1) * scale.float()
    if repeat is not None:
        value, pos_seen, neg_seen = repeat
        logits = logits + value.float() * torch.cat([pos_seen[:, None], neg_seen], dim=1).to(logits.dtype)
    mask = torch.cat([torch.zeros_like(false_neg[:, :1]), false_neg], dim=1)
    logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target, reduction=reduction)
    with torch.no_grad():
        rank = (logits[:, 1:] > logits[:, :1]).sum(1)  # negatives beating the positive
        stats = {"scale": float(scale), "negatives": float((~false_neg).sum(1).float().mean()) if len(pred) else 0.0}
        for k in TOPK:
            stats[f"top{k}_acc"] = float((rank < k).float().mean()) if len(pred) else 0.0
        if repeat is not None:
            stats["repeat"] = float(repeat[0].detach())
    return loss, stats
