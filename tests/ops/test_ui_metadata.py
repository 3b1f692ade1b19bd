"""What the MLflow UI shows first, asserted through the MLflow API on a real SQLite store: the kind of
every experiment the project creates, the nightly parent run's metrics/tags/description, and the
descriptions of registered versions (registration, first champion, challenger, refusal)."""

from __future__ import annotations

import numpy as np
import pytest

from flows.report import ModelRow, RunReport
from hllm.ops import registry, tracking
from tests.helpers.reghelpers import make_version

KIND = {tracking.TAG_EXPERIMENT_KIND: tracking.EXPERIMENT_KIND}
BASE = np.random.default_rng(11).uniform(0.0, 1.0, 200)


def _kind(client, exp_id: str) -> str | None:
    return client.get_experiment(exp_id).tags.get(tracking.TAG_EXPERIMENT_KIND)


def test_every_experiment_the_project_creates_opens_on_the_runs_table(cfg):
    c = tracking.client(cfg)  # creates the training/nightly experiment `tracking.experiment`
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    assert _kind(c, exp.experiment_id) == tracking.EXPERIMENT_KIND
    with tracking.start_run(cfg, "train-run") as tr:
        pass
    assert c.get_run(tr.run_id).info.experiment_id == exp.experiment_id
    registry.record(cfg, {"action": "test"})  # the registry audit experiment
    audit = c.get_experiment_by_name(cfg.registry.audit_experiment)
    assert _kind(c, audit.experiment_id) == tracking.EXPERIMENT_KIND
    ab = tracking.configure(cfg, f"{cfg.tracking.experiment}-ab")  # as hllm.abtest.analysis does
    assert _kind(c, ab) == tracking.EXPERIMENT_KIND

    # an experiment made before (or by someone else) gets the tag; a kind chosen in the UI stays
    old = c.create_experiment(f"{cfg.tracking.experiment}-old")
    assert _kind(c, old) is None
    assert tracking.configure(cfg, f"{cfg.tracking.experiment}-old") == old
    assert _kind(c, old) == tracking.EXPERIMENT_KIND
    mine = c.create_experiment(f"{cfg.tracking.experiment}-genai", tags={tracking.TAG_EXPERIMENT_KIND: "finetuning"})
    tracking.configure(cfg, f"{cfg.tracking.experiment}-genai")
    assert _kind(c, mine) == "finetuning"


def _report(cfg, parent: str, runs: dict[str, str], accepted: bool | None) -> RunReport:
    m = lambda x: {"recall@10": x + 0.1, "ndcg@10": x, "recall@5": x, "ndcg@5": x / 2}  # noqa: E731
    return RunReport(
        flow_run_id="fr-1",
        run_name="nightly-20261201-020000-abcd1234",
        status="COMPLETED",
        model_name=cfg.registry.model_name,
        registered_version="2",
        alias="challenger" if accepted else None,
        promotion="version 2 is the challenger" if accepted else "version 2 not promoted to challenger: worse",
        promotion_accepted=accepted,
        protocol_hash="proto1",
        ks=[5, 10],
        tracking_uri=cfg.tracking.tracking_uri,
        experiment_id=tracking.configure(cfg),
        parent_run_id=parent,
        run_ids=runs,
        data={"data_version": "dv-1", "dvc_md5": "m.dir"},
        models=[
            ModelRow("HLLM (this run)", "hllm", m(0.3), runs["HLLM"]),
            ModelRow("champion v1", "hllm", m(0.25), "champion-run"),
            ModelRow("SASRec", "sasrec", m(0.2), runs["SASRec"]),
            ModelRow("popularity", "pop", m(0.05), runs["popularity"]),
        ],
    )


def test_nightly_parent_run_carries_metrics_outcome_and_summary(cfg, monkeypatch):
    """`_finish` (what every nightly run ends with) on real runs: Compare works on parent runs alone."""
    import prefect.artifacts

    from flows import nightly

    artifacts: list[dict] = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: artifacts.append(kw))
    parent = tracking.open_run(cfg, "nightly-20261201-020000-abcd1234", kind="flow", log_data=False).run_id
    assert parent is not None
    runs = {}
    for label, kind in (("HLLM", "hllm"), ("SASRec", "sasrec"), ("popularity", "pop")):
        tr = tracking.open_run(cfg, f"nightly-x-{kind}", parent, kind="train", log_data=False)
        tr.finish()
        runs[label] = str(tr.run_id)
    report = _report(cfg, parent, runs, accepted=True)
    nightly._finish(cfg, report, parent, [])

    c = tracking.client(cfg)
    run = c.get_run(parent)
    assert run.info.status == "FINISHED"
    met = run.data.metrics
    assert met["hllm/test/ndcg_at_10"] == pytest.approx(0.3) and met["hllm/test/recall_at_10"] == pytest.approx(0.4)
    assert met["champion/test/ndcg_at_10"] == pytest.approx(0.25)
    assert met["sasrec/test/ndcg_at_5"] == pytest.approx(0.1) and met["pop/test/recall_at_5"] == pytest.approx(0.05)
    assert met["promotion/accepted"] == 1.0
    t = run.data.tags
    assert t["hllm.promotion.outcome"] == "challenger" and t["hllm.promotion.alias"] == "challenger"
    assert t["hllm.flow_status"] == "COMPLETED" and t["hllm.registered_version"] == "2"
    assert t[tracking.TAG_NOTE] == report.markdown()
    assert f"[{runs['SASRec']}]({report.run_url(runs['SASRec'])})" in t[tracking.TAG_NOTE]
    # the Prefect artifact is the same markdown, with absolute links to the MLflow runs
    assert artifacts and artifacts[0]["markdown"] == report.markdown()
    assert f"http://127.0.0.1:5000/#/experiments/{report.experiment_id}/runs/{parent}?workflowType=machine_learning" in artifacts[0]["markdown"]

    note = c.get_run(runs["HLLM"]).data.tags[tracking.TAG_NOTE]
    assert "model kind `hllm`" in note and "data version `dv-1`" in note and "NDCG@10 **30.00 %**" in note
    assert "NDCG@10 **20.00 %**" in c.get_run(runs["SASRec"]).data.tags[tracking.TAG_NOTE]

    refused = _report(cfg, parent, runs, accepted=False)
    assert refused.parent_metrics()["promotion/accepted"] == 0.0
    assert refused.parent_tags()["hllm.promotion.outcome"] == "refused"
    assert refused.parent_tags()["hllm.promotion.alias"] == "none"
    skipped = RunReport(promotion="skipped (promote=false)")
    assert skipped.promotion_outcome() == "skipped" and "promotion/accepted" not in skipped.parent_metrics()
    assert RunReport(status="FAILED").promotion_outcome() == "not run"


def test_note_is_cut_to_mlflows_limit():
    long = "\n".join(f"line {i} " + "x" * 90 for i in range(200))
    cut = tracking.note_text(long)
    assert len(cut) <= tracking.MAX_NOTE_LEN and cut.startswith("line 0 ") and "cut to fit" in cut
    assert tracking.note_text("short") == "short"


def _desc(cfg, v: str) -> str:
    return tracking.client(cfg).get_model_version(cfg.registry.model_name, v).description or ""


def test_version_descriptions_say_where_it_came_from_and_what_the_gate_said(cfg):
    v1 = make_version(cfg, BASE)
    d = _desc(cfg, v1)
    dv = tracking.client(cfg).get_model_version(cfg.registry.model_name, v1).tags[tracking.TAG_DATA_VERSION]
    assert f"data version `{dv}`" in d and "evaluation protocol `" in d
    assert f"NDCG@10 **{100 * BASE.mean():.2f} %**" in d
    registry.promote(cfg, v1)
    assert "**first champion**" in _desc(cfg, v1)

    v2 = make_version(cfg, np.clip(BASE + 0.05, 0, 1))
    res = registry.promote(cfg, v2)
    d = _desc(cfg, v2)
    assert "**challenger** with 10% of the traffic against champion v" + v1 in d
    assert f"{res.gate.candidate:.5f}" in d and f"{res.gate.champion:.5f}" in d and "CI of the per-user" in d
    assert "over 200 users" in d and f"data version `{res.gate.data_version}`" in d

    v3 = make_version(cfg, BASE * 0.8)
    with pytest.raises(registry.PromotionRefused):
        registry.promote(cfg, v3)
    mv = tracking.client(cfg).get_model_version(cfg.registry.model_name, v3)
    assert "**refused as challenger**" in mv.description and "worse" in mv.description
    assert mv.tags[registry.TAG_REFUSED].startswith("challenger: candidate is worse")
    assert mv.tags[registry.TAG_REFUSED_AT]
    assert registry.TAG_REFUSED not in tracking.client(cfg).get_model_version(cfg.registry.model_name, v2).tags


def test_version_history_keeps_the_newest_events_within_the_limit():
    d = "head"
    for i in range(100):
        d = registry._with_event(d, f"event {i} " + "y" * 80, limit=1000)
    assert len(d) <= 1000 and d.startswith("head\n\n**History**") and d.endswith("y" * 80)
    assert "event 99 " in d and "event 0 " not in d
