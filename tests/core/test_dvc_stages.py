"""dvc.yaml's model stages against the code they run: a module a stage runs but does not list as a
dependency would let `dvc repro` skip a stage whose result that module changes."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENTRY = {"train": "hllm.training.trainer", "evaluate": "hllm.evaluation.evaluate", "export": "hllm.serving.export"}
# Modules that cannot change a stage's output: package markers, the config loader (the values are
# params.yaml's, listed as params), logging, MLflow tracking and its plots, failpoints (hllm/faults.py:
# a no-op unless HLLM_FAILPOINTS names one).
NOT_DEPS = {"hllm/__init__.py", "hllm/config.py", "hllm/logs.py", "hllm/ops/tracking.py", "hllm/ops/plots.py",
            "hllm/faults.py"}  # fmt: skip


def _file(module: str) -> Path | None:
    p = REPO / Path(*module.split("."))
    for cand in (p.with_suffix(".py"), p / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def hllm_modules(module: str) -> set[str]:
    """Files of every ``hllm`` module ``module`` imports, transitively, function-level imports included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hllm"):
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]  # `from hllm import tracking`
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("hllm")]
    return {str(_file(m).relative_to(REPO)) for m in seen}


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_stage_lists_every_module_it_runs(stage):
    deps = [d for d in stages()[stage]["deps"]]
    covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    missing = sorted(f for f in hllm_modules(ENTRY[stage]) - NOT_DEPS if not covered(f))
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list it in deps"


def test_dvc_parses_the_pipeline():
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--md"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', proc.stdout))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", proc.stdout)}
    assert edges >= {
        ("data.dvc", "validate"),
        ("validate", "build"),
        ("build", "train"),
        ("train", "evaluate"),
        ("train", "export"),
        ("build", "export"),
    }, proc.stdout
