"""Promotion gate, alias moves, rollback, listing and the audit log, on a real SQLite MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hllm.cli import app
from hllm.data import versioning
from hllm.ops import gate as gate_mod
from hllm.ops import registry, tracking
from tests.helpers.reghelpers import make_version

RNG = np.random.default_rng(7)
BASE = RNG.uniform(0.0, 1.0, 200)  # per-user ndcg@10 of the first model


def _aliases(cfg):
    c = tracking.client(cfg)
    return {k: str(v) for k, v in c.get_registered_model(cfg.registry.model_name).aliases.items()}


def _cli(cfg, *args):
    sets = [
        f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"registry.model_name={cfg.registry.model_name}",
        f"registry.audit_experiment={cfg.registry.audit_experiment}",
        f"registry.bootstrap_samples={cfg.registry.bootstrap_samples}",
        f"registry.min_rel_gain={cfg.registry.min_rel_gain}",
    ]
    argv = ["registry", *args]
    for s in sets:
        argv += ["--set", s]
    return CliRunner().invoke(app, argv)


# --------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_ci():
    a = RNG.uniform(0, 1, 500)
    assert gate_mod.paired_bootstrap(a, a, 200, 0.95) == (0.0, 0.0, 0.0)
    mean, lo, hi = gate_mod.paired_bootstrap(a - 0.05, a, 200, 0.95)
    assert mean == pytest.approx(-0.05) and lo == pytest.approx(-0.05) and hi == pytest.approx(-0.05)
    noisy = a + RNG.normal(0, 0.2, 500)
    mean, lo, hi = gate_mod.paired_bootstrap(noisy, a, 300, 0.9, seed=3)
    assert lo < mean < hi and hi - lo > 0.01
    assert gate_mod.paired_bootstrap(noisy, a, 300, 0.9, seed=3) == (mean, lo, hi)  # reproducible
    # blocks: more resamples than one block holds give the same answer shape
    assert gate_mod.paired_bootstrap(noisy[:10], a[:10], 1000, 0.9)[1] < 0.2
    with pytest.raises(ValueError):
        gate_mod.paired_bootstrap(np.zeros(0), np.zeros(0), 10, 0.9)


# --------------------------------------------------------------------------- promotion


def test_first_version_becomes_champion_then_better_is_challenger(cfg):
    v1 = make_version(cfg, BASE)
    res = registry.promote(cfg, v1, reason="bootstrap the registry")
    assert res.action == "champion" and "first champion" in res.message
    assert _aliases(cfg) == {"champion": v1}

    v2 = make_version(cfg, np.clip(BASE + 0.05, 0, 1))
    res = registry.promote(cfg, v2, share=0.2)
    assert res.action == "challenger" and res.gate.ok
    assert res.gate.candidate > res.gate.champion and res.gate.ci_low > 0
    assert _aliases(cfg) == {"champion": v1, "challenger": v2}

    mv = tracking.client(cfg).get_model_version(cfg.registry.model_name, v2)
    t = mv.tags
    assert t["ab.status"] == "running" and float(t["ab.share"]) == 0.2 and t["ab.champion_version"] == v1
    assert t["ab.gate_metric"] == "ndcg@10" and float(t["ab.candidate_value"]) == pytest.approx(res.gate.candidate)
    assert t["ab.start"] and t["alias.challenger.set_by"] == "tester" and t["alias.challenger.set_at"]
    assert "gate passed" in t["alias.challenger.reason"]

    # repeating is a no-op: no alias move, no new audit event
    n_events = len(registry.audit_log(cfg))
    again = registry.promote(cfg, v2)
    assert again.action == "noop" and _aliases(cfg) == {"champion": v1, "challenger": v2}
    assert len(registry.audit_log(cfg)) == n_events
    ev = registry.audit_log(cfg)
    assert [(e["action"], e["alias"], str(e["version"])) for e in ev] == [
        ("promote", "champion", v1),
        ("promote", "challenger", v2),
    ]
    assert ev[1]["actor"] == "tester" and ev[1]["gate"]["n_users"] == 200 and ev[1]["share"] == 0.2


def test_worse_candidate_is_refused_and_nothing_moves(cfg):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    v2 = make_version(cfg, BASE * 0.8)
    with pytest.raises(registry.PromotionRefused) as e:
        registry.promote(cfg, v2)
    msg = str(e.value)
    assert f"version {v2} not promoted" in msg and "worse" in msg and "ndcg@10" in msg
    assert f"{BASE.mean():.5f}" in msg and f"{(BASE * 0.8).mean():.5f}" in msg
    assert _aliases(cfg) == {"champion": v1}
    last = registry.audit_log(cfg)[-1]
    assert last["action"] == "refused" and str(last["version"]) == v2 and "worse" in last["reason"]

    # the CLI says the same and exits 1
    r = _cli(cfg, "promote", v2)
    assert r.exit_code == 1 and "refused" in r.output and "worse" in r.output
    assert _aliases(cfg) == {"champion": v1}


def test_min_rel_gain_and_non_inferiority_margin(cfg):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    # 1% better on average, but 5% required
    v2 = make_version(cfg, BASE * 1.01)
    cfg.registry.min_rel_gain = 0.05
    with pytest.raises(registry.PromotionRefused, match="worse on the gate"):
        registry.promote(cfg, v2)
    # a negative gain is a non-inferiority margin: 2% worse for every user passes the margin, but the
    # paired bootstrap shows it is worse, so it is still refused
    cfg.registry.min_rel_gain = -0.05
    v3 = make_version(cfg, BASE * 0.98)
    with pytest.raises(registry.PromotionRefused, match="bootstrap shows the candidate worse") as e:
        registry.promote(cfg, v3)
    assert e.value.gate.ci_high < 0 and e.value.gate.candidate >= e.value.gate.required
    # same mean loss, but noise on it: the CI spans zero -> passes
    noisy = BASE * 0.995 + RNG.normal(0, 0.05, len(BASE))
    v4 = make_version(cfg, noisy)
    res = registry.promote(cfg, v4)
    assert res.action == "challenger" and res.gate.ci_low < 0 < res.gate.ci_high
    assert _aliases(cfg) == {"champion": v1, "challenger": v4}


def test_different_protocol_or_data_is_refused_until_champion_is_reevaluated(cfg, tmp_path):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    v2 = make_version(cfg, BASE + 0.1, protocol="otherprotocol")
    with pytest.raises(registry.PromotionRefused, match="protocol hash differs") as e:
        registry.promote(cfg, v2)
    assert "otherprotocol" in str(e.value)

    v3 = make_version(cfg, BASE + 0.1, built="data/built2")
    with pytest.raises(registry.PromotionRefused, match="dataset version differs"):
        registry.promote(cfg, v3)
    assert _aliases(cfg) == {"champion": v1}

    # evaluate the champion on the new data and attach it to its run (CLI): now they are comparable
    c = tracking.client(cfg)
    champ = c.get_model_version(cfg.registry.model_name, v1)
    cand = c.get_model_version(cfg.registry.model_name, v3)
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "split": "test",
                "protocol_hash": cand.tags["hllm.protocol_hash"],
                "metrics": {"ndcg@10": float(BASE.mean() * 0.9)},
            }
        )
    )
    np.savez(tmp_path / "per_user.npz", users=np.arange(len(BASE), dtype=np.int32), **{"ndcg@10": BASE * 0.9})
    r = _cli(
        cfg,
        "attach-eval",
        "--run-id",
        champ.run_id,
        "--metrics",
        str(tmp_path / "metrics.json"),
        "--per-user",
        str(tmp_path / "per_user.npz"),
        "--data-version",
        cand.tags["hllm.data_version"],
    )
    assert r.exit_code == 0, r.output
    # the champion run's own test metrics are untouched
    assert c.get_run(champ.run_id).data.metrics["test/ndcg_at_10"] == pytest.approx(BASE.mean())
    res = registry.promote(cfg, v3)
    assert res.action == "challenger" and res.gate.champion == pytest.approx(BASE.mean() * 0.9)


def test_end_ab_to_champion_and_rollback(cfg):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    v2 = make_version(cfg, BASE + 0.05)
    v3 = make_version(cfg, BASE + 0.02)

    with pytest.raises(registry.PromotionRefused, match="not the challenger"):
        registry.promote(cfg, v2, to="champion")
    registry.promote(cfg, v2)
    with pytest.raises(registry.PromotionRefused, match="not the challenger"):
        registry.promote(cfg, v3, to="champion")

    r = _cli(cfg, "promote", "--to", "champion", "--reason", "A/B: +3% CTR")
    assert r.exit_code == 0, r.output
    assert f"version {v2} is the champion (was v{v1})" in r.output
    assert _aliases(cfg) == {"champion": v2}
    c = tracking.client(cfg)
    t2 = c.get_model_version(cfg.registry.model_name, v2).tags
    assert t2["ab.status"] == "won" and t2["alias.champion.reason"] == "A/B: +3% CTR"
    assert c.get_model_version(cfg.registry.model_name, v1).tags["alias.champion.removed_reason"] == "A/B: +3% CTR"
    assert registry.promote(cfg, v2, to="champion").action == "noop"

    # v3 is worse than the new champion v2 -> refused; ending an A/B in favour of the champion
    with pytest.raises(registry.PromotionRefused):
        registry.promote(cfg, v3)
    assert registry.end_ab(cfg).action == "noop"

    # rollback puts v1 back; retrying with --from is safe
    r = _cli(cfg, "rollback", "--from", v2, "--reason", "latency regression")
    assert r.exit_code == 0 and f"from v{v2} to v{v1}" in r.output
    assert _aliases(cfg) == {"champion": v1}
    r = _cli(cfg, "rollback", "--from", v2)
    assert r.exit_code == 0 and "nothing moved" in r.output
    assert _aliases(cfg) == {"champion": v1}
    assert registry.rollback(cfg).action == "noop"  # v1 is a rollback's result: a plain rollback stops there
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(cfg, force=True)
    assert _aliases(cfg) == {"champion": v1}

    # v3 now gates against v1 (better) -> challenger; end the A/B test in favour of the champion
    assert registry.promote(cfg, v3).action == "challenger"
    assert registry.end_ab(cfg, reason="no lift").action == "end_ab"
    assert _aliases(cfg) == {"champion": v1}
    assert c.get_model_version(cfg.registry.model_name, v3).tags["ab.status"] == "lost"

    actions = [
        (e["action"], e["alias"], e["version"] and str(e["version"]), e["previous"] and str(e["previous"]))
        for e in registry.audit_log(cfg)
        if e["action"] != "refused"
    ]
    assert actions == [
        ("promote", "champion", v1, None),
        ("promote", "challenger", v2, None),
        ("promote", "champion", v2, v1),
        ("rollback", "champion", v1, v2),
        ("promote", "challenger", v3, None),
        ("end_ab", "challenger", None, v3),
    ]
    r = _cli(cfg, "audit")
    assert r.exit_code == 0 and r.output.count("\n") == len(registry.audit_log(cfg))


def test_rollback_after_a_challenger_gated_against_the_rolled_back_champion(cfg):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    v2 = make_version(cfg, BASE + 0.2)
    registry.promote(cfg, v2)
    registry.promote(cfg, v2, to="champion")
    v3 = make_version(cfg, BASE + 0.1)  # better than v1, worse than v2
    with pytest.raises(registry.PromotionRefused):
        registry.promote(cfg, v3)
    registry.rollback(cfg)
    registry.promote(cfg, v3)  # gated against v1 now
    assert _aliases(cfg) == {"champion": v1, "challenger": v3}
    res = registry.promote(cfg, None, to="champion")
    assert res.version == v3 and _aliases(cfg) == {"champion": v3}


def test_plain_rollback_is_safe_to_repeat(cfg):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    v2 = make_version(cfg, BASE + 0.1)
    registry.promote(cfg, v2)
    registry.promote(cfg, v2, to="champion")
    v3 = make_version(cfg, BASE + 0.2)
    registry.promote(cfg, v3)
    registry.promote(cfg, v3, to="champion")
    assert _aliases(cfg) == {"champion": v3}

    r = _cli(cfg, "rollback", "--reason", "errors")
    assert r.exit_code == 0 and f"from v{v3} to v{v2}" in r.output, r.output
    events = registry.audit_log(cfg)
    tags = tracking.client(cfg).get_model_version(cfg.registry.model_name, v2).tags
    assert tags["alias.champion.set_action"] == "rollback" and tags["alias.champion.set_from"] == v3
    # the same command again (a retry, a double click): nothing moves, the audit log is unchanged
    for _ in range(2):
        r = _cli(cfg, "rollback", "--reason", "errors")
        assert r.exit_code == 0 and "nothing moved" in r.output and f"rollback from v{v3}" in r.output, r.output
        assert f"--from {v2}" in r.output  # how to go further on purpose
        assert _aliases(cfg) == {"champion": v2}
        assert registry.audit_log(cfg) == events
    # going further back is explicit: --from the current champion, or --force
    r = _cli(cfg, "rollback", "--force")
    assert r.exit_code == 0 and f"from v{v2} to v{v1}" in r.output, r.output
    assert _aliases(cfg) == {"champion": v1}
    assert [e["action"] for e in registry.audit_log(cfg)][-2:] == ["rollback", "rollback"]
    # once a promotion moved the champion again, a plain rollback undoes that promotion
    registry.promote(cfg, v3)
    registry.promote(cfg, v3, to="champion")
    res = registry.rollback(cfg)
    assert res.action == "rollback" and res.version == v1 and res.previous == v3


def test_errors_name_the_problem(cfg):
    with pytest.raises(registry.RegistryError, match="no version 7"):
        registry.promote(cfg, 7)
    with pytest.raises(registry.RegistryError, match="no champion"):
        registry.rollback(cfg)
    with pytest.raises(registry.RegistryError, match="--to must be"):
        registry.promote(cfg, 1, to="production")
    # a run without lineage tags cannot be registered
    c = tracking.client(cfg)
    run = c.create_run(tracking.configure(cfg))
    with pytest.raises(registry.RegistryError, match="nothing was registered"):
        registry.register_version(cfg, run.info.run_id)
    assert registry.list_versions(cfg) == []


def test_list_table(cfg):
    v1 = make_version(cfg, BASE)
    registry.promote(cfg, v1)
    v2 = make_version(cfg, BASE + 0.05)
    registry.promote(cfg, v2)
    rows = registry.list_versions(cfg)
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0]["aliases"] == ["challenger"] and rows[1]["aliases"] == ["champion"]
    assert rows[1]["metrics"]["ndcg@10"] == pytest.approx(BASE.mean())
    assert rows[0]["data_version"] == versioning.data_version(cfg).version
    r = _cli(cfg, "list")
    assert r.exit_code == 0, r.output
    assert "champion" in r.output and "challenger" in r.output and versioning.data_version(cfg).version in r.output
    assert f"{100 * BASE.mean():.2f}" in r.output and "running 10%" in r.output
    assert "incomplete" not in r.output and rows[0]["incomplete"] == ""
    # a version that crash recovery tagged (its flow run died before the gate) says so in the list
    v3 = make_version(cfg, BASE)
    tracking.client(cfg).set_model_version_tag(cfg.registry.model_name, v3, registry.TAG_INCOMPLETE, "flow run x died")
    assert registry.list_versions(cfg)[0]["incomplete"] == "flow run x died"
    assert "incomplete (not gated)" in _cli(cfg, "list").output
