"""Ranking metrics as small pure functions over target ranks.

Protocol facts encoded here (see ``eval.protocol`` in ``params.yaml``):

- One ground-truth item per user, so Recall@K equals HR@K.
- ``rank`` is 0-based: the number of candidate items ranked before the target.
  NDCG@K = 1 / log2(rank + 2) when rank < K, else 0 (IDCG is 1). This is the
  paper's 1 / log2(rank + 1) for a 1-based rank.
- **Ties are pessimistic**: an item whose score equals the target's counts as
  ranked before it. A model that gives every item the same score therefore
  scores 0, not a lucky position decided by item order (the optimistic rule,
  or "first index wins", would reward constant scores). In float32 scoring
  "equal" means within rounding of the target's score (see
  :func:`hllm.evaluation.ranking.tie_tolerance`), so duplicate items (same text, same
  embedding) are ranked before the target however the matmul rounds them.
- **Masked targets are misses**: when the target is itself excluded (it is in
  the user's history and the protocol masks history), its rank is
  :data:`MASKED` and it counts as 0 for every K. The user stays in the
  denominator, as in the paper, where the target's score is set to -inf.
- Metrics are averaged over users and stored as fractions; human-facing
  tables show percentages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

MASKED = np.iinfo(np.int64).max  # rank of a target that was excluded from the candidates


class ProtocolMismatchError(ValueError):
    """Two results were produced under different evaluation protocols."""


def target_ranks(
    scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None, tol: float = 0.0
) -> np.ndarray:
    """Exact 0-based rank of each target in a dense score matrix (the reference
    implementation the chunked evaluator is tested against).

    scores float [n, N]; targets int [n] column indices; exclude bool [n, N]
    (True = not a candidate). Ties with the target (scores >= target - tol)
    count as ranked before it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    n = scores.shape[0]
    rows = np.arange(n)
    cand = np.ones_like(scores, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    t = scores[rows, targets]
    others = cand.copy()
    others[rows, targets] = False
    ranks = (others & (scores >= t[:, None] - tol)).sum(axis=1).astype(np.int64)
    ranks[~cand[rows, targets]] = MASKED
    return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@K (= HR@K with one target): 1.0 if the target is in the top K."""
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@K with a single relevant item: 1 / log2(rank + 2) if rank < K."""
    ranks = np.asarray(ranks, dtype=np.int64)
    hit = ranks < k
    out = np.zeros(len(ranks), dtype=np.float64)
    out[hit] = 1.0 / np.log2(ranks[hit].astype(np.float64) + 2.0)
    return out


def per_user_metrics(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, np.ndarray]:
    """``{"recall@K": [...], "ndcg@K": [...]}`` for every K, per user."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out


def mean_metrics(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Average each per-user metric over users (empty input is an error, not 0)."""
    out = {}
    for name, values in per_user.items():
        if name == "rank":
            continue
        if len(values) == 0:
            raise ValueError(f"no users to average {name} over")
        out[name] = float(np.mean(values))
    return out


def ranks_from_topk(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ranks recovered from top-K id lists (row i: ids best first, -1 = empty
    slot): the position of the target, or K when it is absent. Used to check
    that served recommendations reproduce the evaluator's numbers."""
    topk = np.asarray(topk)
    targets = np.asarray(targets)
    hit = topk == targets[:, None]
    pos = np.where(hit.any(axis=1), hit.argmax(axis=1), topk.shape[1])
    return pos.astype(np.int64)


def ensure_comparable(*hashes: str) -> str:
    """Raise unless all results were produced under the same protocol hash."""
    distinct = sorted(set(hashes))
    if len(distinct) != 1:
        raise ProtocolMismatchError(
            f"results come from different evaluation protocols {distinct}; "
            "re-evaluate them under one eval.protocol before comparing"
        )
    return distinct[0]


def format_table(
    rows: Mapping[str, Mapping[str, float]], ks: Iterable[int], names: tuple[str, ...] = ("recall", "ndcg")
) -> str:
    """A markdown table, one row per model/split, metrics as percentages."""
    ks = list(ks)
    cols = [f"{n}@{k}" for n in names for k in ks]
    short = {"recall": "R", "ndcg": "N"}
    header = (
        "| | " + " | ".join(f"{short.get(c.split('@')[0], c.split('@')[0])}@{c.split('@')[1]}" for c in cols) + " |"
    )
    lines = [header, "|---|" + "---:|" * len(cols)]
    for label, metrics in rows.items():
        cells = [f"{100 * metrics[c]:.2f}" if c in metrics else "-" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
