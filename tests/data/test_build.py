"""Sequence construction on the committed hllm fixture: exact sequences, id maps, tie rule, k-core modes,
split rules, stats, the validation gate and atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hllm.data.build import build_dataset, first_appearance_ids, k_core
from hllm.data.dataset import Sequences, eval_split, load_built, load_tokens, train_sequences, training_windows
from hllm.data.errors import DataError
from hllm.data.ingest import import_dataset
from hllm.data.raw import INTERACTIONS
from tests.helpers.datakit import FORMATS, make_cfg

# The fixture (tests/fixtures/formats/hllm/interactions.csv), per user in FILE order:
#   u1: i1@100 i2@100 i3@120 i4@90    u2: i3@105 i1@110 i2@110 i5@115    u3: i5@130 i1@131 i2@132
#   u4: i6@140 i7@141 i1@142          u5: i2@150 i3@151 i5@152 i8@153    u6: i6@170 i1@171 i2@172


def built(tmp_path: Path, *overrides: str, tokenize: bool = False):
    cfg = make_cfg(tmp_path, "validate.data_docs=false", *overrides)
    import_dataset(cfg, "hllm", [FORMATS / "hllm"])
    build_dataset(cfg, tokenize=tokenize)
    return cfg, load_built(cfg.paths.built_dir)


def seqs_by_id(b) -> dict[str, list[str]]:
    return {b.user_ids[u]: [b.item_ids[i] for i in b.sequences.of(u)] for u in range(b.n_users)}


def test_no_filtering_sorts_by_time_and_keeps_file_order_on_ties(tmp_path):
    _, b = built(tmp_path, "build.k_core_user=0", "build.k_core_item=0")
    assert seqs_by_id(b) == {
        "u1": ["i4", "i1", "i2", "i3"],  # i4@90 comes last in the file but first in time; i1, i2 tie @100
        "u2": ["i3", "i1", "i2", "i5"],  # i1, i2 tie @110: file order
        "u3": ["i5", "i1", "i2"],
        "u4": ["i6", "i7", "i1"],
        "u5": ["i2", "i3", "i5", "i8"],
        "u6": ["i6", "i1", "i2"],
    }
    # ids in order of first appearance in the file; item 0 is padding
    assert list(b.user_ids) == ["u1", "u2", "u3", "u4", "u5", "u6"]
    assert list(b.item_ids) == ["<pad>", "i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"]
    assert b.stats["same_timestamp_ties"] == 2


def test_iterative_k_core_is_a_true_core(tmp_path):
    _, b = built(tmp_path, "build.k_core_user=3", "build.k_core_item=2", "build.k_core_mode=iterative")
    # i4, i7, i8 (1 interaction) go; u4 falls to 2 items and goes; then i6 has 1 user left and goes,
    # which drops u6 to 2 items: gone too.
    assert seqs_by_id(b) == {
        "u1": ["i1", "i2", "i3"],
        "u2": ["i3", "i1", "i2", "i5"],
        "u3": ["i5", "i1", "i2"],
        "u5": ["i2", "i3", "i5"],
    }
    assert [b.sequences.of(u).tolist() for u in range(b.n_users)] == [[1, 2, 3], [3, 1, 2, 4], [4, 1, 2], [2, 3, 4]]
    assert b.stats["k_core"] == {"mode": "iterative", "user": 3, "item": 2, "iterations": 3, "rows_removed": 8}


def test_one_pass_k_core_counts_once_like_hllm_books(tmp_path):
    _, b = built(tmp_path, "build.k_core_user=3", "build.k_core_item=2", "build.k_core_mode=one_pass")
    s = seqs_by_id(b)
    assert s["u6"] == ["i6", "i1", "i2"]  # i6 counted 2 on the raw data, ends with 1 user: not a true core
    assert "u4" not in s and set(s) == {"u1", "u2", "u3", "u5", "u6"}


def test_split_rules_on_the_built_fixture(tmp_path):
    _, b = built(tmp_path, "build.k_core_user=0", "build.k_core_item=0")
    s = b.sequences  # u1 = [4,1,2,3], u2 = [3,1,2,5], u3 = [5,1,2], u4 = [6,7,1], u5 = [2,3,5,8], u6 = [6,1,2]
    tr = train_sequences(s)
    assert [tr.of(u).tolist() for u in range(6)] == [[4, 1], [3, 1], [5], [6], [2, 3], [6]]
    va = eval_split(s, "valid", max_history=3)
    assert va.targets.tolist() == [2, 2, 1, 7, 5, 1]
    assert va.history.tolist() == [[0, 4, 1], [0, 3, 1], [0, 0, 5], [0, 0, 6], [0, 2, 3], [0, 0, 6]]
    te = eval_split(s, "test", max_history=2)
    assert te.targets.tolist() == [3, 5, 2, 1, 8, 2]
    assert te.history.tolist() == [[1, 2], [1, 2], [5, 1], [6, 7], [3, 5], [6, 1]]
    assert te.full_history.of(0).tolist() == [4, 1, 2]
    w = training_windows(tr, max_seq_len=1, mode="split")  # windows of 2, newest first per user
    assert w.tolist() == [[4, 1], [3, 1], [2, 3]]
    assert b.stats["split"] == {"split": "leave_one_out", "train_users": 6, "train_windows": 3, "valid_users": 6, "test_users": 6}
    # sliding: one window ending at every training position after the first, full left context
    long = Sequences.from_lists([[4, 1, 2, 3], [7], [5, 6, 8]])
    assert training_windows(long, max_seq_len=2, mode="sliding").tolist() == [
        [0, 4, 1], [4, 1, 2], [1, 2, 3],  # user 0: targets 1, 2, 3 (the last with its 2 previous items)
        [0, 5, 6], [5, 6, 8],  # user 2; user 1 has no next-item pair
    ]  # fmt: skip
    assert training_windows(long, max_seq_len=2, mode="last").tolist() == [[1, 2, 3], [5, 6, 8]]


def test_build_writes_the_contract(tmp_path):
    cfg, b = built(tmp_path, "build.k_core_user=3", "build.k_core_item=2")
    d = Path(cfg.paths.built_dir)
    items = pd.read_parquet(d / "items.parquet")
    assert items.dtypes["idx"] == np.int32 and items["idx"].tolist() == [0, 1, 2, 3, 4]
    assert items.iloc[0]["item_id"] == "<pad>" and pd.isna(items.iloc[0]["title"])
    assert items["title"].tolist()[1:] == ["Trail Backpack", "Camp Stove", "Espresso Beans", "Yoga Mat"]
    users = pd.read_parquet(d / "users.parquet")
    assert users["user_id"].tolist() == ["u1", "u2", "u3", "u5"] and users.dtypes["idx"] == np.int32
    import pyarrow.parquet as pq

    seq = pq.read_table(d / "sequences.parquet")
    t = seq.schema.field("items").type
    assert pa.types.is_list(t) and t.value_type == pa.int32()
    assert seq.column("user_idx").to_pylist() == [0, 1, 2, 3]
    stats = json.loads((d / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 4, 13)
    assert stats["sequence_length"]["min"] == 3 and stats["sequence_length"]["max"] == 4
    assert stats["sequence_length"]["p50"] == 3.0
    assert stats["raw"] == {"interactions": 21, "users": 6, "items_interacted": 8, "catalogue_items": 9}


@pytest.mark.slow  # loads transformers + the MiniLM tokenizer (~5-10 s on 2 busy cores)
def test_build_pre_tokenises_item_text_with_the_item_tokenizer(tmp_path):
    cfg, b = built(tmp_path, "build.k_core_user=3", "build.k_core_item=2", tokenize=True)
    files = list((Path(cfg.paths.built_dir) / "tokens").glob("*.npz"))
    assert len(files) == 1
    tok = load_tokens(files[0])
    assert len(tok.offsets) == b.n_items + 1 and len(tok.of(0)) == 0
    assert all(0 < len(tok.of(i)) <= cfg.model.item.max_text_len for i in range(1, b.n_items))
    from hllm.pretrained import load_tokenizer

    text = load_tokenizer(cfg.model.item.path).decode(tok.of(1), skip_special_tokens=True)
    assert "title : trail backpack" in text and "tag : hiking, outdoor" in text


def test_build_refuses_unvalidated_failed_or_changed_raw_data(tmp_path):
    cfg = make_cfg(tmp_path, "validate.data_docs=false", "build.k_core_user=0", "build.k_core_item=0")
    from hllm.data.ingest import read_source
    from hllm.data.raw import write_raw
    from hllm.data.validate import validate_raw

    write_raw(read_source("hllm", [FORMATS / "hllm"]), cfg.paths.raw_dir)
    with pytest.raises(DataError, match="no validation report"):
        build_dataset(cfg, tokenize=False)
    validate_raw(make_cfg(tmp_path, "validate.data_docs=false", "validate.min_interactions_per_user=5"))
    with pytest.raises(DataError, match="the last validation FAILED"):
        build_dataset(cfg, tokenize=False)
    assert validate_raw(cfg).passed
    p = Path(cfg.paths.raw_dir) / INTERACTIONS
    p.write_bytes(p.read_bytes())  # same bytes: still fine
    build_dataset(cfg, tokenize=False)
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(p).slice(0, 20), p)
    with pytest.raises(DataError, match="changed since it was validated"):
        build_dataset(cfg, tokenize=False)
    assert load_built(cfg.paths.built_dir).stats["raw"]["interactions"] == 21  # the previous build is intact


def test_failed_build_keeps_the_previous_one(tmp_path):
    cfg, b = built(tmp_path, "build.k_core_user=3", "build.k_core_item=2")
    strict = make_cfg(tmp_path, "build.k_core_user=50")
    with pytest.raises(DataError, match="left no interactions"):
        build_dataset(strict, tokenize=False)
    assert load_built(cfg.paths.built_dir).n_users == 4
    assert not list(Path(cfg.paths.built_dir).parent.glob(".built-staging-*"))


def test_k_core_and_id_helpers_on_arrays():
    u = np.array([0, 0, 0, 1, 1, 2])
    i = np.array([0, 1, 2, 0, 1, 3])
    assert k_core(u, i, 2, 2, "iterative").keep.tolist() == [True, True, False, True, True, False]
    assert k_core(u, i, 1, 1).keep.all()
    with pytest.raises(ValueError, match="k_core_mode"):
        k_core(u, i, 2, 2, "sometimes")
    new, old = first_appearance_ids(np.array([7, 3, 7, 5, 3]))
    assert new.tolist() == [0, 1, 0, 2, 1] and old.tolist() == [7, 3, 5]
