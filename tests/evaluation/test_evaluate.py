"""Chunked full ranking and `evaluate()` on hand-built data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hllm.config import protocol_hash
from hllm.data.dataset import Sequences
from hllm.evaluation import metrics as M
from hllm.evaluation.evaluate import evaluate
from hllm.evaluation.item_cache import item_embedding_table
from hllm.evaluation.ranking import rank_items
from hllm.evaluation.results import EvalResult
from tests.helpers.evalkit import TableModel, make_built, random_dataset, small_cfg

# item idx:        0 pad   1       2       3       4       5       6 (= item 1)
TABLE = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [1, 0]], dtype=np.float32)
SEQS = [
    [1, 2, 4, 3],  # valid: hist [1,2] target 4; test: hist [1,2,4] target 3
    [5, 2, 2],  # valid: hist [5] target 2; test: hist [5,2] target 2 (target in history)
    [6, 3],  # test only: hist [6] target 3
]


def test_hand_computed_valid_and_test(tmp_path):
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = small_cfg(ks=(1, 2, 5))
    model = TableModel(TABLE)  # user = last history item, raw dot product

    v = evaluate(model, built, cfg, "valid", progress=False)
    # u0: user (0,1); candidates 3:1 4:0 5:2 6:0 -> target 4 (0) behind 3, 5 and tied 6 -> rank 3
    # u1: user (0,2); candidates 1:0 2:2 3:2 4:0 6:0 -> target 2 (2) tied with 3 -> rank 1
    assert v.users.tolist() == [0, 1]
    assert v.per_user["rank"].tolist() == [3, 1]
    assert v.metrics["recall@1"] == 0.0
    assert v.metrics["recall@2"] == 0.5
    assert v.metrics["ndcg@5"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(3)) / 2)

    t = evaluate(model, built, cfg, "test", progress=False)
    # u0: user (2,0); candidates 3:2 5:0 6:2 -> target 3 tied with 6 -> rank 1
    # u1: target 2 is in the history -> masked -> miss
    # u2: user (1,0); candidates 1:1 2:0 3:1 4:2 5:0 -> target 3 behind 4, tied with 1 -> rank 2
    assert t.users.tolist() == [0, 1, 2]
    assert t.per_user["rank"].tolist() == [1, M.MASKED, 2]
    assert t.n_masked_targets == 1
    assert t.metrics["recall@2"] == pytest.approx(1 / 3)
    assert t.metrics["recall@5"] == pytest.approx(2 / 3)
    assert t.protocol_hash == protocol_hash(cfg.eval.protocol)


def test_no_masking_option(tmp_path):
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = small_cfg(ks=(1, 2, 5))
    cfg.eval.protocol.mask_history = False
    t = evaluate(TableModel(TABLE), built, cfg, "test", progress=False)
    # u0: user (2,0); all items 1:2 2:0 3:2 4:4 5:0 6:2 -> target 3 behind 4, tied with 1 and 6 -> rank 3
    # u1: user (0,1); 1:0 2:1 3:1 4:0 5:2 6:0 -> target 2 behind 5, tied with 3 -> rank 2
    # u2: user (1,0); 1:1 2:0 3:1 4:2 5:0 6:1 -> target 3 behind 4, tied with 1 and 6 -> rank 3
    assert t.per_user["rank"].tolist() == [3, 2, 3]
    assert t.protocol_hash != protocol_hash(small_cfg(ks=(1, 2, 5)).eval.protocol)


def _dense_reference(built, model, cfg, split):
    """Plain numpy full-matrix ranks, the reference for the chunked path."""
    from hllm.data.dataset import eval_split

    es = eval_split(built.sequences, split, cfg.eval.protocol.max_history)
    table = model.table.detach().numpy().astype(np.float64)
    hist = table[es.history]
    mask = (es.history != 0)[..., None]
    u = (hist * mask).sum(1)
    items = table
    if model.normalize:
        u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        items = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    scores = u @ items.T
    exclude = np.zeros_like(scores, dtype=bool)
    exclude[:, 0] = True
    if cfg.eval.protocol.mask_history:
        for r in range(len(es.users)):
            exclude[r, es.full_history.of(r)] = True
    # float64 reference; tol only absorbs float64 rounding of exact ties
    return M.target_ranks(scores, es.targets, exclude, tol=1e-9)


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunks", [(1, 1), (3, 7), (256, 65536)])
def test_chunked_equals_dense(tmp_path, mask, normalize, chunks):
    built = random_dataset(tmp_path / "b", n_users=30, n_items=50, seed=1)
    rng = np.random.default_rng(2)
    # coarse values -> many exact ties, which must follow the same pessimistic rule
    table = rng.integers(-2, 3, size=(50, 4)).astype(np.float32)
    table[0] = 0
    model = TableModel(table, normalize=normalize, mode="sum")
    cfg = small_cfg(ks=(1, 5, 20), user_chunk=chunks[0], item_chunk=chunks[1])
    cfg.eval.protocol.mask_history = mask
    cfg.eval.protocol.max_history = 4
    for split in ("valid", "test"):
        res = evaluate(model, built, cfg, split, progress=False)
        ref = _dense_reference(built, model, cfg, split)
        assert res.per_user["rank"].tolist() == ref.tolist()


def _assert_matches_dense(r, scores, targets, ex, k, rtol):
    """Ranks, top-k items and scores of ``r`` equal the dense reference over ``scores`` with ``ex`` excluded."""
    assert r.ranks.tolist() == M.target_ranks(scores, targets, ex).tolist()
    masked = np.where(ex, -np.inf, scores)
    ref = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    assert r.topk_idx.tolist() == ref.tolist()
    np.testing.assert_allclose(r.topk_scores, np.take_along_axis(masked, ref, 1), rtol=rtol)


def test_rank_items_topk_matches_dense():
    rng = np.random.default_rng(0)
    u = torch.randn(9, 5)
    items = torch.randn(40, 5)
    excl = Sequences.from_lists([rng.choice(np.arange(1, 40), 3, replace=False).tolist() for _ in range(9)])
    targets = rng.integers(1, 40, size=9)
    r = rank_items(u, items, targets=targets, exclude=excl, k=6, user_chunk=4, item_chunk=7)
    scores = (u @ items.T).numpy()
    ex = np.zeros_like(scores, dtype=bool)
    ex[:, 0] = True
    for i in range(9):
        ex[i, excl.of(i)] = True
    _assert_matches_dense(r, scores, targets, ex, k=6, rtol=1e-6)


@pytest.mark.parametrize("bonus", [-0.7, 0.9])
def test_rank_items_seen_bonus_matches_dense(bonus):
    """The learned repeat score: every item of the history the model read (left-padded, repeats counted once)
    gets the bonus, the target too when it is one of them; exclusions stay excluded."""
    rng = np.random.default_rng(1)
    u = torch.randn(9, 5)
    items = torch.randn(40, 5)
    seen = np.zeros((9, 6), dtype=np.int64)
    for i in range(9):
        n = rng.integers(1, 7)
        seen[i, 6 - n :] = rng.integers(1, 40, size=n)  # with repeats, some rows short
    targets = np.where(rng.random(9) < 0.5, seen[:, -1], rng.integers(1, 40, size=9))  # half the targets were read
    excl = Sequences.from_lists([[int(seen[i, -2])] if seen[i, -2] and i % 3 == 0 else [] for i in range(9)])
    r = rank_items(u, items, targets=targets, exclude=excl, seen=seen, seen_bonus=bonus, k=6, user_chunk=4,
                   item_chunk=7)  # fmt: skip
    scores = (u @ items.T).numpy()
    ex = np.zeros_like(scores, dtype=bool)
    ex[:, 0] = True
    for i in range(9):
        read = np.unique(seen[i][seen[i] > 0])
        scores[i, read] += np.float32(bonus)
        ex[i, excl.of(i)] = True
    _assert_matches_dense(r, scores, targets, ex, k=6, rtol=1e-5)
    plain = rank_items(u, items, targets=targets, exclude=excl, seen=seen, seen_bonus=0.0)
    assert plain.ranks.tolist() != r.ranks.tolist()  # the bonus moved some target
    with pytest.raises(ValueError, match="seen_bonus needs"):
        rank_items(u, items, targets=targets, seen_bonus=bonus)


def test_topk_larger_than_candidates_pads_with_minus_one():
    u = torch.ones(1, 2)
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    r = rank_items(u, items, exclude=Sequences.from_lists([[3]]), k=4, item_chunk=2)
    assert r.topk_idx.tolist() == [[2, 1, -1, -1]]


def test_non_finite_user_embeddings_are_an_error():
    with pytest.raises(ValueError, match="non-finite"):
        rank_items(torch.tensor([[float("nan"), 0.0]]), torch.ones(3, 2), k=1)


def test_item_table_and_reuse(tmp_path):
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    model = TableModel(TABLE)
    table = item_embedding_table(model, 7, batch=2, progress=False)
    assert model.item_calls == 6  # items 1..6, padding never encoded
    assert table[0].abs().sum() == 0
    np.testing.assert_array_equal(table[1:].numpy(), TABLE[1:])
    cfg = small_cfg(ks=(1, 2, 5))
    evaluate(model, built, cfg, "valid", item_table=table, progress=False)
    evaluate(model, built, cfg, "test", item_table=table, progress=False)
    assert model.item_calls == 6  # both splits reused the table


def test_results_round_trip_and_refuse_cross_protocol_comparison(tmp_path):
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = small_cfg(ks=(1, 2, 5))
    res = evaluate(TableModel(TABLE), built, cfg, "test", progress=False)
    res.save(tmp_path / "out")
    back = EvalResult.load(tmp_path / "out")
    assert back.metrics == res.metrics and back.protocol_hash == res.protocol_hash
    assert back.users.tolist() == [0, 1, 2]
    assert back.per_user["ndcg@5"].tolist() == res.per_user["ndcg@5"].tolist()
    assert back.diff(res) == {k: 0.0 for k in res.metrics}
    cfg2 = small_cfg(ks=(1, 2, 5))
    cfg2.eval.protocol.mask_history = False
    other = evaluate(TableModel(TABLE), built, cfg2, "test", progress=False)
    with pytest.raises(M.ProtocolMismatchError):
        res.diff(other)


def test_bad_protocol_is_rejected(tmp_path):
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = small_cfg(ks=(1, 2, 5))
    cfg.eval.protocol.select_metric = "ndcg@200"
    with pytest.raises(ValueError, match="select_metric"):
        evaluate(TableModel(TABLE), built, cfg, "valid", progress=False)
    cfg = small_cfg(ks=(1, 2, 5))
    cfg.eval.protocol.candidates = "sampled"
    with pytest.raises(ValueError, match="candidates"):
        evaluate(TableModel(TABLE), built, cfg, "valid", progress=False)
