"""Hand-made models and datasets for the evaluation/export tests.

The models are real :class:`SeqRecModel` subclasses with fixed, known item
embeddings, so expected ranks can be computed by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hllm.config import Config
from hllm.data.dataset import BuiltData, Sequences
from hllm.models.base import LossOutput, SeqRecModel


class TableModel(SeqRecModel):
    """Item embedding = a row of a fixed table; user embedding = the last real
    history item's embedding (``mode="last"``), the masked mean (``"mean"``) or sum (``"sum"``).
    Every row is meaningful (a content-like table), unseen items included, unless ``id_model``."""

    def __init__(self, table: np.ndarray, normalize: bool = False, mode: str = "last", id_model: bool = False):
        super().__init__()
        self.scores_unseen_items = not id_model
        self.table = torch.nn.Parameter(torch.as_tensor(np.asarray(table), dtype=torch.float32))
        self.normalize = normalize
        self.mode = mode
        self.item_calls = 0  # number of items encoded, to test caching / incremental export

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        self.item_calls += len(idx)
        return self.table[idx]

    def user_embeddings(self, history_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "last":
            return history_emb[:, -1]
        w = mask.float().unsqueeze(-1)
        if self.mode == "sum":  # exact for integer tables: ties stay ties in float32
            return (history_emb * w).sum(1)
        return (history_emb * w).sum(1) / w.sum(1).clamp_min(1.0)

    def train_loss(self, windows, negatives):  # pragma: no cover - not trained in these tests
        return LossOutput(loss=torch.zeros(()))


def make_built(
    tmp: Path,
    sequences: list[list[int]],
    n_items: int,
    titles: list[str] | None = None,
    timestamps: list[list[int]] | None = None,
) -> BuiltData:
    """A BuiltData on disk (items/users/sequences parquet) with original ids
    ``i<idx>`` / ``u<idx>``; item idx 0 is padding. ``timestamps`` (per item, like ``sequences``) allow the
    temporal split."""
    tmp.mkdir(parents=True, exist_ok=True)
    item_ids = np.array(["<pad>"] + [f"i{j}" for j in range(1, n_items)], dtype=object)
    user_ids = np.array([f"u{j}" for j in range(len(sequences))], dtype=object)
    titles = titles or [""] + [f"title {j}" for j in range(1, n_items)]
    pd.DataFrame(
        {"idx": np.arange(n_items, dtype=np.int32), "item_id": item_ids.astype(str), "title": titles}
    ).to_parquet(tmp / "items.parquet")
    pd.DataFrame({"idx": np.arange(len(sequences), dtype=np.int32), "user_id": user_ids.astype(str)}).to_parquet(
        tmp / "users.parquet"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "user_idx": pa.array(np.arange(len(sequences), dtype=np.int32)),
        "items": pa.array(sequences, type=pa.list_(pa.int32())),
    }
    flat_ts = None
    if timestamps is not None:
        cols["timestamps"] = pa.array(timestamps, type=pa.list_(pa.int64()))
        flat_ts = np.array([t for ts in timestamps for t in ts], dtype=np.int64)
    pq.write_table(pa.table(cols), tmp / "sequences.parquet")
    return BuiltData(tmp, item_ids, user_ids, Sequences.from_lists(sequences), {}, flat_ts)


def small_cfg(ks=(1, 2, 5), **eval_kw) -> Config:
    cfg = Config()
    cfg.eval.protocol.ks = list(ks)
    cfg.eval.protocol.select_metric = f"ndcg@{max(ks)}"
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    return cfg


def random_dataset(tmp: Path, n_users: int = 40, n_items: int = 60, seed: int = 0, repeats: bool = True):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        n = int(rng.integers(1, 14))
        seqs.append(
            rng.integers(1, n_items, size=n).tolist()
            if repeats
            else rng.choice(np.arange(1, n_items), n, replace=False).tolist()
        )
    return make_built(tmp, seqs, n_items)


class TextModel(SeqRecModel):
    """A text-based item tower (like HLLM's Item LLM): the embedding is a
    learned projection of a position-aware character histogram of its text, so its weights do
    not depend on the catalogue and new items can be encoded."""

    item_state_prefixes = ("proj.",)
    scores_unseen_items = True  # a text tower: an item never seen in training is encoded like any other

    def __init__(self, texts: list[str], dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(64, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 64, generator=g))
            self.proj.bias.zero_()
        self.mix = torch.nn.Linear(dim, dim)  # the "user tower"
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=g))
            self.mix.bias.zero_()
        feats = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for pos, ch in enumerate(t):  # position-aware, so "title 12" != "title 21"
                feats[i, (ord(ch) + 31 * pos) % 64] += 1.0
        self.register_buffer("feats", torch.from_numpy(feats), persistent=False)
        self.normalize = True
        self.item_calls = 0

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        self.item_calls += len(idx)
        return self.proj(self.feats[idx])

    def user_embeddings(self, history_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.float().unsqueeze(-1)
        return self.mix((history_emb * w).sum(1) / w.sum(1).clamp_min(1.0))

    def train_loss(self, windows, negatives):  # pragma: no cover
        return LossOutput(loss=torch.zeros(()))


def text_model_for(built: BuiltData, cfg: Config, seed: int = 0) -> TextModel:
    from hllm.data.text import item_texts

    items = built.items_table().sort_values("idx")
    texts = [""] + item_texts(items.iloc[1:], cfg.model.item.prompt, cfg.model.item.text_fields)
    return TextModel(texts, seed=seed)
