"""Full-ranking offline evaluation (Recall@K / NDCG@K over every item).

One path for every model (HLLM, SASRec, popularity) through the
:class:`~hllm.models.base.SeqRecModel` interface:

1. Item embeddings are computed once per evaluation (``eval.item_batch`` items
   per forward), sharded across ranks under torchrun and all-gathered, and
   cached for a saved checkpoint (``<runs_dir>/.item_emb_cache/<key>.npy``,
   keyed by the weights, the item table and the item-text settings; never
   inside the checkpoint, which may be read-only or a DVC stage output).
2. User embeddings come from ``model.user_embeddings`` on the last
   ``protocol.max_history`` items before the target.
3. Scoring is chunked over users (``eval.user_chunk``) and items
   (``eval.item_chunk``): memory is bounded by ``user_chunk x item_chunk``
   scores, never by the catalogue. Per chunk we keep a running top-K and
   count, exactly, the candidates scoring at or above the target (the rank is
   not limited to the top-K list).

The rules (pessimistic ties, masked targets are misses) live in
:mod:`hllm.evaluation.metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hllm.config import Config, ConfigError, ProtocolConfig, SplitProtocol, check_cutoffs, protocol_hash, stable_hash
from hllm.data.dataset import PAD, BuiltData, Sequences, eval_split
from hllm.distributed import rank_world
from hllm.evaluation import metrics as M
from hllm.evaluation import slices as S
from hllm.evaluation.item_cache import cached_item_embeddings, item_embedding_table
from hllm.evaluation.ranking import rank_items
from hllm.evaluation.results import EvalResult
from hllm.models.base import unwrap

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- results


# --------------------------------------------------------------------------- chunked ranking


# --------------------------------------------------------------------------- distributed helpers


# --------------------------------------------------------------------------- item embeddings


# --------------------------------------------------------------------------- evaluation


def check_protocol(p: ProtocolConfig) -> None:
    """Raises :class:`ConfigError` (a ``ValueError``) naming the first bad ``eval.protocol`` field."""
    if p.split not in typing.get_args(SplitProtocol):
        raise ConfigError(f"eval.protocol.split: expected one of {typing.get_args(SplitProtocol)}, got {p.split!r}")
    check_cutoffs(p.valid_cutoff, p.test_cutoff, p.cutoff_unit)  # also checked on load; a hand-edited object here
    if p.candidates != "all":
        raise ConfigError(f"eval.protocol.candidates: only 'all' (full ranking) is implemented, got {p.candidates!r}")
    if not p.ks or any(k <= 0 for k in p.ks):
        raise ConfigError(f"eval.protocol.ks must be positive integers, got {p.ks}")
    name, _, kk = p.select_metric.partition("@")
    if name not in ("recall", "ndcg") or not kk.isdigit() or int(kk) not in p.ks:
        raise ConfigError(
            f"eval.protocol.select_metric {p.select_metric!r} must be recall@K or ndcg@K with K in ks {p.ks}"
        )
    if p.max_history < 1:
        raise ConfigError(f"eval.protocol.max_history must be >= 1, got {p.max_history}")


def user_embedding_fn(model, item_table: torch.Tensor, history: np.ndarray) -> Callable[[int, int], torch.Tensor]:
    """``fn(lo, hi)``: user embeddings of ``history[lo:hi]`` (left-padded item idx)."""
    m = unwrap(model)

    def fn(lo: int, hi: int) -> torch.Tensor:
        h = torch.from_numpy(np.ascontiguousarray(history[lo:hi], dtype=np.int64)).to(item_table.device)
        out = m.user_embeddings(item_table[h], h != PAD).float()
        return torch.nn.functional.normalize(out, dim=-1) if m.normalize else out

    return fn


def _holdout(stats: dict) -> dict | None:
    """The build's held-out items (``build.holdout_items``), as they enter the protocol; None when off."""
    h = stats.get("holdout") if stats else None
    return {"holdout_items": h["share"], "holdout_seed": h["seed"]} if h else None


def evaluated_protocol(p: ProtocolConfig, stats: dict) -> dict:
    """The protocol block a result records: ``eval.protocol`` plus the build's held-out items when on."""
    h = _holdout(stats)
    return {**dataclasses.asdict(p), **(h or {})}


def evaluated_protocol_hash(p: ProtocolConfig, stats: dict) -> str:
    """``protocol_hash(p)``, and with held-out items (a build setting that changes which targets exist and
    what training saw) a hash of it with the share and seed, so such results are never compared with
    leave-one-out ones; without holdout the leave-one-out hash is unchanged."""
    h = _holdout(stats)
    return protocol_hash(p) if h is None else stable_hash({"protocol": protocol_hash(p), **h})


def evaluate(
    model,
    built: BuiltData,
    cfg: Config,
    split: str = "valid",
    *,
    item_table: torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Full-ranking evaluation of ``model`` on the ``valid`` or ``test`` split.

    Under torchrun (an initialised process group with > 1 rank) every rank must
    call this; item encoding and users are sharded, and every rank returns the
    full result. ``item_table`` reuses embeddings already computed (e.g. for
    valid then test); ``checkpoint_dir`` enables the on-disk cache.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    p = cfg.eval.protocol
    check_protocol(p)
    t0 = time.perf_counter()
    plan = built.split_plan(p)
    es = eval_split(built.sequences, split, p.max_history, plan)
    if len(es.users) == 0:
        raise ValueError(f"{built.dir}: no user has enough items for a {split} target ({plan.info})")
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        with torch.inference_mode():
            if item_table is None:
                if checkpoint_dir is not None:
                    item_table = cached_item_embeddings(model, built, cfg, checkpoint_dir, progress)
                else:
                    item_table = item_embedding_table(model, built.n_items, cfg.eval.item_batch, progress)
            if item_table.shape[0] != built.n_items:
                raise ValueError(f"item table has {item_table.shape[0]} rows, dataset has {built.n_items} item slots")
            items = torch.nn.functional.normalize(item_table, dim=-1) if m.normalize else item_table
            counts = S.item_train_counts(built.sequences, built.n_items, plan)
            # an ID model's rows of items that never occurred in training are untrained: no candidates, misses
            unseen = None if m.scores_unseen_items else (counts == 0)
            users, ranks = _rank_split(model, item_table, items, es, cfg, progress, unseen)
    finally:
        m.train(was_training)
    per_user = M.per_user_metrics(ranks, p.ks)
    per_user["rank"] = ranks
    if not np.array_equal(users, es.users):
        raise RuntimeError("evaluation users came back in another order than the split's")  # never: both sorted
    sc = cfg.eval.slices
    masks = S.slice_masks(es.targets, es.full_history.lengths, counts, head_share=sc.head_share,
                          short_history=sc.short_history)  # fmt: skip
    res = EvalResult(
        split=split,
        metrics=M.mean_metrics(per_user),
        per_user=per_user,
        users=users,
        protocol_hash=evaluated_protocol_hash(p, built.stats),
        n_users=len(users),
        protocol=evaluated_protocol(p, built.stats),
        n_items=built.n_items,
        n_masked_targets=int((ranks == M.MASKED).sum()),
        seconds=time.perf_counter() - t0,
        checkpoint=str(checkpoint_dir) if checkpoint_dir is not None else None,
        slices=S.slice_metrics(per_user, masks),
        split_info=plan.info,
    )
    log.info("%s: %s (%d users, %.1fs)", split, _fmt(res.metrics), res.n_users, res.seconds)
    return res


def _rank_split(
    model,
    item_table: torch.Tensor,
    items: torch.Tensor,
    es,
    cfg: Config,
    progress: bool,
    not_candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks for the users of one split; sharded by contiguous user blocks under torchrun.

    ``item_table`` (raw) feeds the user model, as in training; ``items``
    (normalised when the model scores by cosine) are the candidates."""
    p = cfg.eval.protocol
    rank, world = rank_world()
    n = len(es.users)
    per = -(-n // world)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    sel = np.arange(lo, hi)
    # every rank runs the same number of user forwards (FSDP): pad with user 0, drop after
    pad = per - len(sel)
    sel_p = np.concatenate([sel, np.zeros(pad, dtype=np.int64)]) if pad else sel
    full = es.full_history
    excl = None
    if p.mask_history:
        lengths = full.lengths[sel_p]
        offs = np.zeros(len(sel_p) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offs[1:])
        from hllm.data.dataset import _ranges

        excl = Sequences(offs, full.items[_ranges(full.offsets[sel_p], lengths)])
    history = es.history[sel_p]  # one copy: the user model's input, and the items its repeat score covers
    r = rank_items(
        user_embedding_fn(model, item_table, history),
        items,
        len(sel_p),
        targets=es.targets[sel_p],
        exclude=excl,
        not_candidates=not_candidates,
        seen=history,
        seen_bonus=unwrap(model).seen_bonus(),
        user_chunk=cfg.eval.user_chunk,
        item_chunk=cfg.eval.item_chunk,
        progress=progress and rank == 0,
        desc="rank users",
    )
    assert r.ranks is not None  # targets were given
    mine = r.ranks[: len(sel)]
    if world == 1:
        return es.users.astype(np.int32), mine
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (es.users[sel].astype(np.int32), mine))
    users = np.concatenate([u for u, _ in parts])
    ranks = np.concatenate([x for _, x in parts])
    order = np.argsort(users, kind="stable")
    return users[order], ranks[order]


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.2f}%" for k, v in metrics.items())


# --------------------------------------------------------------------------- saved checkpoints


def default_checkpoint(cfg: Config) -> Path:
    """``runs/<run_name>/best`` when it exists, else the run's newest step checkpoint."""
    from hllm.models.loading import latest_checkpoint

    run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
    if (run_dir / "best" / "model.safetensors").exists():
        return run_dir / "best"
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}; train first (`hllm train`) or pass --checkpoint")
    return latest


def check_same_training_part(trained: ProtocolConfig, now: ProtocolConfig, ckpt_dir: str | Path) -> None:
    """Refuse to score a checkpoint under a split whose training part differs from the one it trained on:
    a model trained leave-one-out has seen interactions after a temporal cutoff (and one trained on a
    temporal split has not seen a leave-one-out training part), so its numbers would mean nothing."""

    def part(p: ProtocolConfig) -> tuple:
        return (p.split,) if p.split == "leave_one_out" else (p.split, p.valid_cutoff, p.cutoff_unit)

    if part(trained) != part(now):
        raise ConfigError(
            f"{ckpt_dir}: trained with eval.protocol.split={trained.split}"
            + (f" (valid_cutoff={trained.valid_cutoff} {trained.cutoff_unit})" if trained.split == "temporal" else "")
            + f", evaluated with split={now.split}"
            + (f" (valid_cutoff={now.valid_cutoff} {now.cutoff_unit})" if now.split == "temporal" else "")
            + ": the training parts differ (the model may have trained on the targets); retrain under this split"
        )


def load_for_eval(ckpt_dir: str | Path, cfg: Config | None = None, built_dir: str | Path | None = None):
    """``load_model`` with the *current* ``eval``/``export`` sections (and paths
    for outputs) applied: every model is evaluated under today's protocol, not
    the one it was trained with. Returns ``(model, cfg, built)``."""
    from hllm.distributed import single_device
    from hllm.models.loading import load_model

    model, ckpt_cfg, built = load_model(ckpt_dir, built_dir=built_dir)
    if cfg is not None:
        check_same_training_part(ckpt_cfg.eval.protocol, cfg.eval.protocol, ckpt_dir)
        ckpt_cfg.eval = cfg.eval
        ckpt_cfg.export = cfg.export
        ckpt_cfg.paths.reports_dir = cfg.paths.reports_dir
        ckpt_cfg.paths.export_dir = cfg.paths.export_dir
    # everything downstream places its tensors with model_device(model)
    model.to(single_device(ckpt_cfg.eval.device))
    return model, ckpt_cfg, built


def evaluate_checkpoint(
    ckpt_dir: str | Path,
    cfg: Config | None = None,
    splits: tuple[str, ...] = ("test",),
    built_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Evaluate a saved checkpoint on one or more splits, encoding the items once
    (and caching them in the checkpoint folder)."""
    model, ecfg, built = load_for_eval(ckpt_dir, cfg, built_dir)
    with torch.inference_mode():
        table = cached_item_embeddings(model, built, ecfg, ckpt_dir, progress)
    return {
        s: evaluate(model, built, ecfg, s, item_table=table, checkpoint_dir=ckpt_dir, progress=progress) for s in splits
    }
