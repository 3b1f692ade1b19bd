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


def test_repeat_score_marks_exactly_the_items_read_before_each_target():
    from hllm.models.losses import RepeatScore

    w = torch.tensor([[0, 3, 4, 3, 5], [1, 2, 1, 2, 6]])  # row 0 left-padded; row 1 comes back to 1 and 2
    tm = target_mask(w)
    pool = torch.tensor([1, 3, 5, 6])
    pos_seen, neg_seen = RepeatScore.seen(w, tm, pool, n_items=8)
    # targets in order: row 0 -> 4, 3, 5 (read: {3}, {3,4}, {3,4}); row 1 -> 2, 1, 2, 6
    assert pos_seen.tolist() == [False, True, False, False, True, True, False]
    assert neg_seen.tolist() == [
        [False, True, False, False],  # read {3}
        [False, True, False, False],  # {3, 4}
        [False, True, False, False],  # {3, 4}
        [True, False, False, False],  # {1}
        [True, False, False, False],  # {1, 2}
        [True, False, False, False],  # {1, 2}
        [True, False, False, False],  # {1, 2}
    ]


def test_repeat_score_adds_its_value_to_the_seen_logits():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    neg = torch.tensor([[1.0, 1.0], [-1.0, 0.2], [0.3, -0.9]])
    value = torch.tensor(-2.5)
    pos_seen = torch.tensor([True, False])
    neg_seen = torch.tensor([[False, True, False], [True, True, False]])
    loss, stats = infonce(pred, pos, neg, torch.tensor(5.0), repeat=(value, pos_seen, neg_seen))
    rows = []
    for i in range(2):
        lp = 5.0 * _cos(pred[i].tolist(), pos[i].tolist()) + (-2.5 if pos_seen[i] else 0.0)
        ln = [5.0 * _cos(pred[i].tolist(), n.tolist()) + (-2.5 if neg_seen[i, j] else 0.0) for j, n in enumerate(neg)]
        rows.append(-lp + math.log(math.exp(lp) + sum(math.exp(x) for x in ln)))
    assert float(loss) == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert stats["repeat"] == pytest.approx(-2.5)


def test_id_model_learns_that_users_do_not_come_back():
    """On sequences without a repeat, a few steps drive the learned repeat score negative (and serving/eval read
    it in cosine units: value / scale)."""
    from hllm.models.gru4rec import GRU4Rec

    torch.manual_seed(0)
    m = GRU4Rec(30, dim=16, hidden=16, full_softmax=True, repeat_score=True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    windows = torch.stack([torch.randperm(29)[:8] + 1 for _ in range(16)])  # no item twice in a row
    for _ in range(30):
        opt.zero_grad()
        m.train_loss(windows, torch.zeros(0, dtype=torch.long)).loss.backward()
        opt.step()
    assert float(m.repeat.value) < -1.0
    assert m.seen_bonus() == pytest.approx(float(m.repeat.value) / float(m.scale()))
    assert GRU4Rec(30).seen_bonus() is None
