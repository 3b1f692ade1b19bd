"""One evaluation result: ``metrics.json`` + ``per_user.npz`` (the schema every reader uses)."""

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
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``metrics.json`` and ``per_user.npz`` (for paired bootstrap)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "metrics.json", json.dumps(self.summary(), indent=2) + "\n")
        tmp = out / "per_user.tmp.npz"
        np.savez(tmp, users=self.users, **self.per_user)
        tmp.replace(out / "per_user.npz")
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> "EvalResult":
        out = Path(out_dir)
        s = json.loads((out / "metrics.json").read_text())
        per_user: dict[str, np.ndarray] = {}
        users = np.zeros(0, dtype=np.int32)
        if (out / "per_user.npz").exists():
            with np.load(out / "per_user.npz") as z:
                per_user = {k: z[k] for k in z.files if k != "users"}
                users = z["users"]
        return cls(
            split=s["split"], metrics=s["metrics"], per_user=per_user, users=users,
            protocol_hash=s["protocol_hash"], n_users=s["n_users"], protocol=s.get("protocol", {}),
            n_items=s.get("n_items", 0), n_masked_targets=s.get("n_masked_targets", 0),
            seconds=s.get("seconds", 0.0), checkpoint=s.get("checkpoint"),
        )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
