"""Item-embedding cache keyed by checkpoint, and sharded evaluation under a real gloo process group."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hllm.evaluation.evaluate import evaluate
from hllm.evaluation.item_cache import item_cache_dir
from tests.helpers.evalkit import TableModel, make_built, random_dataset, small_cfg

TABLE = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [1, 0]], dtype=np.float32)
SEQS = [[1, 2, 4, 3], [5, 2, 2], [6, 3]]


def _save(model, d):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))


def _cfg(tmp_path, **kw):
    cfg = small_cfg(ks=(1, 2, 5))
    cfg.paths.runs_dir = str(tmp_path / "runs")
    for k, v in kw.items():
        setattr(cfg.eval, k, v)
    return cfg


def _cache_files(cfg):
    return sorted(item_cache_dir(cfg).glob("*.npy"))


def test_item_embeddings_cached_per_checkpoint(tmp_path):
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = _cfg(tmp_path)
    ck = tmp_path / "runs" / "r" / "best"
    model = TableModel(TABLE)
    _save(model, ck)
    before = sorted(p.name for p in ck.iterdir())

    first = evaluate(model, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert model.item_calls == 6
    (cache,) = _cache_files(cfg)
    np.testing.assert_array_equal(np.load(cache)[1:], TABLE[1:])
    assert sorted(p.name for p in ck.iterdir()) == before  # the checkpoint folder is never written to

    again = evaluate(model, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert model.item_calls == 6  # served from the cache
    assert again.metrics == first.metrics

    # new weights in the same folder -> the key changes -> recomputed
    model2 = TableModel(TABLE * 2)
    _save(model2, ck)
    evaluate(model2, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert model2.item_calls == 6
    newest = max(_cache_files(cfg), key=lambda p: p.stat().st_mtime)
    assert np.load(newest)[1, 0] == 2.0

    # a torn cache file is ignored and rewritten, not trusted
    newest.write_bytes(b"garbage")
    evaluate(model2, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert model2.item_calls == 12
    assert json.loads(newest.with_suffix(".json").read_text())["n_items"] == 7
    assert np.load(newest).shape == (7, 2)


def test_cache_invalidated_by_new_items_and_pruned(tmp_path):
    ck = tmp_path / "ckpt"
    model = TableModel(np.vstack([TABLE, [[3, 3]]]))
    _save(model, ck)
    cfg = _cfg(tmp_path, item_cache_keep=1)
    evaluate(model, make_built(tmp_path / "b1", SEQS, n_items=7), cfg, "test", checkpoint_dir=ck, progress=False)
    res = evaluate(
        model, make_built(tmp_path / "b2", SEQS + [[7, 1]], n_items=8), cfg, "test", checkpoint_dir=ck, progress=False
    )
    assert model.item_calls == 6 + 7
    assert res.n_items == 8
    (only,) = _cache_files(cfg)  # item_cache_keep=1
    assert np.load(only).shape[0] == 8


def test_cache_can_be_disabled(tmp_path):
    ck = tmp_path / "ckpt"
    model = TableModel(TABLE)
    _save(model, ck)
    cfg = _cfg(tmp_path, item_cache=False)
    built = make_built(tmp_path / "b", SEQS, n_items=7)
    evaluate(model, built, cfg, "test", checkpoint_dir=ck, progress=False)
    evaluate(model, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert model.item_calls == 12 and _cache_files(cfg) == []


def _worker(rank, world, init_file, built_dir, out_dir, table):
    import torch.distributed as dist

    from hllm.data.dataset import load_built

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        built = load_built(built_dir)
        model = TableModel(table, normalize=True, mode="mean")
        cfg = small_cfg(ks=(1, 5, 20), user_chunk=4, item_chunk=16)
        res = evaluate(model, built, cfg, "test", progress=False)
        np.savez(
            f"{out_dir}/rank{rank}.npz",
            users=res.users,
            rank=res.per_user["rank"],
            calls=model.item_calls,
            ndcg=res.metrics["ndcg@20"],
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process(tmp_path):
    """Two gloo ranks (no torchrun inside pytest: torch.multiprocessing.spawn + file init)."""
    import torch.multiprocessing as mp

    built = random_dataset(tmp_path / "b", n_users=37, n_items=41, seed=3)
    table = np.random.default_rng(0).normal(size=(41, 8)).astype(np.float32)
    single = evaluate(
        TableModel(table, normalize=True, mode="mean"), built, small_cfg(ks=(1, 5, 20)), "test", progress=False
    )
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(built.dir), str(tmp_path), table), nprocs=2, join=True)
    for r in range(2):
        z = np.load(tmp_path / f"rank{r}.npz")
        assert z["users"].tolist() == single.users.tolist()  # every rank has the full result
        assert z["rank"].tolist() == single.per_user["rank"].tolist()
        assert float(z["ndcg"]) == pytest.approx(single.metrics["ndcg@20"])
        assert int(z["calls"]) == 20  # 40 real items split over 2 ranks: each encodes half


def test_evaluation_and_export_share_one_item_encoding(tmp_path):
    """Whichever of `evaluate` and `export` runs first for a checkpoint encodes the items; the
    other reads the cached table (same key: weights + item table + item-text settings)."""
    from hllm.serving.export import export_model

    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = _cfg(tmp_path)
    ck = tmp_path / "runs" / "r" / "best"
    model = TableModel(TABLE)
    _save(model, ck)
    evaluate(model, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert model.item_calls == 6
    res = export_model(model, built, cfg, tmp_path / "exp", progress=False, checkpoint_dir=ck)
    assert model.item_calls == 6 and res.items_encoded == 0
    assert res.manifest["refresh"]["reused_from"] == {"previous_export": 0, "evaluation_cache": 6}
    np.testing.assert_array_equal(np.load(tmp_path / "exp" / "item_embeddings.npy"), TABLE[1:])

    # the other order, on a second checkpoint: the export leaves its table for the evaluation
    model2 = TableModel(TABLE * 3)
    ck2 = tmp_path / "runs" / "r2" / "best"
    _save(model2, ck2)
    res = export_model(model2, built, cfg, tmp_path / "exp2", progress=False, checkpoint_dir=ck2)
    assert model2.item_calls == 6 and res.items_encoded == 6
    ev = evaluate(model2, built, cfg, "test", checkpoint_dir=ck2, progress=False)
    assert model2.item_calls == 6
    assert ev.metrics == evaluate(model2, built, cfg, "test", progress=False).metrics


def test_id_table_models_are_not_cached(tmp_path):
    """A table lookup (SASRec, popularity) costs less than the cache: nothing is written."""
    from hllm.models import pop

    built = make_built(tmp_path / "b", SEQS, n_items=7)
    cfg = _cfg(tmp_path)
    model = pop.build(cfg, built)
    ck = tmp_path / "runs" / "pop" / "best"
    _save(model, ck)
    evaluate(model, built, cfg, "test", checkpoint_dir=ck, progress=False)
    assert _cache_files(cfg) == []
