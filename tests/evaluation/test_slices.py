"""Evaluation slices (new / head / tail items, short / long histories), computed exactly on hand-made
data, and the cold-start rule: an ID model scores nothing for an item it never saw in training."""

from __future__ import annotations

import numpy as np
import pytest

from hllm.data.dataset import Sequences
from hllm.evaluation import slices as S
from hllm.evaluation.evaluate import evaluate
from tests.helpers.evalkit import TableModel, make_built, small_cfg

# training part = all but the last two items of each sequence
SEQS = [
    [1, 2, 3, 4, 5],  # train 1 2 3   | valid 4 | test 5 (5 never in any training part: new)
    [1, 2, 1, 2, 3, 6],  # train 1 2 1 2 | valid 3 | test 6 (new)
    [1, 3, 2, 1],  # train 1 3       | valid 2 | test 1
    [2, 1, 2, 1, 2, 1, 2, 3, 4, 3],  # train 2 1 2 1 2 1 2 3 | valid 4 | test 3
]


def test_train_counts_and_head_items_by_hand():
    counts = S.item_train_counts(Sequences.from_lists(SEQS), n_items=7)
    # item:          0  1  2  3  4  5  6   (1: 1+2+1+3, 2: 1+2+0+4, 3: 1+0+1+1)
    assert counts.tolist() == [0, 7, 7, 3, 0, 0, 0]
    # seen items 1, 2, 3; head share 1/3 -> one item, but 1 and 2 tie at the cut: both are head
    assert S.head_items(counts, 1 / 3).nonzero()[0].tolist() == [1, 2]
    assert S.head_items(counts, 1.0).nonzero()[0].tolist() == [1, 2, 3]
    assert not S.head_items(counts, 0.0).any()


def test_slice_masks_and_metrics_by_hand():
    counts = S.item_train_counts(Sequences.from_lists(SEQS), n_items=7)
    targets = np.array([5, 6, 1, 3])  # the test targets
    hist = np.array([4, 5, 3, 9])  # items before each target
    masks = S.slice_masks(targets, hist, counts, head_share=0.5, short_history=4)
    assert masks["new_items"].tolist() == [True, True, False, False]
    assert masks["head_items"].tolist() == [False, False, True, False]  # 1 is head, 3 is tail
    assert masks["tail_items"].tolist() == [False, False, False, True]
    assert masks["short_history"].tolist() == [True, False, True, False]
    assert masks["long_history"].tolist() == [False, True, False, True]
    per_user = {"recall@1": np.array([1.0, 0.0, 1.0, 0.0]), "rank": np.array([0, 3, 0, 2])}
    got = S.slice_metrics(per_user, masks)
    assert got["new_items"] == {"n": 2.0, "recall@1": 0.5}
    assert got["head_items"] == {"n": 1.0, "recall@1": 1.0}
    assert got["long_history"] == {"n": 2.0, "recall@1": 0.0}
    empty = S.slice_metrics(per_user, {"none": np.zeros(4, dtype=bool)})
    assert empty == {"none": {"n": 0.0}}  # an empty slice has no metrics, not zeros


@pytest.mark.parametrize("id_model", [False, True])
def test_id_models_get_nothing_for_new_items(tmp_path, id_model):
    """User embedding = its last history item (``mode="last"``); each test target's embedding is that
    of the last history item: a content model (every row meaningful) ranks it first. An ID model's
    rows of never-trained items are no candidates and their targets are misses, however the untrained
    row happens to score."""
    n_items = 7
    table = np.eye(n_items, dtype=np.float32)
    # the new items 5 and 6 look exactly like the items their users saw last (4 and 3): a perfect score
    table[5], table[6] = table[4], table[3]
    built = make_built(tmp_path / "b", SEQS, n_items)
    cfg = small_cfg(ks=(1, 2))
    cfg.eval.protocol.mask_history = False
    cfg.eval.slices.head_share = 0.5
    res = evaluate(TableModel(table, id_model=id_model), built, cfg, split="test", progress=False)
    new = res.slices["new_items"]
    assert new["n"] == 2.0
    if id_model:
        assert new["recall@2"] == 0.0  # counted as misses
        ranks = res.per_user["rank"][:2]
        assert (ranks == np.iinfo(np.int64).max).all()
    else:
        # the target ties with its twin (4 or 3, also the last history item): pessimistic rank 1
        assert new["recall@2"] == 1.0 and new["recall@1"] == 0.0
    # the slices also reach metrics.json
    saved = res.save(tmp_path / "out")
    from hllm.evaluation.results import EvalResult

    assert EvalResult.load(saved).slices == res.slices
