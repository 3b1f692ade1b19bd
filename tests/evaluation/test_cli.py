"""End to end on real checkpoints: `hllm train` path -> `hllm evaluate` / `hllm export` / `hllm recommend`.

Tiny real models (random BERT item tower + tiny Llama user tower for HLLM,
SASRec, GRU4Rec, popularity) trained for a few steps by ``hllm.training.trainer.train``; the CLI
runs in-process through typer's runner.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hllm.data.dataset import eval_split, load_built
from hllm.evaluation import metrics as M

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hllm.testing import synthetic_lists, tiny_bert, tiny_config, write_built
    from hllm.training.trainer import train

    tmp = tmp_path_factory.mktemp("e2e")
    items, seqs = synthetic_lists(n_users=50, n_items=70, seed=5)
    built = write_built(tmp / "built", items, seqs)
    bert = tiny_bert(tmp / "bert")
    runs = {}
    for kind in ("hllm", "sasrec", "gru4rec", "pop"):
        cfg = tiny_config(
            tmp,
            bert,
            built,
            **{
                "model.kind": kind,
                "train.max_steps": 4,
                "train.run_name": kind,
                "model.sasrec_dim": 16,
                "model.gru4rec_dim": 16,
                "model.gru4rec_hidden": 24,
                "paths.reports_dir": str(tmp / "reports"),
                "paths.export_dir": str(tmp / "exports"),
            },
        )
        runs[kind] = (cfg, train(cfg, progress=False))
    return tmp, runs


def _params(tmp, cfg):
    """The run's config as a params.yaml, so the CLI sees the same protocol and paths."""
    from hllm.config import save_config

    p = tmp / "params.yaml"
    save_config(cfg, p)
    return p


def _cli(*args):
    from hllm.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout  # logs go to stderr


@pytest.mark.parametrize("kind", ["hllm", "sasrec", "gru4rec", "pop"])
def test_evaluate_cli_writes_the_evaluators_numbers(trained, kind):
    from hllm.evaluation.evaluate import evaluate
    from hllm.models.loading import load_model

    tmp, runs = trained
    cfg, result = runs[kind]
    ckpt = result.best_checkpoint
    out = _cli("evaluate", "--checkpoint", str(ckpt), "--split", "both", "--params", str(_params(tmp, cfg)))
    assert "| valid |" in out and "| test |" in out
    model, _, built = load_model(ckpt)
    for split in ("valid", "test"):
        saved = json.loads((tmp / "reports" / "eval" / kind / split / "metrics.json").read_text())
        direct = evaluate(model, built, cfg, split, progress=False)
        assert saved["metrics"] == pytest.approx(direct.metrics, abs=1e-12)
        assert saved["protocol_hash"] == direct.protocol_hash
        with np.load(tmp / "reports" / "eval" / kind / split / "per_user.npz") as z:
            assert z["users"].tolist() == direct.users.tolist()
            assert z["ndcg@10"] == pytest.approx(direct.per_user["ndcg@10"])
    if kind == "hllm":
        from hllm.evaluation.item_cache import item_cache_dir

        assert len(list(item_cache_dir(cfg).glob("*.npy"))) == 1  # cached once, outside the checkpoint
        # the training loop's last validation used the same evaluator on the same weights
        assert result.best_value == pytest.approx(
            json.loads((tmp / "reports" / "eval" / kind / "valid" / "metrics.json").read_text())["metrics"]["ndcg@10"],
            abs=1e-6,
        )


@pytest.mark.parametrize("kind", ["hllm", "sasrec", "gru4rec"])
def test_recommend_reproduces_test_metrics(trained, kind):
    """predict-equals-eval on a real checkpoint: the metrics recomputed from the
    served top-K lists equal `hllm evaluate`'s, for every test user; and the
    `hllm recommend` command prints the same lists."""
    from hllm.evaluation.evaluate import evaluate_checkpoint
    from hllm.serving.recommend import Recommender

    tmp, runs = trained
    cfg, result = runs[kind]
    ckpt = result.best_checkpoint
    params = _params(tmp, cfg)
    _cli("export", "--checkpoint", str(ckpt), "--params", str(params))
    exp = tmp / "exports" / kind
    man = json.loads((exp / "manifest.json").read_text())
    assert man["model"]["kind"] == kind and man["model"]["checkpoint"] == str(ckpt.resolve())

    res = evaluate_checkpoint(ckpt, cfg, ("test",), progress=False)["test"]
    rec = Recommender.from_export(exp, checkpoint=ckpt)
    built = load_built(cfg.paths.built_dir)
    es = eval_split(built.sequences, "test", cfg.eval.protocol.max_history)
    histories = [[built.item_ids[i] for i in es.full_history.of(r)] for r in range(len(es.users))]
    kmax = max(cfg.eval.protocol.ks)
    rows, _ = rec.for_histories(histories, k=kmax)
    ranks = M.ranks_from_topk(rows, es.targets - 1)
    served = M.mean_metrics(M.per_user_metrics(ranks, cfg.eval.protocol.ks))
    assert served == pytest.approx(res.metrics, abs=1e-12)

    # the command line returns the same list as the library for a user and for a history
    r = 3
    out = json.loads(
        _cli(
            "recommend",
            "--export",
            str(exp),
            "--history",
            ",".join(histories[r]),
            "-k",
            str(kmax),
            "--json",
            "--params",
            str(params),
        )
    )
    assert [x["item_id"] for x in out] == [rec.item_ids[i] for i in rows[r] if i >= 0]
    uid = str(built.user_ids[0])
    out = json.loads(
        _cli("recommend", "--export", str(exp), "--user", uid, "-k", "5", "--json", "--params", str(params))
    )
    assert [x["item_id"] for x in out] == [x.item_id for x in rec.for_user(uid, 5)]
    assert not {x["item_id"] for x in out} & set(rec.seen(uid))
    table = _cli("recommend", "--export", str(exp), "--user", uid, "-k", "3", "--params", str(params))
    assert out[0]["item_id"] in table and out[0]["title"] in table


def test_cli_errors_are_clear(trained, tmp_path):
    from hllm.cli import app

    tmp, runs = trained
    cfg, _ = runs["pop"]
    params = _params(tmp, cfg)
    r = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--params", str(params)])
    assert r.exit_code == 1 and "not a checkpoint" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--split", "train", "--params", str(params)])
    assert r.exit_code == 2 and "--split" in r.output
    _cli("export", "--params", str(params))  # default checkpoint: runs/pop/best
    r = CliRunner().invoke(app, ["recommend", "--user", "nobody", "--params", str(params)])
    assert r.exit_code == 1 and "user 'nobody' is not in export" in r.output
    r = CliRunner().invoke(app, ["recommend", "--params", str(params)])
    assert r.exit_code == 2 and "exactly one of --user or --history" in r.output


# --------------------------------------------------------------------------- a changed catalogue


def grow_catalogue(old_dir, out_dir, n_new: int = 3):
    """The next snapshot of ``old_dir``: every old item renumbered (reversed idx order, as a rebuild
    whose first appearances moved would), one title changed, ``n_new`` new items, and new users
    whose histories use them. Returns (out_dir, changed item id, new item ids, new user ids)."""
    import pandas as pd

    from hllm.testing import write_built

    old = load_built(old_dir)
    tbl = pd.read_parquet(old.dir / "items.parquet").sort_values("idx")
    body = tbl[tbl["idx"] != 0].iloc[::-1].reset_index(drop=True)
    changed = str(body.loc[5, "item_id"])
    body.loc[5, "title"] = body.loc[5, "title"] + " (remastered)"
    fresh = [f"new{j:03d}" for j in range(n_new)]
    rows = [{k: str(v) for k, v in r.items() if k != "idx"} for r in body.to_dict("records")]
    rows += [
        {"item_id": x, "title": f"classic hiking {x}", "tag": "hiking", "description": "a map for hiking"}
        for x in fresh
    ]
    items = [{"idx": i + 1, **r} for i, r in enumerate(rows)]
    new_idx = {r["item_id"]: r["idx"] for r in items}
    seqs = [[new_idx[str(old.item_ids[i])] for i in old.sequences.of(u)] for u in range(old.sequences.n_users)]
    seqs += [
        [new_idx[fresh[j % n_new]] for j in range(u, u + 4)] + [new_idx[changed], new_idx[fresh[u % n_new]]]
        for u in range(4)
    ]
    new = write_built(out_dir, items, seqs)
    users = [f"u{u:05d}" for u in range(len(seqs) - 4, len(seqs))]
    return new, changed, fresh, users


class ItemForwards:
    """Counts the items that go through any Item LLM (a global forward hook: no mock)."""

    def __enter__(self):
        import torch

        from hllm.models.item_llm import ItemLLM

        self.items = 0

        def hook(module, args, output):
            if isinstance(module, ItemLLM):
                self.items += len(args[0])

        self._h = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()


def test_hllm_checkpoint_scores_and_exports_a_changed_catalogue(trained, tmp_path):
    """An HLLM checkpoint embeds items from their text, so it evaluates, exports (encoding only the
    new/changed items) and recommends over a grown, renumbered catalogue; the evaluation and the
    export of one checkpoint share one item encoding; ID models refuse the new catalogue."""
    import shutil

    import torch

    from hllm.cli import app
    from hllm.evaluation.evaluate import evaluate
    from hllm.evaluation.item_cache import item_cache_dir, item_embedding_table
    from hllm.models.loading import load_model

    tmp, runs = trained
    cfg, result = runs["hllm"]
    ckpt = result.best_checkpoint
    params = _params(tmp_path, cfg)
    shutil.rmtree(item_cache_dir(cfg), ignore_errors=True)  # other tests of this module may have filled it
    old = load_built(cfg.paths.built_dir)
    n_old = old.n_items - 1
    exp = tmp_path / "exp"

    # evaluate, then export the same checkpoint: the export reads the evaluation's item table
    with ItemForwards() as f:
        _cli("evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev_old"), "--params", str(params))
    assert f.items == n_old
    with ItemForwards() as f:
        out = _cli("export", "--checkpoint", str(ckpt), "--out", str(exp), "--params", str(params))
    assert f.items == 0 and f"exported {n_old} items (0 encoded, {n_old} reused)" in out
    man = json.loads((exp / "manifest.json").read_text())
    assert man["refresh"]["reused_from"] == {"previous_export": 0, "evaluation_cache": n_old}
    model, _, _ = load_model(ckpt)
    with torch.no_grad():
        fresh_old = item_embedding_table(model, old.n_items, 64, progress=False).numpy()
    np.testing.assert_allclose(np.load(exp / "item_embeddings.npy"), fresh_old[1:], rtol=1e-5, atol=1e-6)

    # the next day's catalogue: renumbered, one changed text, new items and users
    new, changed, fresh_ids, new_users = grow_catalogue(cfg.paths.built_dir, tmp_path / "built_new")
    with ItemForwards() as f:
        out = _cli("export", "--checkpoint", str(ckpt), "--built", str(new), "--out", str(exp), "--params", str(params))
    nb = load_built(new)
    assert nb.n_items - 1 == n_old + len(fresh_ids)
    assert f.items == len(fresh_ids) + 1  # only the new items and the changed one went through the Item LLM
    assert f"({len(fresh_ids) + 1} encoded, {n_old - 1} reused)" in out
    man = json.loads((exp / "manifest.json").read_text())
    assert man["counts"]["items"] == nb.n_items - 1 and man["data"]["built_dir"] == str(new)
    # rows are matched by item id, not idx: the export equals encoding the new catalogue from scratch
    model_new, _, built_new = load_model(ckpt, built_dir=new)
    with torch.no_grad():
        full = item_embedding_table(model_new, built_new.n_items, 64, progress=False).numpy()
    np.testing.assert_allclose(np.load(exp / "item_embeddings.npy"), full[1:], rtol=1e-5, atol=1e-6)

    # evaluating on the new data reads the table the export left in the cache
    with ItemForwards() as f:
        _cli(
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--built",
            str(new),
            "--out",
            str(tmp_path / "ev_new"),
            "--params",
            str(params),
        )
    assert f.items == 0
    saved = json.loads((tmp_path / "ev_new" / "test" / "metrics.json").read_text())
    direct = evaluate(model_new, built_new, cfg, "test", progress=False)
    assert saved["n_items"] == built_new.n_items and saved["n_users"] == direct.n_users
    assert saved["metrics"] == pytest.approx(direct.metrics, abs=1e-9)

    # recommend over the new export: a new user (history of new items), and a history of new items
    from hllm.serving.recommend import Recommender

    rec = Recommender.from_export(exp, checkpoint=ckpt)
    got = json.loads(
        _cli("recommend", "--export", str(exp), "--user", new_users[0], "-k", "5", "--json", "--params", str(params))
    )
    assert [g["item_id"] for g in got] == [r.item_id for r in rec.for_user(new_users[0], 5)]
    assert not {g["item_id"] for g in got} & set(rec.seen(new_users[0])) and set(rec.seen(new_users[0])) & set(
        fresh_ids
    )
    hist = [fresh_ids[0], changed, fresh_ids[1]]
    got = json.loads(
        _cli(
            "recommend",
            "--export",
            str(exp),
            "--history",
            ",".join(hist),
            "-k",
            "5",
            "--json",
            "--checkpoint",
            str(ckpt),
            "--params",
            str(params),
        )
    )
    want = rec.for_history(hist, 5)
    assert (
        [g["item_id"] for g in got] == [r.item_id for r in want]
        and len(want) == 5
        and not set(hist) & {r.item_id for r in want}
    )

    # ID models are sized and indexed by their training catalogue: a clear refusal, not garbage
    for kind in ("sasrec", "pop"):
        kcfg, kres = runs[kind]
        r = CliRunner().invoke(
            app,
            [
                "evaluate",
                "--checkpoint",
                str(kres.best_checkpoint or kres.last_checkpoint),
                "--built",
                str(new),
                "--params",
                str(_params(tmp_path, kcfg)),
            ],
        )
        assert r.exit_code == 1 and "cannot score this catalogue" in r.output and "retrain" in r.output, r.output


def test_id_model_refuses_a_renumbered_catalogue_of_the_same_size(trained, tmp_path):
    """Same items, other idx order: the count matches, the rows of an ID table would not."""
    import pandas as pd

    from hllm.models.loading import load_model
    from hllm.testing import write_built

    tmp, runs = trained
    cfg, res = runs["sasrec"]
    old = load_built(cfg.paths.built_dir)
    tbl = pd.read_parquet(old.dir / "items.parquet").sort_values("idx")
    body = tbl[tbl["idx"] != 0].iloc[::-1]
    items = [
        {"idx": i + 1, **{k: str(v) for k, v in r.items() if k != "idx"}} for i, r in enumerate(body.to_dict("records"))
    ]
    new_idx = {r["item_id"]: r["idx"] for r in items}
    seqs = [[new_idx[str(old.item_ids[i])] for i in old.sequences.of(u)] for u in range(old.sequences.n_users)]
    same_size = write_built(tmp_path / "renumbered", items, seqs)
    with pytest.raises(ValueError, match="same number of items .* other item ids or another idx order"):
        load_model(res.best_checkpoint, built_dir=same_size)
    load_model(runs["hllm"][1].best_checkpoint, built_dir=same_size)  # a text tower does not care


def test_retrained_user_tower_does_not_re_encode_items(trained, tmp_path):
    """Refresh keys on the item tower only (HLLM.item_state_prefixes): new User LLM weights reuse the
    exported item embeddings; new Item LLM weights re-encode everything."""
    import shutil

    from safetensors.torch import load_file, save_file

    tmp, runs = trained
    cfg, result = runs["hllm"]
    ckpt = result.best_checkpoint
    params = _params(tmp_path, cfg)
    exp = tmp_path / "exp"
    _cli(
        "export",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(exp),
        "--params",
        str(params),
        "--set",
        "eval.item_cache=false",
    )
    users_before = np.load(exp / "user_embeddings.npy")
    n = json.loads((exp / "manifest.json").read_text())["counts"]["items"]

    def variant(name, prefix):
        d = tmp_path / name
        d.mkdir()
        shutil.copy2(ckpt / "meta.json", d / "meta.json")
        sd = load_file(str(ckpt / "model.safetensors"))
        key = next(k for k in sorted(sd) if k.startswith(prefix) and sd[k].is_floating_point() and sd[k].ndim == 2)
        sd[key] = sd[key] * 1.5
        save_file(sd, str(d / "model.safetensors"))
        # a retrained checkpoint records the digest of its own weights, as save_checkpoint does
        from hllm.data.dataset import file_digest

        meta = json.loads((d / "meta.json").read_text())
        meta.setdefault("files", {})["model.safetensors"] = file_digest(d / "model.safetensors")
        (d / "meta.json").write_text(json.dumps(meta))
        return d

    with ItemForwards() as f:
        out = _cli(
            "export",
            "--checkpoint",
            str(variant("user_only", "user.")),
            "--out",
            str(exp),
            "--params",
            str(params),
            "--set",
            "eval.item_cache=false",
        )
    assert f.items == 0 and f"(0 encoded, {n} reused)" in out
    assert not np.allclose(np.load(exp / "user_embeddings.npy"), users_before)  # the new user tower was used

    with ItemForwards() as f:
        out = _cli(
            "export",
            "--checkpoint",
            str(variant("item_changed", "item.")),
            "--out",
            str(exp),
            "--params",
            str(params),
            "--set",
            "eval.item_cache=false",
        )
    assert f.items == n and f"({n} encoded, 0 reused)" in out
