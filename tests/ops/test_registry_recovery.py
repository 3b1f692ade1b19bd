"""Registry crash recovery (:func:`hllm.ops.registry.recover`), on a real SQLite MLflow store: an alias
move killed between the alias and its audit record (a real SIGKILL at failpoint ``promote:alias-set``
in a child process), and versions whose flow run died before its promotion gate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

from hllm.ops import registry, tracking
from tests.helpers.reghelpers import make_version

PROMOTE = """
import sys
from hllm.config import Config
from hllm.ops import registry
c = Config()
c.tracking.tracking_uri, c.tracking.experiment, c.registry.model_name, c.registry.audit_experiment = sys.argv[1:5]
registry.promote(c, sys.argv[5], actor="nightly")
"""


def _audited(cfg) -> dict:
    return registry._audited_aliases(cfg, registry.audit_log(cfg))


def test_an_alias_moved_without_its_audit_record_is_recorded_as_recovered(cfg, tmp_path):
    v = make_version(cfg, np.full(4, 0.5))
    args = [cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.registry.model_name, cfg.registry.audit_experiment]
    env = {**os.environ, "HLLM_FAILPOINTS": "promote:alias-set"}
    proc = subprocess.run(
        [sys.executable, "-c", PROMOTE, *args, v], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    client = tracking.client(cfg)
    assert client.get_registered_model(cfg.registry.model_name).aliases == {registry.CHAMPION: int(v)}
    assert _audited(cfg) == {}  # the crash lost the record

    done = registry.recover(cfg)
    assert len(done) == 1 and "champion" in done[0]
    last = registry.audit_log(cfg)[-1]
    assert (last["action"], last["alias"], last["version"], last["actor"]) == ("recovered", "champion", v, "recovery")
    assert _audited(cfg) == {registry.CHAMPION: v}
    tags = client.get_model_version(cfg.registry.model_name, v).tags
    assert tags["alias.champion.set_by"] == "recovery"
    assert registry._history(client, cfg.registry.model_name) == [v]  # rollback can find it
    assert registry.recover(cfg) == []  # idempotent: nothing more to record


def _flow_version(cfg, parent_status: str) -> str:
    """A version registered by a flow run whose MLflow parent run ended ``parent_status``."""
    client = tracking.client(cfg)
    exp = tracking.configure(cfg)
    parent = client.create_run(exp, run_name="nightly", tags={tracking.TAG_KIND: "flow"}).info.run_id
    v = make_version(cfg, np.full(4, 0.4))
    run_id = client.get_model_version(cfg.registry.model_name, v).run_id
    client.set_tag(run_id, "mlflow.parentRunId", parent)
    client.set_terminated(parent, parent_status)
    client.set_model_version_tag(cfg.registry.model_name, v, tracking.TAG_FLOW_RUN, f"flow-{parent_status}")
    return v


def test_a_version_whose_flow_died_before_the_gate_is_tagged_incomplete(cfg):
    dead = _flow_version(cfg, "FAILED")
    clean = _flow_version(cfg, "FINISHED")  # e.g. promote=false: a finished flow, nothing to flag
    done = registry.recover(cfg)
    tags = {v: tracking.client(cfg).get_model_version(cfg.registry.model_name, v).tags for v in (dead, clean)}
    assert registry.TAG_INCOMPLETE in tags[dead] and "before its promotion gate" in tags[dead][registry.TAG_INCOMPLETE]
    assert registry.TAG_INCOMPLETE not in tags[clean]
    assert len(done) == 1
    assert registry.recover(cfg) == []
