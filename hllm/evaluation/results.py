"""One evaluation result and its files: the schema every writer and reader uses.

A result is a folder with two files::

    metrics.json   {"split", "metrics" (fractions), "protocol_hash", "protocol", "data_version",
                    "n_users", "n_items", "n_masked_targets", "seconds", "checkpoint",
                    "slices" ({slice: {"n": users, metric: value}}, hllm.evaluation.slices),
                    "split_info" (the split rule; temporal: resolved cutoff times, users without history)}
    per_user.npz   "users" (int32 user idx) + one array per metric, aligned (the gate bootstraps them)

``hllm evaluate`` writes it under ``reports/eval/<run>/<split>/``; in MLflow it lives under
:func:`artifact_dir` = ``eval/<split>/<protocol hash>/<data version>/`` of the model's run, so a
gate never compares results of different protocols or data. Older ``metrics.json`` files with only
``split``/``metrics``/``protocol_hash`` (and ``data_version``) still load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hllm.evaluation import metrics as M

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]  # fractions, keys like "recall@10", "ndcg@200"
    per_user: dict[str, np.ndarray]  # same keys + "rank" (0-based; metrics.MASKED for masked targets)
    users: np.ndarray  # int32 user idx, aligned with per_user arrays (sorted)
    protocol_hash: str
    n_users: int
    protocol: dict[str, Any] = field(default_factory=dict)
    n_items: int = 0  # candidate slots incl. padding
    n_masked_targets: int = 0  # targets that were in the masked history (counted as misses)
    seconds: float = 0.0
    checkpoint: str | None = None
    data_version: str | None = None  # d<dvc md5>-s<sequences md5> (hllm.data.versioning)
    slices: dict[str, dict[str, float]] = field(default_factory=dict)  # {slice: {"n", metric}}: evaluation.slices
    # how the split was made (hllm.data.dataset.SplitPlan.info): the rule and, for the temporal split, the
    # resolved cutoff times and the users left out for having no history before their target
    split_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.users)
        bad = [k for k, v in self.per_user.items() if np.shape(v) != (n,)]
        if bad:
            raise ValueError(f"per-user arrays {bad} do not have one value per user ({n})")

    @property
    def select_value(self) -> float:
        """The model-selection metric named by the protocol."""
        return self.metrics[self.protocol.get("select_metric", "ndcg@200")]

    def diff(self, other: "EvalResult") -> dict[str, float]:
        """``self - other`` per metric; raises if the protocols differ."""
        M.ensure_comparable(self.protocol_hash, other.protocol_hash)
        if self.split != other.split:
            raise M.ProtocolMismatchError(f"cannot compare a {self.split} result with a {other.split} result")
        return {k: self.metrics[k] - other.metrics[k] for k in self.metrics if k in other.metrics}

    def table(self, label: str | None = None) -> str:
        ks = self.protocol.get("ks") or sorted({int(k.split("@")[1]) for k in self.metrics})
        return M.format_table({label or self.split: self.metrics}, ks)

    def summary(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "metrics": self.metrics,
            "protocol_hash": self.protocol_hash,
            "protocol": self.protocol,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_masked_targets": self.n_masked_targets,
            "seconds": round(self.seconds, 3),
            "checkpoint": self.checkpoint,
            "data_version": self.data_version,
            "slices": self.slices,
            "split_info": self.split_info,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``metrics.json`` and ``per_user.npz`` (for paired bootstrap)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "metrics.json", json.dumps(self.summary(), indent=2) + "\n")
        tmp = out / "per_user.tmp.npz"
        np.savez(tmp, users=self.users, **self.per_user)  # type: ignore[arg-type]  # mypy: **dict may hit allow_pickle
        tmp.replace(out / "per_user.npz")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> EvalResult:
        """Read a result folder (``per_user.npz`` optional)."""
        out = Path(out_dir)
        npz = out / "per_user.npz"
        return cls.load_files(out / "metrics.json", npz if npz.exists() else None)

    @classmethod
    def load_files(cls, metrics_json: str | Path, per_user_npz: str | Path | None = None) -> EvalResult:
        """Read ``metrics.json`` (+ ``per_user.npz``); a missing key is an error naming the file."""
        s = json.loads(Path(metrics_json).read_text())
        missing = [k for k in ("metrics", "protocol_hash") if k not in s]
        if missing:
            raise ValueError(f"{metrics_json}: missing key(s) {missing}")
        per_user: dict[str, np.ndarray] = {}
        users = np.zeros(0, dtype=np.int32)
        if per_user_npz is not None:
            with np.load(per_user_npz, allow_pickle=False) as z:
                if "users" not in z.files:
                    raise ValueError(f"{per_user_npz}: no 'users' array")
                per_user = {k: z[k] for k in z.files if k != "users"}
                users = z["users"]
        return cls(
            split=s.get("split", "test"),
            metrics={k: float(v) for k, v in s["metrics"].items()},
            per_user=per_user,
            users=users,
            protocol_hash=s["protocol_hash"],
            n_users=s.get("n_users", len(users)),
            protocol=s.get("protocol", {}),
            n_items=s.get("n_items", 0),
            n_masked_targets=s.get("n_masked_targets", 0),
            seconds=s.get("seconds", 0.0),
            checkpoint=s.get("checkpoint"),
            data_version=s.get("data_version"),
            slices=s.get("slices", {}),
            split_info=s.get("split_info", {}),
        )


def artifact_dir(split: str, protocol: str, data_ver: str) -> str:
    """Where a result lives in its model's MLflow run: ``eval/<split>/<protocol hash>/<data version>``."""
    return f"eval/{split}/{protocol}/{data_ver}"


def parse_artifact_dir(path: str) -> tuple[str, str, str] | None:
    """``eval/<split>/<protocol>/<data>`` -> (split, protocol, data version); None for another path."""
    parts = path.strip("/").split("/")
    return (parts[1], parts[2], parts[3]) if len(parts) == 4 and parts[0] == "eval" else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
