"""HLLM: Item LLM (text -> item embedding) + User LLM (item embeddings -> next item).

One training step (``train_loss``):

1. every distinct item of the step (history, targets and this rank's
   negatives together) goes through the Item LLM exactly once
   (``torch.unique`` + index back; padding 0 is never encoded);
2. this rank's negative embeddings are all-gathered across ranks with
   gradients into one shared pool;
3. the User LLM reads the left-padded history embeddings and its output at
   every valid position is scored against the next item and the pool with
   cosine InfoNCE (``hllm.models.losses.infonce``).

When the Item and User LLM hidden sizes differ, a Linear projection maps item
embeddings into the user space; that projected space is the one shared by
items and users for scoring, export and serving.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hllm.distributed import gather_with_grad
from hllm.models.base import LossOutput, SeqRecModel
from hllm.models.item_llm import ItemLLM
from hllm.models.losses import LogitScale, infonce, target_mask
from hllm.models.user_llm import UserLLM

if TYPE_CHECKING:
    from hllm.config import Config
    from hllm.data.dataset import BuiltData, TokenCache

log = logging.getLogger(__name__)

PROJECTIONS = ("auto", "linear", "none")


class HLLM(SeqRecModel):
    normalize = True
    scores_unseen_items = True  # every item is embedded from its text, seen in training or not
    # item embeddings depend on the Item LLM (+ [ITEM] vector) and the projection only
    item_state_prefixes = ("item.", "proj.")

    def __init__(
        self,
        item: ItemLLM,
        user: UserLLM,
        *,
        projection: str = "auto",
        scale_init: float = 1 / 0.07,
        scale_max: float = 100.0,
        nce_threshold: float = 0.99,
        dedup: bool = True,
    ):
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"model.user.projection must be one of {PROJECTIONS}, got {projection!r}")
        d_item, d_user = item.hidden_size, user.hidden_size
        if projection == "none" and d_item != d_user:
            raise ValueError(
                f"Item LLM hidden size {d_item} != User LLM hidden size {d_user} and model.user.projection=none: "
                "set model.user.projection=auto (adds a Linear projection) or make the sizes equal"
            )
        self.item = item
        self.user = user
        use_proj = projection == "linear" or (projection == "auto" and d_item != d_user)
        self.proj = nn.Linear(d_item, d_user) if use_proj else None
        self.scale = LogitScale(scale_init, scale_max)
        self.nce_threshold = nce_threshold
        self.dedup = dedup
        self.dim = d_user
        # parameters that start from random init (set by ``build``; the trainer may give them their own lr)
        self._new_prefixes = ["item.item_token", "proj", "scale"]
        self._tokens_fp: str | None = None

    # ------------------------------------------------------------------ towers

    def encode_items(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        """Embeddings in the shared space for item idx [n] (all > 0), with token counts."""
        emb, counts = self.item(idx)
        if self.proj is not None:
            emb = self.proj(emb)
        return emb, counts

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        """[n, d] float32; padding idx 0 maps to a zero vector."""
        idx = idx.reshape(-1).long()
        out = torch.zeros(len(idx), self.dim, device=self.scale.log_scale.device)
        real = idx > 0
        if real.any():
            emb, _ = self.encode_items(idx[real])
            out[real.to(out.device)] = emb.float()
        return out

    def item_inputs_fingerprint(self) -> str:
        """Hash of the token cache the Item LLM reads (row = item idx of the built data)."""
        if self._tokens_fp is None:
            import hashlib

            h = hashlib.sha256()
            for a in (self.item.tokens.offsets, self.item.tokens.ids):
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype}:{a.shape};".encode())
                h.update(a.view(np.uint8).reshape(-1).data)
            self._tokens_fp = h.hexdigest()[:16]
        return self._tokens_fp

    def user_embeddings(self, history_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prediction of the next item from left-padded history embeddings: the last position."""
        out = self.user(history_emb, mask.bool())
        return out[:, -1].float()

    # ------------------------------------------------------------------ training

    def _step_embeddings(self, flat: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        """Embeddings for every entry of ``flat`` (0 -> zeros), each distinct item encoded once."""
        real = flat > 0
        if self.dedup:
            uniq, inverse = torch.unique(flat, return_inverse=True)
            has_pad = bool(uniq[0] == 0)
            emb, counts = self.encode_items(uniq[1:] if has_pad else uniq)
            if has_pad:
                emb = torch.cat([emb.new_zeros(1, emb.shape[1]), emb])
            return emb[inverse], counts
        # Reference behaviour (benchmarks only): every non-padding slot encoded separately.
        emb, counts = self.encode_items(flat[real])
        out = emb.new_zeros(len(flat), emb.shape[1])
        return out.index_put((real.nonzero()[:, 0],), emb), counts

    def train_loss(self, windows: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        B, W = windows.shape
        flat = torch.cat([windows.reshape(-1), negatives.reshape(-1)]).long()
        emb, counts = self._step_embeddings(flat)
        win = emb[: B * W].view(B, W, -1)
        pool = gather_with_grad(emb[B * W :])
        in_mask = windows[:, :-1] != 0
        pred = self.user(win[:, :-1], in_mask)
        tmask = target_mask(windows)
        scale = self.scale()
        if not bool(tmask.any()):
            # Keep every parameter in the graph (DDP expects gradients for all).
            loss = pred.sum() * 0.0 + scale * 0.0
            stats = {"scale": float(scale), "negatives": 0.0}
        else:
            loss, stats = infonce(pred[tmask], win[:, 1:][tmask], pool, scale, self.nce_threshold)
        stats.update({k: float(v) for k, v in counts.items()})
        stats["targets"] = float(tmask.sum())
        stats["slots"] = float(int((flat > 0).sum()))  # item slots before deduplication
        return LossOutput(loss=loss, stats=stats)

    def new_parameter_prefixes(self) -> list[str]:
        return list(self._new_prefixes)

    def no_weight_decay(self) -> set[str]:
        return {"item.item_token", "scale.log_scale"}

    def forward(self, windows: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        return self.train_loss(windows, negatives)


def build(cfg: "Config", built: "BuiltData", tokens: "TokenCache | None" = None) -> HLLM:
    """HLLM from ``cfg.model`` over the built dataset's item texts."""
    from hllm.data.text import ensure_tokens
    from hllm.models.hf import load_backbone

    icfg, ucfg, tcfg = cfg.model.item, cfg.model.user, cfg.train
    if tokens is None:
        tokens = ensure_tokens(cfg, built.dir)
    n_rows = len(tokens.offsets) - 1
    if n_rows != built.n_items:
        raise ValueError(
            f"item token cache has {n_rows} rows but {built.dir}/items.parquet has {built.n_items} items; "
            "the cache is stale: delete the tokens/ folder of the built dataset"
        )
    item_bb = load_backbone(
        icfg.path,
        icfg.config,
        from_scratch=icfg.from_scratch,
        attn_implementation=icfg.attn_implementation,
        what="model.item",
    )
    max_len = int(tokens.lengths().max(initial=0)) + 1
    max_pos = getattr(item_bb.config, "max_position_embeddings", None)
    if max_pos is not None and max_len > max_pos:
        raise ValueError(f"model.item: texts of {max_len - 1} tokens + [ITEM] exceed max_position_embeddings={max_pos}")
    pad_id = getattr(item_bb.config, "pad_token_id", None)
    item = ItemLLM(
        item_bb,
        tokens,
        pooling=icfg.pooling,
        layout=icfg.layout,
        max_tokens_per_forward=icfg.max_tokens_per_forward,
        pad_id=int(pad_id) if pad_id is not None else 0,
    )
    user_bb = load_backbone(
        ucfg.path,
        ucfg.config,
        from_scratch=ucfg.from_scratch,
        attn_implementation=ucfg.attn_implementation,
        what="model.user",
    )
    user = UserLLM(user_bb)
    model = HLLM(
        item,
        user,
        projection=ucfg.projection,
        scale_init=tcfg.scale_init,
        scale_max=tcfg.scale_max,
        nce_threshold=tcfg.nce_threshold,
        dedup=tcfg.dedup_items,
    )
    if icfg.path is None or icfg.from_scratch:
        model._new_prefixes.append("item.backbone")
    if ucfg.path is None or ucfg.from_scratch:
        model._new_prefixes.append("user")
    log.info(
        "HLLM: item %s (%s, %d hidden, %.1fM params), user %s (%d hidden, %.1fM params), projection %s",
        icfg.path or item_bb.config.model_type,
        "encoder" if item.encoder else "decoder",
        item.hidden_size,
        _millions(item),
        ucfg.path or user_bb.config.model_type,
        user.hidden_size,
        _millions(user),
        "linear" if model.proj is not None else "none",
    )
    return model


def _millions(m: nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6
