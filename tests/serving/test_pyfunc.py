"""The registered pyfunc: loaded by alias in a fresh process, it answers exactly like `hllm recommend`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hllm.data import versioning
from hllm.ops import registry, tracking
from tests.helpers.reghelpers import log_trained

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
uri, k, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = mlflow.pyfunc.load_model(uri)
out = model.predict(pd.DataFrame(requests), params={"k": k})
print("RESULT" + json.dumps(out.to_dict("records")))
"""


def predict_in_fresh_process(uri: str, k: int, requests: list[dict], env: dict | None = None) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, uri, str(k), json.dumps(requests)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def hllm_recommend(*args: str) -> list[dict]:
    """`hllm recommend --json ...`, in-process (a second fresh process would only add start-up time)."""
    from typer.testing import CliRunner

    from hllm.cli import app

    r = CliRunner().invoke(app, ["recommend", "--json", *args])
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_champion_pyfunc_matches_hllm_recommend(cfg, tiny, tmp_path):
    run_id, v = log_trained(cfg, tiny, "hllm")
    assert registry.promote(cfg, v).action == "champion"
    name = cfg.registry.model_name
    # a retried registration returns the same version and leaves the model alone
    again = registry.register_model(cfg, run_id, tiny["hllm"]["export"], tiny["hllm"]["checkpoint"])
    assert str(again.version) == v and len(registry.list_versions(cfg)) == 1
    exp = tiny["hllm"]["export"]
    ckpt = tiny["hllm"]["checkpoint"]

    # what the version holds: safetensors weights, configs and tokenizer, no pickle, pinned requirements
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{v}", dst_path=str(tmp_path / "m")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/checkpoint/model.safetensors" in files and "artifacts/export/items.faiss" in files
    assert "artifacts/hf_item/tokenizer.json" in files and "code/hllm/serving/pyfunc.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    assert not [f for f in files if f.startswith("artifacts/hf_item/") and f.endswith(".safetensors")]
    reqs = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in reqs and all("==" in r for r in reqs)
    mlmodel = (local / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel and "signature" in mlmodel
    assert (local / "input_example.json").is_file()

    users = pd.read_parquet(exp / "users.parquet")["user_id"].tolist()
    items = pd.read_parquet(exp / "items.parquet")["item_id"].tolist()
    history = items[3:7]
    requests = [
        {"user_id": users[0], "history": None},
        {"user_id": None, "history": history},
        {"user_id": users[5], "history": None},
    ]
    got = predict_in_fresh_process(
        f"models:/{name}@champion", 5, requests, env={"MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri}
    )

    # `hllm recommend` for the history request, which needs the User LLM
    want = hllm_recommend("--history", ",".join(history), "--export", str(exp), "--checkpoint", str(ckpt), "-k", "5")
    assert got[1]["item_ids"] == [w["item_id"] for w in want] and len(want) == 5
    assert got[1]["scores"] == pytest.approx([w["score"] for w in want], abs=1e-6)

    # the user requests against the Recommender `hllm recommend --user` wraps
    from hllm.serving.pyfunc import recommend_rows
    from hllm.serving.recommend import Recommender

    rec = Recommender.from_export(exp)
    for row, u in ((got[0], users[0]), (got[2], users[5])):
        want = rec.for_user(u, 5)
        assert row["item_ids"] == [r.item_id for r in want] and len(want) == 5
        assert row["scores"] == pytest.approx([r.score for r in want], abs=1e-6)
        assert set(row["item_ids"]).isdisjoint(rec.seen(u))  # seen items are excluded

    # a request with neither field is a clear error, not an empty answer
    with pytest.raises(ValueError, match="row 0: give a user_id or a non-empty history"):
        recommend_rows(rec, pd.DataFrame([{"user_id": None, "history": []}]), 3)


def test_registering_a_mismatched_checkpoint_is_refused(cfg, tiny):
    run_id, _ = log_trained(cfg, tiny, "hllm", register=False)
    with pytest.raises(ValueError, match="not the one export"):
        registry.register_model(cfg, run_id, tiny["hllm"]["export"], tiny["pop"]["checkpoint"])
    with pytest.raises(FileNotFoundError, match="not an export"):
        registry.register_model(cfg, run_id, tiny["hllm"]["checkpoint"], None)
    assert registry.list_versions(cfg) == []
    c = tracking.client(cfg)
    assert not c.list_artifacts(run_id, "model")


@pytest.mark.slow
def test_reevaluate_champion_on_new_data_unblocks_the_gate(cfg, tiny, tmp_path):
    """Nightly: the data moved on, so the new candidate cannot be compared with the champion until
    the champion is evaluated on the new data, from its registered bundle."""
    import copy

    import numpy as np

    from hllm import testing
    from hllm.evaluation.evaluate import evaluate_checkpoint

    _, v1 = log_trained(cfg, tiny, "hllm")
    registry.promote(cfg, v1)
    # new snapshot: same catalogue, every user has one more interaction
    rng = np.random.default_rng(1)
    new_built = testing.write_built(
        tmp_path / "built_new",
        tiny["items"],
        [s + [int(rng.integers(1, len(tiny["items"]) + 1))] for s in tiny["seqs"]],
    )
    new = copy.deepcopy(tiny)
    for kind in ("hllm", "pop"):
        new[kind]["cfg"].paths.built_dir = str(new_built)
    new["pop"]["eval"] = evaluate_checkpoint(
        tiny["pop"]["checkpoint"], new["pop"]["cfg"], ("test",), built_dir=new_built, progress=False
    )["test"]
    _, v2 = log_trained(cfg, new, "pop")
    with pytest.raises(registry.PromotionRefused, match="dataset version differs.*hllm registry reevaluate"):
        registry.promote(cfg, v2)

    on_new = copy.deepcopy(cfg)
    on_new.paths.built_dir = str(new_built)
    on_new.eval = new["hllm"]["cfg"].eval
    art = registry.reevaluate(on_new)
    dv = versioning.data_version(on_new).version
    assert art.endswith(dv)
    want = evaluate_checkpoint(tiny["hllm"]["checkpoint"], on_new, ("test",), built_dir=new_built, progress=False)[
        "test"
    ]
    c = tracking.client(cfg)
    champ = c.get_model_version(cfg.registry.model_name, v1)
    local = Path(tracking_download(champ.run_id, art, tmp_path / "dl"))
    got = json.loads((local / "metrics.json").read_text())["metrics"]
    assert got == pytest.approx(want.metrics, abs=1e-6)
    # the champion run's own metrics stay those of its training data
    assert c.get_run(champ.run_id).data.metrics["test/ndcg_at_10"] == pytest.approx(
        tiny["hllm"]["eval"].metrics["ndcg@10"]
    )

    # now the gate compares the two on the new data (whatever it decides, it is not a data refusal)
    try:
        res = registry.promote(cfg, v2)
        assert res.gate.data_version == dv and res.gate.champion == pytest.approx(want.metrics["ndcg@10"], abs=1e-6)
    except registry.PromotionRefused as e:
        assert "differs" not in str(e) and e.gate.champion == pytest.approx(want.metrics["ndcg@10"], abs=1e-6)


@pytest.mark.slow
def test_reevaluate_hllm_champion_on_a_changed_catalogue(cfg, tiny, tmp_path):
    """The nightly case "the catalogue changed": new items, a retired one, every idx renumbered. An
    HLLM champion embeds items from their text, so it is re-evaluated on the new catalogue (its
    bundle's weights over today's token cache) and the gate can compare; an ID-based champion
    (popularity) cannot, and says so."""
    import copy

    from hllm import testing
    from hllm.evaluation.evaluate import evaluate_checkpoint

    _, v_hllm = log_trained(cfg, tiny, "hllm")
    registry.promote(cfg, v_hllm)
    _, v_pop = log_trained(cfg, tiny, "pop")
    retired = tiny["items"][-1]["item_id"]
    rows = [it for it in tiny["items"] if it["item_id"] != retired][::-1]  # renumbered
    rows += [
        {"item_id": f"new{j}", "title": f"classic coffee mug {j}", "tag": "coffee", "description": "a mug for coffee"}
        for j in range(3)
    ]
    items = [{**{k: v for k, v in it.items() if k != "idx"}, "idx": i + 1} for i, it in enumerate(rows)]
    new_idx = {it["item_id"]: it["idx"] for it in items}
    old_ids = {it["idx"]: it["item_id"] for it in tiny["items"]}
    seqs = [
        [new_idx[old_ids[i]] for i in s if old_ids[i] != retired] + [new_idx[f"new{u % 3}"]]
        for u, s in enumerate(tiny["seqs"])
    ]
    new_built = testing.write_built(tmp_path / "built_new", items, seqs)
    on_new = copy.deepcopy(cfg)
    on_new.paths.built_dir = str(new_built)
    on_new.eval = tiny["hllm"]["cfg"].eval

    art = registry.reevaluate(on_new)
    assert art.endswith(versioning.data_version(on_new).version)
    want = evaluate_checkpoint(tiny["hllm"]["checkpoint"], on_new, ("test",), built_dir=new_built, progress=False)[
        "test"
    ]
    assert want.n_items == len(items) + 1 != len(tiny["items"]) + 1
    c = tracking.client(cfg)
    local = Path(tracking_download(c.get_model_version(cfg.registry.model_name, v_hllm).run_id, art, tmp_path / "dl"))
    saved = json.loads((local / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(want.metrics, abs=1e-6)

    with pytest.raises(
        registry.RegistryError, match=f"version {v_pop} cannot be evaluated.*cannot score this catalogue.*retrain"
    ):
        registry.reevaluate(on_new, v_pop)


def tracking_download(run_id: str, path: str, dst: Path) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))


def test_the_import_line_of_registered_versions_stays_valid():
    """Every registered version runs ``from hllm.serving import HLLMRecommenderModel`` (its bundled
    models-from-code entry point, written by versions before and after the move of hllm/serving.py into
    hllm/serving/pyfunc.py): the line must keep working, and importing the export code must not pull in
    MLflow (training and export run without the tracking stack)."""
    import subprocess
    import sys

    from hllm.serving import pyfunc

    assert "from hllm.serving import HLLMRecommenderModel" in pyfunc._MODEL_CODE
    code = (
        "import sys; import hllm.serving.export; assert 'mlflow' not in sys.modules, 'export imported mlflow'; "
        "from hllm.serving import HLLMRecommenderModel; from hllm.serving.pyfunc import HLLMRecommenderModel as P; "
        "assert HLLMRecommenderModel is P; import mlflow.pyfunc; assert issubclass(P, mlflow.pyfunc.PythonModel)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
