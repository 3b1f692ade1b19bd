"""The layer rule: imports only point down the pipeline.

core -> data -> models -> evaluation -> training -> serving -> ops -> abtest -> flows -> cli

A module may import its own layer and any layer below it, never one above. Function-local
(lazy) imports count too: they are still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["core", "data", "models", "evaluation", "training", "serving", "ops", "abtest", "flows", "cli"]
CORE = {
    "hllm",
    "hllm.config",
    "hllm.logs",
    "hllm.distributed",
    "hllm.lineage",
    "hllm.pretrained",
    "hllm.testing",
    "hllm.faults",
}
# beyond the order: MLflow stays out of training and the export (a training job must run with the
# tracking server down), and orchestration never reaches up into the CLI
FORBIDDEN = {
    "hllm.training": ("mlflow", "hllm.ops"),
    "hllm.serving.export": ("mlflow", "hllm.ops"),
    "flows": ("hllm.cli",),
}


def layer(module: str) -> str | None:
    if module in CORE:
        return "core"
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if parts[0] == "hllm" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return None  # third-party


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*ROOT.glob("hllm/**/*.py"), *ROOT.glob("flows/**/*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from hllm import tracking`
    return found


def violations() -> list[str]:
    mods = modules()
    bad = []
    for name, path in mods.items():
        mine = layer(name)
        assert mine is not None, f"{path}: module {name} belongs to no layer; add it to LAYERS/CORE"
        for imp in imports(path, name):
            target = layer(imp) if (imp in mods or imp.split(".")[0] not in ("hllm", "flows")) else None
            if target is not None and LAYERS.index(target) > LAYERS.index(mine):
                bad.append(f"{path.relative_to(ROOT)}: {name} ({mine}) imports {imp} ({target})")
            for prefix, banned in FORBIDDEN.items():
                if name == prefix or name.startswith(prefix + "."):
                    bad += [
                        f"{path.relative_to(ROOT)}: {name} must not import {imp}"
                        for b in banned
                        if imp == b or imp.startswith(b + ".")
                    ]
    return sorted(set(bad))


def test_imports_point_down() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    "module, expected",
    [
        ("hllm.config", "core"),
        ("hllm.data.build", "data"),
        ("hllm.ops.registry", "ops"),
        ("flows.nightly", "flows"),
        ("hllm.cli.train", "cli"),
        ("numpy", None),
    ],
)
def test_layer_names(module: str, expected: str | None) -> None:
    assert layer(module) == expected


def test_rule_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from hllm.ops import tracking\n")
    assert "hllm.ops.tracking" in imports(bad, "hllm.training.m")
    assert LAYERS.index(layer("hllm.ops.tracking")) > LAYERS.index(layer("hllm.training.m"))
