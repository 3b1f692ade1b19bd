"""Serving-side recommendations from an export (see :mod:`hllm.serving.export`).

``for_user`` needs only the export: the user's vector at their latest
position, searched in the FAISS index, with the items they have seen removed.
``for_history`` scores an arbitrary history (a new session, a what-if) and so
needs the user model from the checkpoint; it reuses the exported item
embeddings instead of re-encoding them.

Scores are what the evaluator ranks by: cosine when the model normalises,
raw inner product otherwise (popularity: the training count).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float


class Recommender:
    def __init__(self, export_dir: str | Path, model=None):
        import pandas as pd

        from hllm.serving.export import import_faiss, verify_export

        faiss = import_faiss()
        d = Path(export_dir)
        self.dir = d
        # every file is checked against the manifest's sha256 + size before it is read: a truncated or
        # corrupted file is refused by name (CorruptFileError), never served
        self.manifest = verify_export(d)
        items = pd.read_parquet(d / "items.parquet")
        users = pd.read_parquet(d / "users.parquet")
        self.item_ids = items["item_id"].astype(str).to_numpy()
        self.titles = items["title"].astype(str).to_numpy()
        self.user_ids = users["user_id"].astype(str).to_numpy()
        self._item_row = {x: i for i, x in enumerate(self.item_ids)}
        self._user_row = {x: i for i, x in enumerate(self.user_ids)}
        self.item_emb = np.load(d / "item_embeddings.npy", mmap_mode="r")
        self.user_emb = np.load(d / "user_embeddings.npy", mmap_mode="r")
        with np.load(d / "seen.npz") as z:
            self._seen_off, self._seen = z["offsets"], z["items"]
        self.index = faiss.read_index(str(d / "items.faiss"))
        if "ef_search" in self.manifest.get("index", {}):
            # an ID model's index is an ID map over its trained items: the HNSW graph is inside it
            graph = faiss.downcast_index(self.index.index) if hasattr(self.index, "id_map") else self.index
            graph.hnsw.efSearch = int(self.manifest["index"]["ef_search"])
        self.normalize = bool(self.manifest["normalize"])
        self.max_history = int(self.manifest.get("max_history", 10))
        # the model's learned score for items of the history it read (model.repeat_score); None when off
        bonus = self.manifest.get("seen_bonus")
        self.seen_bonus = float(bonus) if bonus else None
        self._servable: np.ndarray | None = None
        if self.seen_bonus is not None and hasattr(self.index, "id_map"):  # an ID model: its trained items only
            self._servable = np.zeros(len(self.item_ids), dtype=bool)
            self._servable[faiss.vector_to_array(self.index.id_map)] = True
        self.model = model

    @classmethod
    def from_export(cls, export_dir: str | Path, checkpoint: str | Path | None = None, model=None) -> "Recommender":
        """Load an export; ``checkpoint`` (or an in-memory ``model``) enables :meth:`for_history`.

        A checkpoint whose weights are not the ones the export was made from is refused.
        """
        if checkpoint is not None and model is None:
            from hllm.evaluation.item_cache import checkpoint_fingerprint

            rec = cls(export_dir)
            want = rec.manifest.get("model", {}).get("fingerprint")
            got = checkpoint_fingerprint(checkpoint)
            if want and want != got:
                raise ValueError(
                    f"checkpoint {checkpoint} ({got}) is not the one export {export_dir} was made from ({want})"
                )
            from hllm.models.loading import load_model

            rec.model = load_model(checkpoint)[0].eval()
            return rec
        return cls(export_dir, model=model)

    # ------------------------------------------------------------------ queries

    def seen(self, user_id: str) -> list[str]:
        r = self._user(user_id)
        return self.item_ids[self._seen[self._seen_off[r] : self._seen_off[r + 1]]].tolist()

    def for_user(self, user_id: str, k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        r = self._user(user_id)
        hist = self._seen[self._seen_off[r] : self._seen_off[r + 1]]
        seen = hist if exclude_seen else np.zeros(0, np.int64)
        rows, scores = self.search(np.asarray(self.user_emb[r : r + 1]), [seen], k, [hist[-self.max_history :]])
        return self._recs(rows[0], scores[0])

    def for_history(self, item_ids: Sequence[str], k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        rows, scores = self.for_histories([item_ids], k, exclude_seen)
        return self._recs(rows[0], scores[0])

    def for_histories(
        self, histories: Sequence[Sequence[str]], k: int = 10, exclude_seen: bool = True, batch: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item rows [n, k] (-1 = none) and scores for many histories at once."""
        q = self.query_vectors(histories, batch)
        rows = [self._rows(h) for h in histories]
        excl = rows if exclude_seen else [np.zeros(0, np.int64)] * len(rows)
        return self.search(q, excl, k, [r[-self.max_history :] for r in rows])

    def query_vectors(self, histories: Sequence[Sequence[str]], batch: int = 256) -> np.ndarray:
        """User vectors for item-id histories: the last ``max_history`` items, left-padded, through the user model."""
        import torch

        if self.model is None:
            raise RuntimeError("for_history needs the user model: Recommender.from_export(dir, checkpoint=CKPT)")
        from hllm.models.base import model_device

        m = getattr(self.model, "module", self.model)
        dev = model_device(m)
        L = self.max_history
        out = []
        for s in range(0, len(histories), batch):
            chunk = histories[s : s + batch]
            emb = np.zeros((len(chunk), L, self.item_emb.shape[1]), dtype=np.float32)
            mask = np.zeros((len(chunk), L), dtype=bool)
            for i, h in enumerate(chunk):
                rows = self._rows(h)[-L:]
                if len(rows) == 0:
                    raise ValueError("a history must contain at least one item")
                emb[i, L - len(rows) :] = self.item_emb[rows]
                mask[i, L - len(rows) :] = True
            with torch.inference_mode():
                u = m.user_embeddings(torch.from_numpy(emb).to(dev), torch.from_numpy(mask).to(dev)).float()
                if self.normalize:
                    u = torch.nn.functional.normalize(u, dim=-1)
            out.append(u.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.item_emb.shape[1]), np.float32)

    def search(
        self, queries: np.ndarray, exclude: list[np.ndarray], k: int, read: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search with excluded rows removed: over-fetch by the longest exclusion list, then filter.

        ``read``: per query, the item rows of the history the model read; with a learned repeat score
        (``seen_bonus``) their scores get it, as in evaluation (those not excluded are rescored exactly)."""
        n_items = self.index.ntotal
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        bonus = self.seen_bonus if read is not None else None
        extra = max((len(r) for r in read), default=0) if bonus is not None and read is not None else 0
        fetch = min(n_items, k + max((len(e) for e in exclude), default=0) + extra)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, rows = self.index.search(queries, fetch)
        out_r = np.full((len(queries), k), -1, dtype=np.int64)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for i, ex in enumerate(exclude):
            keep = rows[i] >= 0
            if len(ex):
                keep &= ~np.isin(rows[i], ex)
            r, s = rows[i][keep], scores[i][keep]
            if bonus is not None and read is not None:
                r, s = self._with_bonus(queries[i], r, s, np.setdiff1d(read[i], ex), bonus)
            r, s = r[:k], s[:k]
            out_r[i, : len(r)], out_s[i, : len(s)] = r, s
        return out_r, out_s

    def _with_bonus(
        self, q: np.ndarray, rows: np.ndarray, scores: np.ndarray, read: np.ndarray, bonus: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates plus the read items (scored exactly, + bonus), in descending score order."""
        read = np.unique(read)
        if self._servable is not None:
            read = read[self._servable[read]]
        vec = np.asarray(self.item_emb[read], dtype=np.float32)
        if self.normalize:
            vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        others = ~np.isin(rows, read)
        r = np.concatenate([rows[others], read])
        s = np.concatenate([scores[others], vec @ q + np.float32(bonus)]).astype(np.float32)
        order = np.argsort(-s, kind="stable")
        return r[order], s[order]

    # ------------------------------------------------------------------ helpers

    def _user(self, user_id: str) -> int:
        try:
            return self._user_row[str(user_id)]
        except KeyError:
            raise KeyError(f"user {user_id!r} is not in export {self.dir} ({len(self.user_ids)} users)") from None

    def _rows(self, item_ids: Sequence[str]) -> np.ndarray:
        missing = [x for x in item_ids if str(x) not in self._item_row]
        if missing:
            raise KeyError(
                f"item id(s) {missing[:5]} not in export {self.dir}"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            )
        return np.array([self._item_row[str(x)] for x in item_ids], dtype=np.int64)

    def _recs(self, rows: np.ndarray, scores: np.ndarray) -> list[Recommendation]:
        return [
            Recommendation(str(self.item_ids[r]), str(self.titles[r]), float(s)) for r, s in zip(rows, scores) if r >= 0
        ]
