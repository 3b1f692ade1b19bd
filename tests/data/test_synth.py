"""The embedded synthetic dataset: deterministic bytes, the requested sizes, and text that predicts behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hllm.config import SynthConfig
from hllm.data.raw import fingerprint, read_raw
from hllm.data.synth import CATALOGUE, generate, synthesize
from tests.helpers.datakit import make_cfg


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path, tiny_synth):
    a = synthesize(make_cfg(tmp_path / "a", *tiny_synth))
    b = synthesize(make_cfg(tmp_path / "b", *tiny_synth))
    c = synthesize(make_cfg(tmp_path / "c", *tiny_synth, "synth.seed=7"))
    fa, fb, fc = fingerprint(a), fingerprint(b), fingerprint(c)
    assert set(fa) == {"interactions.parquet", "items.parquet"}
    assert fa == fb
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert fa["interactions.parquet"] != fc["interactions.parquet"]


def test_sizes_follow_params_and_schema_is_canonical(tmp_path, tiny_synth):
    raw = read_raw(synthesize(make_cfg(tmp_path, *tiny_synth)))
    inter = raw.interactions.to_pandas()
    items = raw.items.to_pandas()
    assert raw.interactions.schema.names == ["user_id", "item_id", "timestamp"]
    assert str(raw.interactions.schema.field("timestamp").type) == "int64"
    assert raw.items.schema.names == ["item_id", "title", "tag", "description"]
    assert inter["user_id"].nunique() == 60 and len(items) == 80
    per_user = inter.groupby("user_id").size()
    assert per_user.min() >= 6 and per_user.max() <= 12
    assert set(inter["item_id"]) <= set(items["item_id"])
    # a log in time order; same-second rows exist (they exercise the build's tie rule)
    assert inter["timestamp"].is_monotonic_increasing
    assert inter.duplicated(["user_id", "timestamp"]).any()
    assert raw.manifest["format"] == "synth" and raw.manifest["params"]["n_users"] == 60


def test_item_text_is_readable_and_built_from_the_attributes():
    raw = generate(SynthConfig(n_users=50, n_items=300))
    items = raw.items.to_pandas()
    assert items["title"].str.split().str.len().min() >= 3
    tag = items["tag"].str.split(", ")
    assert (tag.str.len() == 3).all()
    assert set(tag.str[0]) <= set(CATALOGUE)
    # the description names the colour (the tag's last part) and the product noun of the title
    assert all(t[2] in d for t, d in zip(tag, items["description"]))
    assert items["description"].str.endswith(".").all()
    assert items["title"].nunique() > 0.9 * len(items)


def test_text_predicts_the_next_item_far_better_than_popularity():
    """ "Same category as the last item, most popular first" uses only item text (the tag's category) and
    must beat global popularity by a wide margin on the default dataset: the property the HLLM
    demo relies on."""
    raw = generate(SynthConfig())
    inter = raw.interactions.to_pandas()
    items = raw.items.to_pandas().set_index("item_id")
    category = items["tag"].str.split(", ").str[0]
    seqs = inter.groupby("user_id", sort=False)["item_id"].apply(list)
    train_pop = pd.Series([x for s in seqs for x in s[:-1]]).value_counts()
    by_cat = {c: [i for i in train_pop.index if category[i] == c] for c in category.unique()}
    hit_pop = hit_text = 0
    for s in seqs:
        hist, target = set(s[:-1]), s[-1]
        hit_pop += target in [i for i in train_pop.index[:200] if i not in hist][:10]
        hit_text += target in [i for i in by_cat[category[s[-2]]] if i not in hist][:10]
    r_pop, r_text = hit_pop / len(seqs), hit_text / len(seqs)
    assert r_text > 0.1
    assert r_text > 4 * r_pop


def test_sequences_rarely_repeat_an_item():
    inter = generate(SynthConfig()).interactions.to_pandas()
    assert inter.duplicated(["user_id", "item_id"]).mean() < 0.005
    assert np.all(inter["timestamp"].to_numpy() >= 1_672_531_200)


def test_tiny_catalogues_never_produce_duplicate_rows():
    """Small catalogues force repeats; a repeat must never share its second with the earlier row (validation
    rejects duplicate (user, item, timestamp) rows)."""
    for n_items in (10, 40):
        for seed in range(3):
            inter = generate(SynthConfig(n_users=80, n_items=n_items, seed=seed)).interactions.to_pandas()
            assert inter.duplicated(["user_id", "item_id"]).any()
            assert not inter.duplicated(["user_id", "item_id", "timestamp"]).any()
