"""The summary of one ``nightly-retrain`` run: the Prefect markdown artifact, the MLflow
``summary.md`` and the console summary that ``hllm flows run nightly`` (``make run``) prints.

:class:`RunReport` is filled stage by stage while the flow runs, so a failed run
still reports how far it got, why it stopped (e.g. the validation summary) and
which MLflow runs it left.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL_LABELS = {"hllm": "HLLM", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "pop": "popularity"}
UI_WORKFLOW = "workflowType=machine_learning"  # the MLflow UI's "Model training" side, not its GenAI one


@dataclass
class ModelRow:
    label: str  # "HLLM (this run)", "SASRec", "champion v3"
    kind: str
    metrics: dict[str, float]  # fractions, keys like "recall@10"
    run_id: str | None = None
    note: str = ""
    slices: dict[str, dict[str, float]] = field(default_factory=dict)  # hllm.evaluation.slices of the test split


@dataclass
class RunReport:
    flow_run_id: str = ""
    flow_run_name: str = ""
    run_name: str = ""  # prefix of the run folders, checkpoints, exports, MLflow runs
    status: str = "RUNNING"  # COMPLETED | FAILED
    failed_stage: str = ""
    error: str = ""
    snapshot: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # dvc_md5, data_version, pushed_to, stats
    validation: str = ""
    protocol_hash: str = ""
    ks: list[int] = field(default_factory=lambda: [5, 10, 50, 200])
    models: list[ModelRow] = field(default_factory=list)
    registered_version: str | None = None
    model_name: str = ""
    alias: str | None = None  # alias the version holds after the gate
    promotion: str = ""
    promotion_accepted: bool | None = None  # the gate's verdict; None when it did not run
    tracking_uri: str = ""
    experiment_id: str = ""
    parent_run_id: str | None = None
    run_ids: dict[str, str] = field(default_factory=dict)  # label -> MLflow run id
    paths: dict[str, str] = field(default_factory=dict)  # checkpoint, export, eval folders
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    recovered: list[str] = field(default_factory=list)  # what crash recovery put back at the start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunReport":
        return cls(**{**d, "models": [ModelRow(**m) for m in d.get("models", [])]})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    # ------------------------------------------------------------------ links

    def run_url(self, run_id: str | None) -> str:
        """A link to the run in the MLflow UI (the server's own UI, or ``mlflow ui`` on port 5000).

        ``workflowType=machine_learning``: MLflow 3's UI opens on its GenAI views (traces, "Evaluation
        runs") in a browser that has not chosen "Model training" yet, whatever the experiment's kind."""
        if not run_id:
            return ""
        base = (
            self.tracking_uri.rstrip("/")
            if self.tracking_uri.startswith(("http://", "https://"))
            else "http://127.0.0.1:5000"
        )
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}?{UI_WORKFLOW}"

    def ui_command(self) -> str:
        """How to open the MLflow UI on this store."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"open {uri}"
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            arts = db.parent / "artifacts"
            return (
                f"mlflow ui --backend-store-uri {shlex.quote(uri)} --default-artifact-root "
                f"{shlex.quote(str(arts))} --host 127.0.0.1 --port 5000   (or: make mlflow-ui)"
            )
        return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port 5000"

    # ------------------------------------------------------------------ tables

    def metric_names(self) -> list[str]:
        return [f"{m}@{k}" for m in ("recall", "ndcg") for k in self.ks]

    def _rows(self) -> list[list[str]]:
        names = self.metric_names()
        out = []
        for r in self.models:
            out.append([r.label] + [f"{100 * r.metrics[n]:.2f}" if n in r.metrics else "-" for n in names] + [r.note])
        return out

    def metrics_markdown(self) -> str:
        if not self.models:
            return "_no model was evaluated_"
        head = ["model"] + self.metric_names() + ["note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def slices_rows(self, k: int = 10) -> list[list[str]]:
        """Recall@k per slice and model (%, users in brackets): where each model wins or loses;
        ``new items`` is the cold-start slice an ID model cannot score."""
        names = [("new_items", "new items"), ("tail_items", "tail items"), ("head_items", "head items"),
                 ("short_history", "short history"), ("long_history", "long history")]  # fmt: skip
        rows = []
        for r in self.models:
            if not r.slices:
                continue
            cells = [r.label]
            for key, _ in names:
                s = r.slices.get(key, {})
                v = s.get(f"recall@{k}")
                cells.append(f"{100 * v:.2f} ({int(s.get('n', 0))})" if v is not None else f"- ({int(s.get('n', 0))})")
            rows.append(cells)
        return [[f"R@{k} by slice"] + [n for _, n in names]] + rows if rows else []

    def slices_text(self) -> str:
        rows = self.slices_rows()
        if not rows:
            return ""
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                        for i, c in enumerate(r)) for r in rows)  # fmt: skip

    def metrics_text(self) -> str:
        if not self.models:
            return "  (no model was evaluated)"
        head = ["model"] + self.metric_names()
        rows = [row[:-1] for row in self._rows()]
        widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
        fmt = lambda cells: (
            "  "
            + "  ".join(
                c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])  # noqa: E731
                for i, c in enumerate(cells)
            )
        )
        notes = [f"  {r.label}: {r.note}" for r in self.models if r.note]
        return "\n".join([fmt(head)] + [fmt(r) for r in rows] + notes)

    # ------------------------------------------------------------------ on the MLflow parent run

    def promotion_outcome(self) -> str:
        """``champion`` (first one) | ``challenger`` | ``refused`` | ``skipped`` | ``not run``."""
        if self.promotion_accepted is None:
            return "skipped" if self.promotion.startswith("skipped") else "not run"
        if not self.promotion_accepted:
            return "refused"
        return self.alias or "accepted"

    def parent_metrics(self) -> dict[str, float]:
        """The headline test metrics of each model, ``<role>/test/<metric>`` (``hllm/test/ndcg_at_10``,
        ``sasrec/...``, ``pop/...``, ``champion/...`` when it was re-evaluated on today's data), and
        ``promotion/accepted`` (1/0) once the gate ran, so *Compare* across nights works on the
        parent runs alone. ``@`` is ``_at_`` as in every other metric name of the project."""
        out: dict[str, float] = {}
        names = self.metric_names()
        for r in self.models:
            role = "champion" if r.label.startswith("champion") else r.kind
            for n in names:
                v = r.metrics.get(n)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    out[f"{role}/test/{n.replace('@', '_at_')}"] = float(v)
        if self.promotion_accepted is not None:
            out["promotion/accepted"] = 1.0 if self.promotion_accepted else 0.0
        return out

    def parent_tags(self) -> dict[str, str]:
        """Outcome tags of the parent run (the description is :meth:`markdown`)."""
        tags = {
            "hllm.flow_status": self.status,
            "hllm.snapshot": self.snapshot or "synth",
            "hllm.promotion.outcome": self.promotion_outcome(),
            "hllm.promotion.alias": self.alias or "none",
        }
        if self.registered_version:
            tags["hllm.registered_version"] = self.registered_version
        if self.failed_stage:
            tags["hllm.failed_stage"] = self.failed_stage
        return tags

    def child_note(self, row: ModelRow) -> str:
        """The description of a model's child run: what it is, on which data, its test NDCG/Recall@10."""
        k = 10 if 10 in self.ks else (self.ks[0] if self.ks else 10)
        vals = ", ".join(
            f"{m}@{k} **{100 * row.metrics[f'{m.lower()}@{k}']:.2f} %**"
            for m in ("NDCG", "Recall")
            if f"{m.lower()}@{k}" in row.metrics
        )
        lines = [
            f"**{row.label}** (model kind `{row.kind}`) of nightly-retrain `{self.run_name}`",
            "",
            f"- data version `{self.data.get('data_version', '?')}`, protocol `{self.protocol_hash or '?'}`",
            f"- test: {vals or 'not evaluated'} (full ranking over every item)",
        ]
        if row.note:
            lines.append(f"- {row.note}")
        if self.parent_run_id:
            lines.append(f"- flow run: [{self.parent_run_id}]({self.run_url(self.parent_run_id)})")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ renderings

    def headline(self) -> str:
        if self.status == "FAILED":
            return f"FAILED at stage '{self.failed_stage}': {self.error.splitlines()[0] if self.error else ''}"
        if self.registered_version is None:
            return "COMPLETED (nothing registered)"
        alias = f" -> alias '{self.alias}'" if self.alias else " (no alias)"
        return f"COMPLETED: registered {self.model_name} v{self.registered_version}{alias}"

    def _data_lines(self) -> list[str]:
        d, s = self.data, self.data.get("stats") or {}
        lines = []
        if d.get("data_version"):
            lines.append(
                f"data version {d['data_version']} (data.dvc md5 {d.get('dvc_md5', '?')}"
                + (f", pushed to {d['pushed_to']}" if d.get("pushed_to") else "")
                + ")"
            )
        if s:
            sl = s.get("sequence_length", {})
            lines.append(
                f"{s.get('users', '?')} users, {s.get('items', '?')} items, {s.get('interactions', '?')} "
                f"interactions (density {s.get('density', '?')}); sequence length median "
                f"{sl.get('p50', '?')}, p95 {sl.get('p95', '?')}, max {sl.get('max', '?')}"
            )
        return lines

    def markdown(self) -> str:
        md = [f"# nightly-retrain `{self.run_name}`", "", f"**{self.headline()}**", ""]
        if self.promotion:
            md += [f"Promotion gate: {self.promotion}", ""]
        md += ["## Data", "", f"- snapshot: `{self.snapshot or 'embedded synthetic dataset (hllm data synth)'}`"]
        md += [f"- {line}" for line in self._data_lines()]
        if self.validation:
            md += ["", "Validation:", "", "```", self.validation, "```"]
        md += [
            "",
            f"## Test metrics (%, full ranking over every item, protocol `{self.protocol_hash}`)",
            "",
            self.metrics_markdown(),
            "",
        ]
        slices = self.slices_rows()
        if slices:
            md += ["Recall@10 by slice (%, users in brackets; new items never occurred in training):", ""]
            md += ["| " + " | ".join(slices[0]) + " |", "|---|" + "---:|" * (len(slices[0]) - 1)]
            md += ["| " + " | ".join(r) + " |" for r in slices[1:]] + [""]
        if self.status == "FAILED" and self.error:
            md += ["## Error", "", "```", self.error[-4000:], "```", ""]
        if self.recovered:
            md += ["## Crash recovery (what a killed earlier run left, put back first)", ""]
            md += [f"- {line}" for line in self.recovered] + [""]
        md += ["## MLflow", "", f"- tracking store: `{self.tracking_uri}`"]
        if self.parent_run_id:
            md.append(f"- flow run: [{self.parent_run_id}]({self.run_url(self.parent_run_id)})")
        for label, rid in self.run_ids.items():
            md.append(f"- {label}: [{rid}]({self.run_url(rid)})")
        if self.registered_version:
            md.append(f"- model: `models:/{self.model_name}/{self.registered_version}`")
        if self.stage_seconds:
            md += ["", "## Stages (seconds)", "", "| stage | s |", "|---|---|"]
            md += [f"| {k} | {v:.1f} |" for k, v in self.stage_seconds.items()]
        return "\n".join(md) + "\n"

    def console(self) -> str:
        out = [f"nightly-retrain {self.run_name}: {self.headline()}"]
        for line in self._data_lines():
            out.append(f"  {line}")
        if self.status == "FAILED" and self.validation and self.failed_stage == "validate":
            out.append(self.validation)
        if self.models:
            out.append(f"test metrics (%, full ranking, protocol {self.protocol_hash}):")
            out.append(self.metrics_text())
            if self.slices_text():
                out.append("by slice (recall@10 %, users; new items never occurred in training):")
                out.append(self.slices_text())
        if self.promotion:
            out.append(f"promotion: {self.promotion}")
        out.append(f"MLflow store: {self.tracking_uri}")
        if self.parent_run_id:
            out.append(f"MLflow run:   {self.run_url(self.parent_run_id)}")
        out.append(f"MLflow UI:    {self.ui_command()}")
        return "\n".join(out)
