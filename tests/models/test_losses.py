"""InfoNCE against a hand-written computation; the false-negative filter; the scale."""

from __future__ import annotations

import math

import pytest
import torch

from hllm.models.losses import LogitScale, infonce, target_mask


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_infonce_equals_hand_written():
    pred = [[1.0, 0.0, 0.5], [0.2, -1.0, 0.3]]
    pos = [[0.9, 0.1, 0.4], [0.0, 1.0, 0.0]]
    neg = [[0.0, 1.0, 0.0], [-1.0, 0.5, 2.0], [0.3, 0.3, 0.3]]
    scale = 14.0
    expected_rows = []
    for p, t in zip(pred, pos):
        logits = [scale * _cos(p, t)] + [scale * _cos(p, n) for n in neg if _cos(t, n) <= 0.99]
        expected_rows.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    # row 2's positive equals negative 0 exactly, so the filter removes it from row 2 only
    loss, stats = infonce(torch.tensor(pred), torch.tensor(pos), torch.tensor(neg), torch.tensor(scale), 0.99)
    assert float(loss) == pytest.approx(sum(expected_rows) / 2, rel=1e-6)
    assert stats["negatives"] == pytest.approx((3 + 2) / 2)
    assert stats["scale"] == pytest.approx(14.0)
    total, _ = infonce(torch.tensor(pred), torch.tensor(pos), torch.tensor(neg), torch.tensor(scale), reduction="sum")
    assert float(total) == pytest.approx(sum(expected_rows), rel=1e-6)


def test_false_negative_filter_drops_exact_duplicates_of_the_positive():
    g = torch.Generator().manual_seed(0)
    pred, pos, neg = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(20.0)
    base, base_stats = infonce(pred, pos, neg, scale)
    # add a copy of every positive (and a scaled copy: cosine 1 too) to the pool
    with_dups, stats = infonce(pred, pos, torch.cat([neg, pos, 3 * pos[:1]]), scale)
    # each row keeps the other rows' positives as negatives, but never its own copies
    pool = torch.cat([neg, pos, 3 * pos[:1]])
    owner = [None] * len(neg) + [0, 1, 2, 3, 0]  # whose positive each pool entry copies
    _rows = [
        infonce(pred[i : i + 1], pos[i : i + 1], pool[[j for j, o in enumerate(owner) if o != i]], scale)[0]
        for i in range(4)
    ]
    assert stats["negatives"] == pytest.approx(
        base_stats["negatives"] + 5 - (2 + 1 + 1 + 1) / 4
    )  # 5 added; row 0 loses 2, others 1
    # without the filter the duplicates would count as (hard) negatives
    unfiltered, _ = infonce(pred, pos, torch.cat([neg, pos, 3 * pos[:1]]), scale, threshold=1.01)
    assert float(unfiltered) > float(with_dups)


def test_topk_accuracy_counts_negatives_above_the_positive():
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0: perfect; row 1: orthogonal
    neg = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.9, 0.5], [-1.0, 0.0], [0.7, 0.7], [0.5, 0.6]])
    _, stats = infonce(pred, pos, neg, torch.tensor(10.0))
    assert stats["top1_acc"] == 0.5  # row 1 is beaten by 5 negatives
    assert stats["top5_acc"] == 0.5
    assert stats["top10_acc"] == 1.0


def test_scale_gets_no_nan_gradient_when_negatives_are_masked():
    pos = torch.randn(3, 4)
    pred = torch.randn(3, 4, requires_grad=True)
    s = LogitScale(1 / 0.07, 100.0)
    loss, _ = infonce(pred, pos, pos.clone(), s())  # every negative is a copy of some positive
    loss.backward()
    assert torch.isfinite(s.log_scale.grad).all() and torch.isfinite(pred.grad).all()


def test_logit_scale_init_and_clamp():
    s = LogitScale(1 / 0.07, 100.0)
    assert float(s().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        s.log_scale.fill_(10.0)
    s.clamp_()
    assert float(s().detach()) == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError):
        LogitScale(200.0, 100.0)


def test_target_mask_marks_valid_positions_of_left_padded_windows():
    w = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]])
    assert target_mask(w).tolist() == [[False, False, True, True], [True] * 4, [False] * 4]
