"""Helpers shared by the MLflow tests (imported as a plain module: tests/ is not a package)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hllm import registry, tracking
from hllm.config import Config, protocol_hash


def write_built(d: Path, sequences: list[list[int]], n_items: int = 12) -> Path:
    """A built dataset in the ``hllm.data.artifacts`` format (ids only; no token cache needed here)."""
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_idx": pa.array(range(len(sequences)), pa.int32()),
                             "items": pa.array(sequences, pa.list_(pa.int32()))}), d / "sequences.parquet")
    pq.write_table(pa.table({"idx": pa.array(range(n_items), pa.int32()),
                             "item_id": ["<pad>"] + [f"i{i}" for i in range(1, n_items)]}), d / "items.parquet")
    pq.write_table(pa.table({"idx": pa.array(range(len(sequences)), pa.int32()),
                             "user_id": [f"u{u}" for u in range(len(sequences))]}), d / "users.parquet")
    return d


SEQS = [[1, 2, 3, 4], [2, 3, 5, 6], [4, 7, 8, 1], [9, 10, 11, 2]]


def make_version(cfg: Config, ndcg: np.ndarray, *, recall: np.ndarray | None = None, built: str = "data/built",
                 protocol: str | None = None, name: str = "hllm") -> str:
    """A training run with a test evaluation (per-user arrays) and a model artifact, registered."""
    c = copy.deepcopy(cfg)
    c.paths.built_dir = built
    ndcg = np.asarray(ndcg, dtype=np.float64)
    recall = ndcg if recall is None else np.asarray(recall, dtype=np.float64)
    users = np.arange(len(ndcg), dtype=np.int32)
    with tracking.start_run(c, name) as tr:
        dv = tracking.data_version(c)
        tr.log_evaluation({"ndcg@10": float(ndcg.mean()), "recall@10": float(recall.mean())},
                          {"ndcg@10": ndcg, "recall@10": recall, "rank": np.zeros(len(ndcg), np.int64)}, users,
                          protocol or protocol_hash(c.eval.protocol), dv.version)
        if protocol:
            tr.set_tags({tracking.TAG_PROTOCOL: protocol})
        tr.log_text("placeholder: the promotion logic does not read the model", "model/README.txt")
    return str(registry.register_version(c, tr.run_id).version)
