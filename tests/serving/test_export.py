"""Export (files, manifest, atomicity, incremental item refresh) and the Recommender."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hllm.config import protocol_hash
from hllm.data.dataset import eval_split, left_pad_windows
from hllm.evaluation import metrics as M
from hllm.evaluation.evaluate import evaluate
from hllm.models import pop
from hllm.serving import export as E
from hllm.serving.recommend import Recommender
from tests.helpers.evalkit import TableModel, make_built, random_dataset, small_cfg, text_model_for


def _setup(tmp_path, n_users=25, n_items=40, seed=0):
    built = random_dataset(tmp_path / "b", n_users=n_users, n_items=n_items, seed=seed)
    cfg = small_cfg(ks=(1, 5, 10))
    cfg.eval.protocol.max_history = 5
    cfg.model.item.text_fields = ["title"]
    return built, cfg, text_model_for(built, cfg)


def test_export_contents(tmp_path):
    built, cfg, model = _setup(tmp_path)
    res = E.export_model(model, built, cfg, tmp_path / "exp", model_info={"fingerprint": "abc"}, progress=False)
    d = res.out_dir
    for f in (
        "manifest.json",
        "items.parquet",
        "item_embeddings.npy",
        "items.faiss",
        "users.parquet",
        "user_embeddings.npy",
        "seen.npz",
    ):
        assert (d / f).exists(), f
    man = json.loads((d / "manifest.json").read_text())
    assert man["counts"] == {
        "items": 39,
        "servable_items": 39,  # a text model scores every item
        "users": 25,
        "interactions": int(len(built.sequences.items)),
    }
    assert man["dim"] == 8 and man["normalize"] is True
    assert man["protocol_hash"] == protocol_hash(cfg.eval.protocol)
    assert man["config_hash"] == cfg.hash()
    assert man["model"] == {"kind": "hllm", "fingerprint": "abc"}
    assert man["refresh"] == {
        "items_encoded": 39,
        "items_reused": 0,
        "reused_from": {"previous_export": 0, "evaluation_cache": 0},
    }

    rec = Recommender.from_export(d)
    assert rec.item_ids.tolist() == built.item_ids[1:].tolist()  # rows by original id
    with torch.no_grad():
        items = model.item_embeddings(torch.arange(built.n_items)).numpy()
    np.testing.assert_allclose(rec.item_emb, items[1:], rtol=1e-6)
    # users: embedding at the latest position = whole sequence (test history + test item)
    seqs = built.sequences
    hist = left_pad_windows(seqs, seqs.offsets[1:], np.arange(seqs.n_users), 5)
    h = torch.from_numpy(hist.astype(np.int64))
    with torch.no_grad():
        u = torch.nn.functional.normalize(model.user_embeddings(torch.from_numpy(items)[h], h != 0), dim=-1).numpy()
    np.testing.assert_allclose(rec.user_emb, u, rtol=1e-5, atol=1e-6)
    assert rec.seen("u3") == [built.item_ids[i] for i in seqs.of(3)]


def _brute_force(rec, r, k, exclude_seen=True):
    items = np.asarray(rec.item_emb, dtype=np.float64)
    if rec.normalize:
        items = items / np.linalg.norm(items, axis=1, keepdims=True)
    s = items @ np.asarray(rec.user_emb[r], dtype=np.float64)
    if exclude_seen:
        s[rec._seen[rec._seen_off[r] : rec._seen_off[r + 1]]] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    return [rec.item_ids[i] for i in order if np.isfinite(s[i])], s[order]


def test_for_user_equals_brute_force(tmp_path):
    built, cfg, model = _setup(tmp_path)
    E.export_model(model, built, cfg, tmp_path / "exp", progress=False)
    rec = Recommender.from_export(tmp_path / "exp")
    for r, uid in enumerate(rec.user_ids):
        got = rec.for_user(uid, k=7)
        ids, scores = _brute_force(rec, r, 7)
        assert [g.item_id for g in got] == ids
        np.testing.assert_allclose([g.score for g in got], scores[: len(got)], rtol=1e-5)
        assert not set(ids) & set(rec.seen(uid))
        assert got[0].title == f"title {ids[0][1:]}"
    assert [g.item_id for g in rec.for_user("u0", k=7, exclude_seen=False)] == _brute_force(rec, 0, 7, False)[0]
    with pytest.raises(KeyError, match="user 'nobody' is not in export"):
        rec.for_user("nobody")
    with pytest.raises(RuntimeError, match="needs the user model"):
        rec.for_history(["i1"])


@pytest.mark.parametrize(("mask", "bonus"), [(True, None), (False, None), (False, -0.4), (False, 0.4), (True, 0.4)])
def test_recommend_topk_reproduces_evaluator_metrics(tmp_path, mask, bonus):
    """predict()-equals-eval: metrics computed from served top-K lists equal the evaluator's; with a learned
    repeat score (model.repeat_score) of either sign too (a positive one lifts read items from outside the
    index's top k)."""
    from hllm.models.losses import RepeatScore

    built, cfg, model = _setup(tmp_path, n_users=40, n_items=60, seed=4)
    cfg.eval.protocol.mask_history = mask
    if bonus is not None:
        model.repeat = RepeatScore()
        model.repeat.raw.data.fill_(bonus / RepeatScore.GAIN)
    E.export_model(model, built, cfg, tmp_path / "exp", progress=False)
    rec = Recommender.from_export(tmp_path / "exp", model=model)
    assert rec.seen_bonus == (None if bonus is None else pytest.approx(model.seen_bonus()))
    for split in ("valid", "test"):
        res = evaluate(model, built, cfg, split, progress=False)
        es = eval_split(built.sequences, split, cfg.eval.protocol.max_history)
        histories = [[built.item_ids[i] for i in es.full_history.of(r)] for r in range(len(es.users))]
        rows, _ = rec.for_histories(histories, k=max(cfg.eval.protocol.ks), exclude_seen=mask)
        ranks = M.ranks_from_topk(rows, es.targets - 1)  # export row = item idx - 1
        served = M.mean_metrics(M.per_user_metrics(ranks, cfg.eval.protocol.ks))
        assert served == pytest.approx(res.metrics, abs=1e-12)
        top = np.minimum(res.per_user["rank"], max(cfg.eval.protocol.ks))
        assert ranks.tolist() == top.tolist()


def test_failed_export_leaves_previous_intact(tmp_path, monkeypatch):
    built, cfg, model = _setup(tmp_path)
    out = tmp_path / "exp"
    E.export_model(model, built, cfg, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(E, "write_index", boom)
    model2 = text_model_for(built, cfg, seed=1)
    with pytest.raises(OSError, match="injected"):
        E.export_model(model2, built, cfg, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "exp"]  # no temp folders left
    assert Recommender.from_export(out).for_user("u1", k=3)


def test_incremental_refresh_encodes_only_new_or_changed_items(tmp_path):
    seqs = [[1, 2, 3, 4], [2, 3, 5, 6], [6, 1, 2]]
    titles = ["", "alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    b1 = make_built(tmp_path / "b1", seqs, 7, titles)
    cfg = small_cfg(ks=(1, 2, 5))
    cfg.model.item.text_fields = ["title"]
    out = tmp_path / "exp"
    m1 = text_model_for(b1, cfg)
    first = E.export_model(m1, b1, cfg, out, progress=False)
    assert (first.items_encoded, first.items_reused) == (6, 0)

    # the next day: "delta" got a new title, two new items arrived, the item tower is the same
    titles2 = ["", "alpha", "bravo", "charlie", "delta (remastered)", "echo", "foxtrot", "golf", "hotel"]
    b2 = make_built(tmp_path / "b2", seqs + [[7, 8, 1]], 9, titles2)
    m2 = text_model_for(b2, cfg)
    m2.load_state_dict(m1.state_dict())
    second = E.export_model(m2, b2, cfg, out, progress=False)
    assert (second.items_encoded, second.items_reused) == (3, 5)
    assert m2.item_calls == 3  # only items 4, 7, 8 went through the item tower
    assert second.manifest["refresh"] == {
        "items_encoded": 3,
        "items_reused": 5,
        "reused_from": {"previous_export": 5, "evaluation_cache": 0},
    }
    with torch.no_grad():
        full = m2.item_embeddings(torch.arange(1, 9)).numpy()
    np.testing.assert_allclose(np.load(out / "item_embeddings.npy"), full, rtol=1e-6)

    # a retrained item tower invalidates everything
    m3 = text_model_for(b2, cfg, seed=7)
    third = E.export_model(m3, b2, cfg, out, progress=False)
    assert (third.items_encoded, third.items_reused) == (8, 0)


def test_hnsw_index_and_popularity_scores(tmp_path):
    seqs = [[1, 1, 2, 3, 4], [2, 1, 5, 6], [3, 2, 4, 6]]
    built = make_built(tmp_path / "b", seqs, n_items=7)
    cfg = small_cfg(ks=(1, 2, 5))
    cfg.model.kind = "pop"
    cfg.export.faiss_index = "hnsw"
    model = pop.build(cfg, built)
    E.export_model(model, built, cfg, tmp_path / "exp", progress=False)
    rec = Recommender.from_export(tmp_path / "exp", model=model)
    assert rec.manifest["normalize"] is False and rec.manifest["index"]["type"] == "hnsw"
    # counts 1:3 2:3 3:1 else 0; u1 has seen 2,1,5,6 -> 3 (count 1) then 4 (0)
    got = rec.for_user("u1", k=2)
    assert [g.item_id for g in got] == ["i3", "i4"] and [g.score for g in got] == [1.0, 0.0]
    assert [g.item_id for g in rec.for_history(["i5"], k=2)] in (["i1", "i2"], ["i2", "i1"])
    with pytest.raises(KeyError, match="not in export"):
        rec.for_history(["i99"])


@pytest.mark.parametrize("index", ["flat_ip", "hnsw"])
def test_id_model_never_serves_an_item_it_never_trained(tmp_path, index):
    """An ID model's row of an item that occurs only as some user's valid/test target is untrained; the
    evaluation counts it as no candidate, and the export's index leaves it out, so what is served ranks
    exactly as the evaluation does (predict = eval) and no untrained row is ever recommended."""
    from hllm.models import sasrec

    # users walk the catalogue (start 1..7, six items each); items 11 and 12 only ever occur as the last two
    # items of a walk, the valid/test targets, never in a training part
    seqs = [list(range(s, s + 6)) for s in (1, 2, 3, 4, 5, 6, 7, 2, 3, 1)]
    built = make_built(tmp_path / "b", seqs, n_items=13)
    cfg = small_cfg(ks=(1, 5, 10))
    cfg.model.kind = "sasrec"
    cfg.model.sasrec_dim, cfg.model.sasrec_heads, cfg.model.sasrec_layers = 8, 2, 1
    cfg.eval.protocol.max_history = 6
    cfg.eval.protocol.mask_history = False
    cfg.export.faiss_index = index
    torch.manual_seed(0)
    model = sasrec.build(cfg, built).eval()
    E.export_model(model, built, cfg, tmp_path / "exp", progress=False)
    rec = Recommender.from_export(tmp_path / "exp", model=model)
    untrained = {"i11", "i12"}
    assert rec.manifest["counts"]["items"] == 12 and rec.manifest["counts"]["servable_items"] == 10
    for u in rec.user_ids:
        got = {g.item_id for g in rec.for_user(u, k=12, exclude_seen=False)}
        assert len(got) == 10 and not got & untrained
    res = evaluate(model, built, cfg, "test", progress=False)
    es = eval_split(built.sequences, "test", cfg.eval.protocol.max_history)
    hist = [[built.item_ids[i] for i in es.full_history.of(r)] for r in range(len(es.users))]
    rows, _ = rec.for_histories(hist, k=10, exclude_seen=False)
    served = M.mean_metrics(M.per_user_metrics(M.ranks_from_topk(rows, es.targets - 1), cfg.eval.protocol.ks))
    assert res.n_masked_targets > 0 and served == pytest.approx(res.metrics, abs=1e-12)


def test_checkpoint_mismatch_is_refused(tmp_path):
    from safetensors.torch import save_file

    built, cfg, model = _setup(tmp_path)
    E.export_model(model, built, cfg, tmp_path / "exp", model_info={"fingerprint": "0" * 16}, progress=False)
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({"w": torch.ones(2)}, str(ck / "model.safetensors"))
    with pytest.raises(ValueError, match="is not the one export"):
        Recommender.from_export(tmp_path / "exp", checkpoint=ck)


def test_table_model_export_matches_eval_scores(tmp_path):
    """Raw inner-product models export unnormalised vectors and keep scores."""
    table = np.random.default_rng(1).normal(size=(12, 3)).astype(np.float32)
    built = make_built(tmp_path / "b", [[1, 2, 3], [4, 5, 6, 7]], n_items=12)
    cfg = small_cfg(ks=(1, 2, 5))
    E.export_model(TableModel(table), built, cfg, tmp_path / "exp", progress=False)
    rec = Recommender.from_export(tmp_path / "exp")
    got = rec.for_user("u0", k=3)
    s = table[1:] @ table[3]  # user = last item of u0 (item 3)
    s[[0, 1, 2]] = -np.inf
    assert [g.item_id for g in got] == [f"i{i + 1}" for i in np.argsort(-s)[:3]]
    np.testing.assert_allclose([g.score for g in got], np.sort(s)[::-1][:3], rtol=1e-5)
