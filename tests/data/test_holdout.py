"""Item cold start with held-out items (``build.holdout_items``), on the hand-made fixture: exactly which
interactions are dropped, that held-out items occur only as test targets, the new-items slice, the
cold-start rule for ID models, the protocol hash, and bad values."""

from __future__ import annotations

import numpy as np
import pytest

from hllm.config import ConfigError, load_config, protocol_hash
from hllm.data.build import build_dataset
from hllm.data.dataset import eval_split, load_built, train_sequences
from hllm.data.ingest import import_dataset
from hllm.evaluation.evaluate import evaluate, evaluated_protocol_hash
from tests.helpers.datakit import FORMATS, make_cfg
from tests.helpers.evalkit import TableModel

# The fixture (tests/fixtures/formats/hllm/interactions.csv), each user's sequence by time (ties: file order):
#   u1: i4 i1 i2 i3   u2: i3 i1 i2 i5   u3: i5 i1 i2   u4: i6 i7 i1   u5: i2 i3 i5 i8   u6: i6 i1 i2
# last items (the candidates), sorted by id: i1 i2 i3 i5 i8; 8 items in all.
CANDIDATES = ["i1", "i2", "i3", "i5", "i8"]


def build(tmp_path, *overrides: str):
    cfg = make_cfg(tmp_path, "build.k_core_user=0", "build.k_core_item=0", *overrides)
    import_dataset(cfg, "hllm", [FORMATS / "hllm"])
    build_dataset(cfg, tokenize=False)
    return cfg, load_built(cfg.paths.built_dir)


def seqs_by_id(b) -> dict[str, list[str]]:
    return {b.user_ids[u]: [b.item_ids[i] for i in b.sequences.of(u)] for u in range(b.n_users)}


def seed_drawing(item: str) -> int:
    """A seed whose draw (the documented rule: one of the candidates sorted by id, numpy default_rng) is ``item``."""
    want = CANDIDATES.index(item)
    return next(s for s in range(1000) if np.random.default_rng(s).choice(5, size=1, replace=False)[0] == want)


def test_one_held_out_item_is_dropped_everywhere_but_as_a_last_item(tmp_path):
    seed = seed_drawing("i2")
    # 0.125 x 8 items = 1 item held out
    cfg, b = build(tmp_path, "build.holdout_items=0.125", f"build.holdout_seed={seed}")
    # i2 removed from u1, u2 (middle) and u5 (first); kept where it is the last item: u3, u6
    assert seqs_by_id(b) == {
        "u1": ["i4", "i1", "i3"],
        "u2": ["i3", "i1", "i5"],
        "u3": ["i5", "i1", "i2"],
        "u4": ["i6", "i7", "i1"],
        "u5": ["i3", "i5", "i8"],
        "u6": ["i6", "i1", "i2"],
    }
    h = b.stats["holdout"]
    assert h == {"share": 0.125, "seed": seed, "items": 1, "candidates": 5, "item_ids": ["i2"], "test_targets": 2,
                 "rows_removed": 3, "users_without_history": 0}  # fmt: skip
    assert b.stats["interactions"] == 21 - 3 and b.stats["k_core"]["rows_removed"] == 0
    i2 = int(np.nonzero(b.item_ids == "i2")[0][0])
    train = train_sequences(b.sequences)
    valid, test = eval_split(b.sequences, "valid", 50), eval_split(b.sequences, "test", 50)
    assert i2 not in train.items and i2 not in valid.targets and i2 not in valid.full_history.items
    assert i2 not in test.full_history.items
    assert [b.user_ids[u] for u in test.users[test.targets == i2]] == ["u3", "u6"]
    from typer.testing import CliRunner

    from hllm.cli import app

    st = CliRunner().invoke(app, ["data", "stats", "--set", f"paths.built_dir={cfg.paths.built_dir}"])
    assert st.exit_code == 0 and (
        f"holdout       1 items held out (0.125 of the catalogue, seed {seed}, among 5 last items): 2 test targets, "
        "3 rows removed"
    ) in st.output
    # the same seed draws the same items: a rebuild is identical
    again = load_built(build_dataset(cfg, built_dir=tmp_path / "again", tokenize=False))
    assert seqs_by_id(again) == seqs_by_id(b)


def test_every_candidate_held_out_leaves_users_without_history(tmp_path):
    # 0.625 x 8 = 5 = every candidate: all of i1 i2 i3 i5 i8 only as last items
    _, b = build(tmp_path, "build.holdout_items=0.625")
    assert seqs_by_id(b) == {
        "u1": ["i4", "i3"],
        "u2": ["i5"],
        "u3": ["i2"],
        "u4": ["i6", "i7", "i1"],
        "u5": ["i8"],
        "u6": ["i6", "i2"],
    }
    h = b.stats["holdout"]
    assert h["item_ids"] == CANDIDATES and h["test_targets"] == 6 and h["rows_removed"] == 11
    # u2, u3, u5 have their target alone: no history, not evaluated
    assert h["users_without_history"] == 3 and b.stats["split"]["test_users"] == 3


@pytest.mark.parametrize("id_model", [False, True])
def test_held_out_targets_are_the_new_item_slice_and_id_models_score_nothing(tmp_path, id_model):
    seed = seed_drawing("i2")
    cfg, b = build(tmp_path, "build.holdout_items=0.125", f"build.holdout_seed={seed}")
    cfg.eval.protocol.ks, cfg.eval.protocol.select_metric = [1, 2], "ndcg@2"
    cfg.eval.protocol.mask_history = False
    idx = {b.item_ids[i]: i for i in range(b.n_items)}
    table = np.eye(b.n_items, dtype=np.float32)
    table[idx["i2"]] = table[idx["i1"]]  # i2 looks like i1, the last history item of both its users
    res = evaluate(TableModel(table, id_model=id_model), b, cfg, split="test", progress=False)
    # training part (all but the last two): u1 i4, u2 i3, u3 i5, u4 i6, u5 i3, u6 i6 -> seen i3 i4 i5 i6.
    # test targets u1 i3, u2 i5 (seen); u3 i2, u6 i2 (held out); u4 i1, u5 i8 (only in validation / test
    # positions in this tiny fixture): 4 new-item targets
    assert res.slices["new_items"]["n"] == 4.0
    held = np.isin(res.users, [int(np.nonzero(b.user_ids == u)[0][0]) for u in ("u3", "u6")])
    ranks = res.per_user["rank"][held]
    if id_model:
        assert (ranks == np.iinfo(np.int64).max).all() and res.per_user["recall@2"][held].sum() == 0.0
    else:
        # i2 ties with i1 (the user vector): pessimistic rank 1, a hit at 2
        assert ranks.tolist() == [1, 1] and res.per_user["recall@2"][held].tolist() == [1.0, 1.0]


def test_protocol_hash_changes_with_holdout_and_keeps_leave_one_out(tmp_path):
    cfg = make_cfg(tmp_path)
    p = cfg.eval.protocol
    assert evaluated_protocol_hash(p, {}) == protocol_hash(p) == "3cd44a612d52"  # holdout off: unchanged
    h = {"holdout": {"share": 0.1, "seed": 0}}
    on = evaluated_protocol_hash(p, h)
    assert on != protocol_hash(p)
    assert evaluated_protocol_hash(p, {"holdout": {"share": 0.1, "seed": 1}}) != on  # other items held out
    assert evaluated_protocol_hash(p, {"holdout": {"share": 0.2, "seed": 0}}) != on


@pytest.mark.parametrize("bad", ["-0.1", "1.0", "1.5", "nan", "inf"])
def test_bad_holdout_share_names_the_field(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"build\.holdout_items"):
        load_config(None, [f"build.holdout_items={bad}"])


def test_holdout_refuses_a_share_above_the_candidates_and_the_temporal_split(tmp_path):
    with pytest.raises(ConfigError, match=r"build\.holdout_items: 0.75 of 8 items is 6 items, but only 5"):
        build(tmp_path / "a", "build.holdout_items=0.75")
    with pytest.raises(ConfigError, match=r"build\.holdout_items: needs eval\.protocol\.split=leave_one_out"):
        build(tmp_path / "b", "build.holdout_items=0.125", "eval.protocol.split=temporal")
