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
    mask = torch.cat([torch.zeros_like(false_neg[:, :1]), false_neg], dim=1)
    logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target, reduction=reduction)
    with torch.no_grad():
        rank = (logits[:, 1:] > logits[:, :1]).sum(1)  # negatives beating the positive
        stats = {"scale": float(scale), "negatives": float((~false_neg).sum(1).float().mean()) if len(pred) else 0.0}
        for k in TOPK:
            stats[f"top{k}_acc"] = float((rank < k).float().mean()) if len(pred) else 0.0
    return loss, stats
