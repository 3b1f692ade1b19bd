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
items and users for scoring, export and serving. ``model.item.adaptor`` puts a
small trainable map (Linear or MLP + LayerNorm, UniSRec style) there instead.

Cheap item-tower recipes (docs/training.md, "Cheap item towers"): the model can
hold an **item table**, the Item LLM's output for every item of the catalogue,
encoded without gradients in chunks (``refresh_table``; the trainer refreshes
it on ``train.item_table_refresh``'s schedule). While the Item LLM is frozen
(``model.item.tune=frozen``, or the frozen stage of ``train.frozen_share``) a
step reads every item from the table and nothing goes through the Item LLM;
otherwise only the step's history and target items do, with gradients, and
``train.hllm_loss=bank|full`` scores against table rows (stale negatives, a
memory bank) instead of re-encoding negatives. The table is a buffer of the
state dict, so a resumed run continues with the very table it had.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hllm.distributed import broadcast_, gather_ids, gather_with_grad
from hllm.models.base import LossOutput, SeqRecModel
from hllm.models.item_llm import ItemLLM
from hllm.models.losses import LogitScale, RepeatScore, infonce, target_mask
from hllm.models.user_llm import UserLLM

if TYPE_CHECKING:
    from hllm.config import Config
    from hllm.data.dataset import BuiltData, TokenCache

log = logging.getLogger(__name__)

PROJECTIONS = ("auto", "linear", "none")


class HLLM(SeqRecModel):
    normalize = True
    scores_unseen_items = True  # every item is embedded from its text, seen in training or not
    # item embeddings depend on the Item LLM (+ [ITEM] vector), the projection or adaptor, and the item table
    item_state_prefixes = (
        "item.",
        "proj.",
        "adaptor.",
        "item_table",
        "frozen_now",
        "id_delta.",
        "id_seen",
        "cold_delta",
    )
    # buffers, registered only when a recipe reads the table (``uses_table``)
    item_table: torch.Tensor
    table_step: torch.Tensor
    frozen_now: torch.Tensor
    id_seen: torch.Tensor  # with model.item.id_delta

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
        adaptor: str = "none",
        adaptor_dropout: float = 0.0,
        loss: str = "sampled",
        frozen_stage: bool = False,
        table_batch: int = 256,
        seen_items: torch.Tensor | None = None,
        negative_items: torch.Tensor | None = None,
        delta_dropout: float = 0.0,
        cold_delta: bool = False,
        repeat_score: bool = False,
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
        if loss not in LOSSES:
            raise ValueError(f"train.hllm_loss must be one of {LOSSES}, got {loss!r}")
        if adaptor not in ADAPTORS:
            raise ValueError(f"model.item.adaptor must be one of {ADAPTORS}, got {adaptor!r}")
        self.item = item
        self.user = user
        self.adaptor = _adaptor(adaptor, d_item, d_user)
        self.adaptor_drop = nn.Dropout(adaptor_dropout)
        use_proj = self.adaptor is None and (projection == "linear" or (projection == "auto" and d_item != d_user))
        self.proj = nn.Linear(d_item, d_user) if use_proj else None
        self.loss_kind = loss
        self.table_batch = table_batch
        # id_delta: a learned per-item residual on top of the content embedding, for items seen in training only
        # (an unseen item's row would only ever be pushed around as a negative: it keeps its text embedding)
        self.id_delta: nn.Embedding | None = None
        if seen_items is not None:
            self.id_delta = nn.Embedding(item.n_items, d_user)
            nn.init.zeros_(self.id_delta.weight)
            self.register_buffer("id_seen", seen_items.bool().clone())
        # DropoutNet's trick for cold start: in each training step a random share of the items lose their delta
        # (the same items everywhere in the step: as inputs, targets and negatives), so the user model also
        # learns to rank items by their text alone, which is all a new item has
        self.delta_dropout = delta_dropout
        # cold_delta: one learned vector in place of the delta of every item that has none (a new item; a dropped
        # one in training), where zero would be a fixed offset below the seen items (their deltas carry what the
        # softmax learned about popularity); it learns from the dropped items (ItemLLMConfig checks the settings)
        self.cold_delta = nn.Parameter(torch.zeros(d_user)) if cold_delta else None
        self._delta_keep: torch.Tensor | None = None  # bool [n_items] for the current training step
        # The item table exists when a recipe reads it; the default (full tuning, sampled negatives) has none.
        self.uses_table = item.tune == "frozen" or loss != "sampled" or frozen_stage
        if self.uses_table:
            self.register_buffer("item_table", torch.zeros(item.n_items, d_item))  # row 0 (padding) stays 0
            self.register_buffer("table_step", torch.tensor(-1, dtype=torch.long))  # step of its last refresh
            # 1 while the Item LLM is frozen: always under tune=frozen, until the stage switch under frozen_share
            self.register_buffer("frozen_now", torch.tensor(int(item.tune == "frozen" or frozen_stage)))
        # Negatives read from the table are items seen in training only: an item that first occurs at validation
        # or test time did not exist when the model trained (held-out, late-launch, after the temporal cutoff);
        # as a negative of every step it would be pushed below everything and never recommended as a new item.
        # Not persistent: rebuilt from the built data wherever the model is built.
        self.neg_ok: torch.Tensor | None
        if self.uses_table and negative_items is not None:
            self.register_buffer("neg_ok", negative_items.bool().clone(), persistent=False)
        else:
            self.neg_ok = None
        self.scale = LogitScale(scale_init, scale_max)
        self.repeat = RepeatScore() if repeat_score else None
        self.nce_threshold = nce_threshold
        self.dedup = dedup
        self.dim = d_user
        # parameters that start from random init (set by ``build``; the trainer may give them their own lr)
        self._new_prefixes = ["item.item_token", "proj", "scale", "repeat"]
        self._tokens_fp: str | None = None

    # ------------------------------------------------------------------ towers

    def to_shared(self, raw: torch.Tensor) -> torch.Tensor:
        """Item-LLM output [n, d_item] -> the shared space: adaptor, projection or identity."""
        if self.adaptor is not None:
            return self.adaptor(self.adaptor_drop(raw))
        return self.proj(raw) if self.proj is not None else raw

    def encode_items(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        """Embeddings in the shared space for item idx [n] (all > 0), with token counts."""
        emb, counts = self.item(idx)
        return self._with_delta(self.to_shared(emb), idx), counts

    def _with_delta(self, emb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.id_delta is None:
            return emb
        idx = idx.to(emb.device)
        on = self.id_seen[idx]
        if self.training and self._delta_keep is not None:
            on = on & self._delta_keep[idx]
        missing = self.cold_delta if self.cold_delta is not None else 0.0  # an item without its own delta
        return emb + torch.where(on[:, None], self.id_delta(idx), missing)

    @property
    def item_frozen(self) -> bool:
        """Whether the Item LLM is frozen now (then the table is exact and every lookup reads it)."""
        return self.uses_table and bool(self.frozen_now)

    def item_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        """[n, d] float32; padding idx 0 maps to a zero vector."""
        idx = idx.reshape(-1).long()
        out = torch.zeros(len(idx), self.dim, device=self.scale.log_scale.device)
        real = idx > 0
        if real.any():
            if self.item_frozen and int(self.table_step) >= 0:
                rows = idx[real].to(self.item_table.device)
                emb = self._with_delta(self.to_shared(self.item_table[rows]), rows)
            else:
                emb, _ = self.encode_items(idx[real])
            out[real.to(out.device)] = emb.float()
        return out

    # ------------------------------------------------------------------ the item table

    @torch.no_grad()
    def refresh_table(self, step: int, progress: bool = False) -> float:
        """Re-encode the whole catalogue with the current Item LLM (no gradient, eval mode, chunks of
        ``train.item_table_batch`` items, so memory stays bounded); returns the seconds it took."""
        import time

        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        n = self.item.n_items
        was = self.item.training
        self.item.eval()
        try:
            for start in tqdm(range(1, n, self.table_batch), desc="item table", unit="chunk", leave=False,
                              disable=not progress):  # fmt: skip
                idx = torch.arange(start, min(start + self.table_batch, n))
                emb, _ = self.item(idx)
                self.item_table[start : start + len(idx)] = emb.float().to(self.item_table.device)
        finally:
            self.item.train(was)
        self.table_step.fill_(step)
        seconds = time.perf_counter() - t0
        log.info("item table: %d items encoded at step %d in %.1fs", n - 1, step, seconds)
        return seconds

    def unfreeze_item(self) -> None:
        """End of the frozen stage (train.frozen_share): from now on items go through the Item LLM."""
        self.frozen_now.fill_(0)

    def _table_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Shared-space embeddings of table rows (padding 0 -> zeros), with gradients into the adaptor."""
        flat = idx.reshape(-1)
        emb = self._with_delta(self.to_shared(self.item_table[flat]), flat)
        return emb * (flat > 0).to(emb.dtype)[:, None]

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
        if self.id_delta is not None and self.delta_dropout > 0 and self.training:
            # rank 0's draw on every rank: the same items lose their delta in the whole (distributed) step
            draw = torch.rand(self.item.n_items, device=self.id_seen.device)
            self._delta_keep = broadcast_(draw) >= self.delta_dropout
            try:
                return self._train_loss(windows, negatives)
            finally:
                self._delta_keep = None
        return self._train_loss(windows, negatives)

    def _train_loss(self, windows: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        B, W = windows.shape
        windows, negatives = windows.long(), negatives.long()
        pool_ids: torch.Tensor | None = None  # negatives' item idx, when they come from the (stale) table
        rep_ids: torch.Tensor | None = None  # the pool's item idx otherwise, for the repeat score
        neg_valid: torch.Tensor | None = None  # bank negatives that existed in training
        if not self.uses_table or (self.loss_kind == "sampled" and not self.item_frozen):
            flat = torch.cat([windows.reshape(-1), negatives.reshape(-1)])
            emb, counts = self._step_embeddings(flat)
            win = emb[: B * W].view(B, W, -1)
            pool = gather_with_grad(emb[B * W :])
            rep_ids = gather_ids(negatives) if self.repeat is not None else None
        else:
            flat = windows.reshape(-1)
            if self.item_frozen:  # table lookups only: nothing goes through the Item LLM
                win = self._table_rows(flat).view(B, W, -1)
                counts = {"items": 0, "item_tokens": 0, "padded_tokens": 0}
            else:  # only the step's history and targets need gradients
                emb, counts = self._step_embeddings(flat)
                win = emb.view(B, W, -1)
            if self.loss_kind == "full":  # every item of the catalogue (seen in training), one pool on every rank
                if self.neg_ok is not None:
                    pool_ids = self.neg_ok.nonzero()[:, 0].to(windows.device)
                else:
                    pool_ids = torch.arange(1, self.item.n_items, device=windows.device)
                pool = self._table_rows(pool_ids)
            else:  # "bank", or "sampled" while frozen: the sampled negatives' table rows
                pool = gather_with_grad(self._table_rows(negatives))
                pool_ids = gather_ids(negatives)
                if self.neg_ok is not None:  # same shapes on every rank: unseen ones are masked, not dropped
                    neg_valid = self.neg_ok[pool_ids]
        in_mask = windows[:, :-1] != 0
        pred = self.user(win[:, :-1], in_mask)
        tmask = target_mask(windows)
        scale = self.scale()
        if not bool(tmask.any()):
            # Keep every parameter in the graph (DDP expects gradients for all).
            loss = pred.sum() * 0.0 + scale * 0.0
            stats = {"scale": float(scale), "negatives": 0.0}
        else:
            # a stale table row of the target itself is no negative, even when its cosine fell below the threshold
            pos_ids = windows[:, 1:][tmask] if pool_ids is not None else None
            repeat = None
            if self.repeat is not None:  # the pool's item idx, whichever way it was drawn
                ids = pool_ids if pool_ids is not None else rep_ids
                assert ids is not None
                repeat = (self.repeat.value, *self.repeat.seen(windows, tmask, ids, self.item.n_items))
            loss, stats = infonce(pred[tmask], win[:, 1:][tmask], pool, scale, self.nce_threshold,
                                  pos_ids=pos_ids, neg_ids=pool_ids, neg_valid=neg_valid, repeat=repeat)  # fmt: skip
        stats.update({k: float(v) for k, v in counts.items()})
        stats["targets"] = float(tmask.sum())
        stats["slots"] = float(int((flat > 0).sum()))  # item slots before deduplication
        return LossOutput(loss=loss, stats=stats)

    def new_parameter_prefixes(self) -> list[str]:
        return list(self._new_prefixes)

    def no_weight_decay(self) -> set[str]:
        return {"item.item_token", "scale.log_scale"}


LOSSES = ("sampled", "bank", "full")
ADAPTORS = ("none", "linear", "mlp")


def _adaptor(kind: str, d_in: int, d_out: int) -> nn.Module | None:
    """UniSRec-style map from (frozen) text embeddings into the shared space; LayerNorm keeps the scale of
    adapted vectors steady whatever the pooled Item-LLM output's norm."""
    if kind == "none":
        return None
    if kind == "linear":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out))
    return nn.Sequential(nn.Linear(d_in, 2 * d_out), nn.GELU(), nn.Linear(2 * d_out, d_out), nn.LayerNorm(d_out))


def _seen_items(cfg: "Config", built: "BuiltData") -> torch.Tensor:
    """bool [n_items]: items that occur in the training part of the sequences (the split plan's)."""
    from hllm.data.dataset import train_sequences

    train = train_sequences(built.sequences, built.split_plan(cfg.eval.protocol))
    seen = torch.zeros(built.n_items, dtype=torch.bool)
    seen[torch.from_numpy(np.unique(train.items).astype(np.int64))] = True
    seen[0] = False
    return seen


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
        tune=icfg.tune,
        tune_layers=icfg.tune_layers,
        lora_r=icfg.lora_r,
        hidden_cache_mb=icfg.hidden_cache_mb,
    )
    user_bb = load_backbone(
        ucfg.path,
        ucfg.config,
        from_scratch=ucfg.from_scratch,
        attn_implementation=ucfg.attn_implementation,
        what="model.user",
    )
    user = UserLLM(user_bb, input_dropout=ucfg.input_dropout)
    # items of the training part: the id_delta rows that train, and the table negatives (see HLLM.__init__)
    table = icfg.tune == "frozen" or tcfg.hllm_loss != "sampled" or tcfg.frozen_share > 0
    seen = _seen_items(cfg, built) if icfg.id_delta or table else None
    model = HLLM(
        item,
        user,
        projection=ucfg.projection,
        scale_init=tcfg.scale_init,
        scale_max=tcfg.scale_max,
        nce_threshold=tcfg.nce_threshold,
        dedup=tcfg.dedup_items,
        adaptor=icfg.adaptor,
        adaptor_dropout=icfg.adaptor_dropout,
        loss=tcfg.hllm_loss,
        frozen_stage=tcfg.frozen_share > 0 and icfg.tune != "frozen",
        table_batch=tcfg.item_table_batch,
        seen_items=seen if icfg.id_delta else None,
        negative_items=seen,
        delta_dropout=icfg.id_delta_dropout,
        cold_delta=icfg.cold_delta,
        repeat_score=cfg.model.repeat_score,
    )
    if model.id_delta is not None:
        model._new_prefixes.append("id_delta")
    if model.cold_delta is not None:
        model._new_prefixes.append("cold_delta")
    if model.adaptor is not None:
        model._new_prefixes.append("adaptor")
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
