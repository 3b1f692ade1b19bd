"""Helpers shared by the MLflow tests (imported as a plain module: tests/ is not a package)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hllm.config import Config, protocol_hash
from hllm.data import versioning
from hllm.evaluation.results import EvalResult
from hllm.ops import registry, tracking


def write_built(d: Path, sequences: list[list[int]], n_items: int = 12) -> Path:
    """A built dataset in the ``hllm.data.dataset`` format (ids only; no token cache needed here)."""
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array(range(len(sequences)), pa.int32()),
                "items": pa.array(sequences, pa.list_(pa.int32())),
            }
        ),
        d / "sequences.parquet",
    )
    pq.write_table(
        pa.table(
            {"idx": pa.array(range(n_items), pa.int32()), "item_id": ["<pad>"] + [f"i{i}" for i in range(1, n_items)]}
        ),
        d / "items.parquet",
    )
    pq.write_table(
        pa.table(
            {"idx": pa.array(range(len(sequences)), pa.int32()), "user_id": [f"u{u}" for u in range(len(sequences))]}
        ),
        d / "users.parquet",
    )
    return d


SEQS = [[1, 2, 3, 4], [2, 3, 5, 6], [4, 7, 8, 1], [9, 10, 11, 2]]


def make_version(
    cfg: Config,
    ndcg: np.ndarray,
    *,
    recall: np.ndarray | None = None,
    built: str = "data/built",
    protocol: str | None = None,
    name: str = "hllm",
) -> str:
    """A training run with a test evaluation (per-user arrays) and a model artifact, registered."""
    c = copy.deepcopy(cfg)
    c.paths.built_dir = built
    ndcg = np.asarray(ndcg, dtype=np.float64)
    recall = ndcg if recall is None else np.asarray(recall, dtype=np.float64)
    users = np.arange(len(ndcg), dtype=np.int32)
    with tracking.start_run(c, name) as tr:
        dv = versioning.data_version(c)
        tr.log_eval_result(
            EvalResult(
                split="test",
                metrics={"ndcg@10": float(ndcg.mean()), "recall@10": float(recall.mean())},
                per_user={"ndcg@10": ndcg, "recall@10": recall, "rank": np.zeros(len(ndcg), np.int64)},
                users=users,
                protocol_hash=protocol or protocol_hash(c.eval.protocol),
                n_users=len(users),
            ),
            dv.version,
        )
        if protocol:
            tr.set_tags({tracking.TAG_PROTOCOL: protocol})
        tr.log_text("placeholder: the promotion logic does not read the model", "model/README.txt")
    return str(registry.register_version(c, tr.run_id).version)


def train_tiny(root: Path) -> dict:
    """Real tiny models over one synthetic dataset: a 2-step HLLM (tiny BERT item tower, tiny Llama
    user tower) and the popularity baseline, each checkpointed, exported and evaluated on test."""
    from hllm import testing
    from hllm.evaluation.evaluate import evaluate
    from hllm.models.loading import load_model
    from hllm.serving.export import export
    from hllm.training.trainer import train

    items, seqs = testing.synthetic_lists(n_users=30, n_items=40)
    built = testing.write_built(root / "built", items, seqs)
    bert = testing.tiny_bert(root / "bert")
    out = {"built": built, "items": items, "seqs": seqs}
    for kind in ("hllm", "pop"):
        c = testing.tiny_config(
            root,
            bert,
            built,
            **{"model.kind": kind, "train.max_steps": 2, "train.checkpoint_every": 0, "train.run_name": kind},
        )
        res = train(c, progress=False)
        ckpt = res.best_checkpoint or res.last_checkpoint
        export(ckpt, root / "exports" / kind, c, progress=False)
        model, _, b = load_model(ckpt)
        out[kind] = {
            "cfg": c,
            "checkpoint": ckpt,
            "export": root / "exports" / kind,
            "eval": evaluate(model, b, c, split="test", progress=False),
        }
    return out


def log_trained(cfg: Config, tiny: dict, kind: str, register: bool = True) -> tuple[str, str | None]:
    """A tracked run for a trained tiny model (its config + lineage + test evaluation), and the
    registered pyfunc version. ``cfg`` supplies the store and registry settings."""
    m = tiny[kind]
    c = copy.deepcopy(m["cfg"])
    c.tracking, c.registry = cfg.tracking, cfg.registry
    with tracking.start_run(c, kind) as tr:
        tr.log_eval_result(m["eval"], versioning.data_version(c).version)
    if not register:
        return tr.run_id, None
    mv = registry.register_model(c, tr.run_id, m["export"], m["checkpoint"])
    return tr.run_id, str(mv.version)
