"""End to end on real checkpoints: `hllm train` path -> `hllm evaluate` / `hllm export` / `hllm recommend`.

Tiny real models (random BERT item tower + tiny Llama user tower for HLLM,
SASRec, popularity) trained for a few steps by ``hllm.train.train``; the CLI
runs in-process through typer's runner.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hllm import metrics as M
from hllm.data.artifacts import eval_split, load_built

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hllm.testing import synthetic_lists, tiny_bert, tiny_config, write_built
    from hllm.train import train

    tmp = tmp_path_factory.mktemp("e2e")
    items, seqs = synthetic_lists(n_users=50, n_items=70, seed=5)
    built = write_built(tmp / "built", items, seqs)
    bert = tiny_bert(tmp / "bert")
    runs = {}
    for kind in ("hllm", "sasrec", "pop"):
        cfg = tiny_config(tmp, bert, built, **{"model.kind": kind, "train.max_steps": 4, "train.run_name": kind,
                                                "model.sasrec_dim": 16, "paths.reports_dir": str(tmp / "reports"),
                                                "paths.export_dir": str(tmp / "exports")})
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


@pytest.mark.parametrize("kind", ["hllm", "sasrec", "pop"])
def test_evaluate_cli_writes_the_evaluators_numbers(trained, kind):
    from hllm.checkpoint import load_model
    from hllm.evaluate import evaluate

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
        from hllm.evaluate import item_cache_dir

        assert len(list(item_cache_dir(cfg).glob("*.npy"))) == 1  # cached once, outside the checkpoint
        # the training loop's last validation used the same evaluator on the same weights
        assert result.best_value == pytest.approx(json.loads(
            (tmp / "reports" / "eval" / kind / "valid" / "metrics.json").read_text())["metrics"]["ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("kind", ["hllm", "sasrec"])
def test_recommend_reproduces_test_metrics(trained, kind):
    """predict-equals-eval on a real checkpoint: the metrics recomputed from the
    served top-K lists equal `hllm evaluate`'s, for every test user; and the
    `hllm recommend` command prints the same lists."""
    from hllm.evaluate import evaluate_checkpoint
    from hllm.recommend import Recommender

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
    out = json.loads(_cli("recommend", "--export", str(exp), "--history", ",".join(histories[r]), "-k", str(kmax),
                          "--json", "--params", str(params)))
    assert [x["item_id"] for x in out] == [rec.item_ids[i] for i in rows[r] if i >= 0]
    uid = str(built.user_ids[0])
    out = json.loads(_cli("recommend", "--export", str(exp), "--user", uid, "-k", "5", "--json", "--params", str(params)))
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
