"""The temporal (global time cutoff) split, computed exactly on hand-made data: which interactions
train, which are validation and test targets, who is left out, the cutoff quantiles, the build's
timestamps and stats, and the settings errors that name their field."""

from __future__ import annotations

import numpy as np
import pytest

from hllm.config import ConfigError, ProtocolConfig, load_config, protocol_hash
from hllm.data.build import build_dataset
from hllm.data.dataset import Sequences, eval_split, load_built, split_plan, temporal_plan, train_sequences
from hllm.data.ingest import import_dataset
from tests.helpers.datakit import FORMATS, make_cfg

# Per user: items and their timestamps (sorted in time, as the build leaves them). Cutoffs 30 / 40:
SEQS = [
    [1, 2, 3, 4, 5],  # @10 20 30 | 40 | 50: train 1 2 3 | valid 4 | test 5 (history 1 2 3 4)
    [2, 3, 1],  # @15 | 35 | 45:            train 2     | valid 3 | test 1 (history 2 3)
    [7, 1],  # @42 55: first interaction after both cutoffs, nothing before it: left out of both splits
    [1, 2],  # @5 8: all in the past: trains, no target
    [8],  # @60: a new user after the test cutoff: left out
    [3, 4, 2],  # @25 | 38 | 41:            train 3     | valid 4 | test 2 (history 3 4)
]
TIMES = [[10, 20, 30, 40, 50], [15, 35, 45], [42, 55], [5, 8], [60], [25, 38, 41]]
# all 16 timestamps sorted: 5 8 10 15 20 25 30 35 38 40 41 42 45 50 55 60; numpy's linear quantile q sits at
# position 15 q, so q = 0.4 -> position 6 = 30 and q = 0.6 -> position 9 = 40: the same cutoffs as quantiles


def _data():
    seqs = Sequences.from_lists(SEQS)
    return seqs, np.array([t for ts in TIMES for t in ts], dtype=np.int64)


@pytest.mark.parametrize(
    ("unit", "valid", "test"), [("timestamp", 30, 40), ("quantile", 0.4, 0.6)], ids=["timestamps", "quantiles"]
)
def test_temporal_split_by_hand(unit, valid, test):
    seqs, ts = _data()
    plan = temporal_plan(seqs, ts, valid, test, unit)
    assert plan.info == {
        "split": "temporal",
        "valid_cutoff_time": 30.0,
        "test_cutoff_time": 40.0,
        "train_interactions": 7,  # 3 + 1 + 2 + 1 (users 0, 1, 3, 5)
        "valid_users_without_history": 0,
        "test_users_without_history": 2,  # users 2 and 4
    }
    train = train_sequences(seqs, plan)
    assert [train.of(u).tolist() for u in range(6)] == [[1, 2, 3], [2], [], [1, 2], [], [3]]
    va = eval_split(seqs, "valid", 3, plan)
    assert va.users.tolist() == [0, 1, 5] and va.targets.tolist() == [4, 3, 4]
    assert va.history.tolist() == [[1, 2, 3], [0, 0, 2], [0, 0, 3]]  # left-padded, only the training part
    te = eval_split(seqs, "test", 3, plan)
    assert te.users.tolist() == [0, 1, 5] and te.targets.tolist() == [5, 1, 2]
    # the test history reads the validation period too (known at the test cutoff), truncated to 3
    assert te.history.tolist() == [[2, 3, 4], [0, 2, 3], [0, 3, 4]]
    assert te.full_history.lengths.tolist() == [4, 2, 2]


def test_new_items_of_the_temporal_split_by_hand():
    from hllm.evaluation import slices as S

    seqs, ts = _data()
    plan = temporal_plan(seqs, ts, 30, 40, "timestamp")
    counts = S.item_train_counts(seqs, 9, plan)
    # item:         0  1  2  3  4 .. 8   (1: users 0, 3; 2: users 0, 1, 3; 3: users 0, 5; 4-8 only after the cutoff)
    assert counts.tolist() == [0, 2, 3, 2, 0, 0, 0, 0, 0]
    te = eval_split(seqs, "test", 3, plan)
    masks = S.slice_masks(te.targets, te.full_history.lengths, counts, head_share=1 / 3, short_history=2)
    # targets 5 (never trained: new), 1 (count 2: tail), 2 (count 3, the one head item of 3 seen)
    assert {k: v.tolist() for k, v in masks.items()} == {
        "new_items": [True, False, False],
        "head_items": [False, False, True],
        "tail_items": [False, True, False],
        "short_history": [False, True, True],
        "long_history": [True, False, False],
    }
    va = eval_split(seqs, "valid", 3, plan)
    assert (counts[va.targets] == 0).tolist() == [True, False, True]  # 4 first appears after the cutoff


def test_leave_one_out_plan_is_the_old_rule():
    seqs = Sequences.from_lists([[1, 2, 3, 4], [5, 6], [7]])
    plan = split_plan(seqs, ProtocolConfig())
    assert [train_sequences(seqs, plan).of(u).tolist() for u in range(3)] == [[1, 2], [], []]
    assert train_sequences(seqs).items.tolist() == train_sequences(seqs, plan).items.tolist()
    for which in ("valid", "test"):
        a, b = eval_split(seqs, which, 2), eval_split(seqs, which, 2, plan)
        assert a.users.tolist() == b.users.tolist() and a.targets.tolist() == b.targets.tolist()
    assert eval_split(seqs, "test", 2).targets.tolist() == [4, 6]


def test_temporal_split_errors_name_what_is_wrong():
    seqs, ts = _data()
    with pytest.raises(ValueError, match="rebuild it"):
        split_plan(seqs, ProtocolConfig(split="temporal"), None)  # a dataset built without timestamps
    with pytest.raises(ValueError, match="eval.protocol.valid_cutoff: no interaction at or before it"):
        temporal_plan(seqs, ts, 1, 2, "timestamp")
    with pytest.raises(ValueError, match="non-decreasing within each user"):
        temporal_plan(seqs, ts[::-1].copy(), 30, 40, "timestamp")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["eval.protocol.test_cutoff=1.5"], r"eval.protocol.test_cutoff: a quantile .* must be in \(0, 1\), got 1.5"),
        (["eval.protocol.valid_cutoff=0"], r"eval.protocol.valid_cutoff: a quantile .* must be in \(0, 1\), got 0"),
        (["eval.protocol.valid_cutoff=0.9", "eval.protocol.test_cutoff=0.9"],
         r"eval.protocol.valid_cutoff \(0.9\) must be before eval.protocol.test_cutoff \(0.9\)"),
        (["eval.protocol.cutoff_unit=timestamp", "eval.protocol.valid_cutoff=-5"],
         r"eval.protocol.valid_cutoff: a timestamp in epoch seconds must be >= 0, got -5"),
        (["eval.protocol.test_cutoff=.nan"], r"eval.protocol.test_cutoff: expected a finite number"),
        (["eval.protocol.split=random"], r"eval.protocol.split: expected one of 'leave_one_out', 'temporal'"),
        (["eval.protocol.cutoff_unit=days"], r"eval.protocol.cutoff_unit: expected one of 'quantile', 'timestamp'"),
        (["eval.protocol.target=last"], r"eval.protocol.target: expected one of 'first'"),
    ],
)  # fmt: skip
def test_bad_temporal_settings_are_config_errors(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sets)


def test_protocol_hash_moves_with_the_temporal_settings_only_under_temporal():
    loo = ProtocolConfig()
    assert protocol_hash(loo) == "3cd44a612d52"  # every leave-one-out result recorded so far keeps its hash
    assert protocol_hash(ProtocolConfig(test_cutoff=0.95)) == protocol_hash(loo)
    t = ProtocolConfig(split="temporal")
    assert protocol_hash(t) != protocol_hash(loo)
    assert protocol_hash(ProtocolConfig(split="temporal", test_cutoff=0.95)) != protocol_hash(t)
    by_time = ProtocolConfig(split="temporal", cutoff_unit="timestamp", valid_cutoff=5, test_cutoff=9)
    assert protocol_hash(by_time) not in (protocol_hash(t), protocol_hash(loo))


def test_build_writes_timestamps_and_temporal_stats(tmp_path):
    # the hllm fixture in time order: u1 i4@90 i1@100 i2@100 i3@120 | u2 i3@105 i1@110 i2@110 i5@115 |
    # u3 i5@130 i1@131 i2@132 | u4 i6@140 i7@141 i1@142 | u5 i2@150 i3@151 i5@152 i8@153 | u6 i6@170 i1@171 i2@172
    cfg = make_cfg(tmp_path, "build.k_core_user=0", "build.k_core_item=0", "eval.protocol.split=temporal",
                   "eval.protocol.cutoff_unit=timestamp", "eval.protocol.valid_cutoff=120",
                   "eval.protocol.test_cutoff=140")  # fmt: skip
    import_dataset(cfg, "hllm", [FORMATS / "hllm"])
    build_dataset(cfg, tokenize=False)
    b = load_built(cfg.paths.built_dir)
    assert b.timestamps is not None
    by_user = {b.user_ids[u]: b.timestamps[b.sequences.offsets[u] : b.sequences.offsets[u + 1]].tolist()
               for u in range(b.n_users)}  # fmt: skip
    assert by_user["u1"] == [90, 100, 100, 120] and by_user["u4"] == [140, 141, 142]
    assert b.stats["split"] == {
        "split": "temporal",
        "valid_cutoff_time": 120.0,
        "test_cutoff_time": 140.0,
        "train_interactions": 8,  # u1 and u2, all before 120
        "valid_users_without_history": 2,  # u3 (@130) and u4 (@140) start between the cutoffs
        "test_users_without_history": 2,  # u5 and u6 start after 140
        "train_users": 2,
        "train_windows": 2,  # L = 10: one window each
        "valid_users": 0,
        "test_users": 1,  # u4: history i6@140, target i7@141
    }
    te = eval_split(b.sequences, "test", 10, b.split_plan(cfg.eval.protocol))
    assert [b.item_ids[i] for i in te.targets] == ["i7"] and b.user_ids[te.users[0]] == "u4"
