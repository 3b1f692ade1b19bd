"""Metric functions against hand-computed values on tiny matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hllm.evaluation import metrics as M


def test_ranks_hand_computed():
    scores = np.array(
        [
            [0.0, 0.9, 0.1, 0.5, 0.3],  # target 3 (0.5): only item 1 is higher -> rank 1
            [0.0, 0.2, 0.2, 0.2, 0.1],  # target 2 tied with items 1 and 3 -> pessimistic rank 2
            [0.0, 0.1, 0.2, 0.3, 0.4],  # target 4 is the best -> rank 0
        ]
    )
    ranks = M.target_ranks(scores, np.array([3, 2, 4]))
    # column 0 (score 0.0) is below every target, so it never counts
    assert ranks.tolist() == [1, 2, 0]


def test_ranks_with_exclusion_and_masked_target():
    scores = np.array(
        [
            [0.0, 0.9, 0.1, 0.5, 0.3],
            [0.0, 0.9, 0.1, 0.5, 0.3],
        ]
    )
    exclude = np.zeros_like(scores, dtype=bool)
    exclude[0, 1] = True  # the only better item is masked -> target 3 becomes rank 0
    exclude[1, 3] = True  # the target itself is masked -> miss
    ranks = M.target_ranks(scores, np.array([3, 3]), exclude)
    assert ranks[0] == 0
    assert ranks[1] == M.MASKED
    assert M.recall_at_k(ranks, 5).tolist() == [1.0, 0.0]
    assert M.ndcg_at_k(ranks, 5).tolist() == [1.0, 0.0]


def test_recall_and_ndcg_values():
    ranks = np.array([0, 1, 4, 9, 10, M.MASKED])
    assert M.recall_at_k(ranks, 10).tolist() == [1, 1, 1, 1, 0, 0]
    assert M.recall_at_k(ranks, 1).tolist() == [1, 0, 0, 0, 0, 0]
    nd = M.ndcg_at_k(ranks, 10)
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0.0, 0.0]
    np.testing.assert_allclose(nd, expected)
    means = M.mean_metrics(M.per_user_metrics(ranks, [1, 10]))
    assert means["recall@1"] == pytest.approx(1 / 6)
    assert means["recall@10"] == pytest.approx(4 / 6)
    assert means["ndcg@10"] == pytest.approx(sum(expected) / 6)
    assert M.ndcg_at_k(ranks, 5)[2] == pytest.approx(1 / math.log2(6))  # rank 4 < 5 counts


def test_constant_scores_score_zero():
    """The pessimistic tie rule: a model that cannot tell items apart gets no credit."""
    scores = np.ones((3, 50))
    ranks = M.target_ranks(scores, np.array([1, 20, 49]))
    assert ranks.tolist() == [49, 49, 49]
    assert M.recall_at_k(ranks, 10).sum() == 0


def test_ranks_from_topk():
    topk = np.array([[5, 3, 9], [1, 2, -1], [4, 4, 4]])
    assert M.ranks_from_topk(topk, np.array([3, 7, 4])).tolist() == [1, 3, 0]


def test_mean_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no users"):
        M.mean_metrics({"recall@10": np.zeros(0)})


def test_protocol_mismatch_raises():
    assert M.ensure_comparable("abc", "abc") == "abc"
    with pytest.raises(M.ProtocolMismatchError, match="different evaluation protocols"):
        M.ensure_comparable("abc", "abd")


def test_table_in_percent():
    t = M.format_table({"hllm": {"recall@10": 0.0512, "ndcg@10": 0.02}}, [10])
    assert "| hllm | 5.12 | 2.00 |" in t
    assert "R@10" in t and "N@10" in t
