"""The Item LLM: item text -> one embedding per item.

Input = the item's pre-tokenised text (from the token cache; never tokenised
here) followed by one learnable [ITEM] vector (outside the vocabulary, init
N(0, 0.02)) fed through ``inputs_embeds``; the embedding is the final hidden
state at that slot (the paper), or the mean over the text tokens (``pooling:
mean``, the paper's weaker ablation).

Two input layouts give the same embeddings (tested):

- ``padded`` (default, CPU): items right-padded to their group's longest text;
  HF builds the per-item causal (decoders) or bidirectional (encoders) mask.
  Items are grouped by length (``length_buckets``) so padding stays small.
- ``packed`` (GPU): all items in one row with positions restarting per item and
  no padding at all. Decoders rely on HF's packed-sequence support (varlen
  kernels under ``flash_attention_2``, a block-causal mask under sdpa);
  encoders get an explicit block-diagonal mask (sdpa/eager only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hllm.data.dataset import TokenCache
from hllm.models.hf import hidden_size, is_encoder
from hllm.models.item_batch import ItemBatch, length_buckets, packed_batch, padded_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

POOLINGS = ("item_token", "mean")
LAYOUTS = ("padded", "packed")


class ItemLLM(nn.Module):
    def __init__(
        self,
        backbone: PreTrainedModel,
        tokens: TokenCache,
        *,
        pooling: str = "item_token",
        layout: str = "padded",
        max_tokens_per_forward: int = 8192,
        pad_id: int = 0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.item.pooling must be one of {POOLINGS}, got {pooling!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"model.item.layout must be one of {LAYOUTS}, got {layout!r}")
        self.backbone = backbone
        self.hidden_size = hidden_size(backbone)
        self.encoder = is_encoder(backbone.config)
        self.pooling = pooling
        self.layout = layout
        self.max_tokens_per_forward = max_tokens_per_forward
        self.pad_id = pad_id
        self.tokens = tokens  # numpy, not state: rebuilt from the data on load
        self.item_token = nn.Parameter(torch.randn(self.hidden_size) * 0.02) if pooling == "item_token" else None
        if layout == "packed" and self.encoder and backbone.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError("model.item.layout=packed with an encoder needs attn_implementation sdpa or eager")

    @property
    def n_items(self) -> int:
        return len(self.tokens.offsets) - 1

    def text_lengths(self, idx: np.ndarray) -> np.ndarray:
        return self.tokens.offsets[idx + 1] - self.tokens.offsets[idx]

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        """Embeddings [n, d] for item idx [n] (all > 0) plus token counts
        (``item_tokens`` real, ``padded_tokens`` run through the model)."""
        idx_np = idx.detach().cpu().numpy().astype(np.int64)
        if len(idx_np) and (idx_np.min() < 1 or idx_np.max() >= self.n_items):
            raise IndexError(f"item idx out of range [1, {self.n_items}): min {idx_np.min()}, max {idx_np.max()}")
        counts = {"items": len(idx_np), "item_tokens": 0, "padded_tokens": 0}
        if len(idx_np) == 0:
            return torch.zeros(0, self.hidden_size, device=self._device()), counts
        groups = length_buckets(self.text_lengths(idx_np), self.max_tokens_per_forward, extra=self._extra)
        outs = []
        for g in groups:
            batch = self._make_batch(idx_np[g])
            counts["item_tokens"] += batch.n_tokens
            counts["padded_tokens"] += batch.n_padded
            outs.append(self._encode(batch))
        emb = torch.cat(outs)
        order = np.concatenate(groups)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return emb[torch.from_numpy(inverse).to(emb.device)], counts

    @property
    def _extra(self) -> int:
        return 1 if self.item_token is not None else 0

    def _make_batch(self, idx: np.ndarray) -> ItemBatch:
        make = packed_batch if self.layout == "packed" else padded_batch
        return make(self.tokens, idx, self.pad_id, item_slot=self.item_token is not None)

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _encode(self, b: ItemBatch) -> torch.Tensor:
        dev = self._device()
        ids = b.input_ids.to(dev)
        embeds = self.backbone.get_input_embeddings()(ids)
        slot = b.item_slot.to(dev)
        if self.item_token is not None:
            embeds = torch.where(slot[..., None], self.item_token.to(embeds.dtype), embeds)
        kwargs = {}
        if b.attention_mask is not None:
            kwargs["attention_mask"] = b.attention_mask.to(dev)
        if b.position_ids is not None:
            kwargs["position_ids"] = b.position_ids.to(dev)
            if self.encoder:
                assert b.seq_id is not None  # a packed batch carries both position_ids and seq_id
                kwargs["attention_mask"] = self._block_mask(b.seq_id.to(dev), embeds.dtype)
        hidden = self.backbone(inputs_embeds=embeds, use_cache=False, **kwargs).last_hidden_state
        if self.item_token is not None:
            return hidden[slot]  # row-major order = item order within the batch
        return self._mean_pool(hidden, b, dev)

    def _mean_pool(self, hidden: torch.Tensor, b: ItemBatch, dev: torch.device) -> torch.Tensor:
        text = b.text_mask.to(dev)
        if b.seq_id is None:  # padded [n, T, d]
            w = text.to(hidden.dtype)
            return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        h = hidden[0]  # packed [T, d]
        n = len(b.lengths)
        w = text[0].to(h.dtype)
        sums = torch.zeros(n, h.shape[-1], dtype=h.dtype, device=dev).index_add(0, b.seq_id.to(dev), h * w[:, None])
        cnt = torch.zeros(n, dtype=h.dtype, device=dev).index_add(0, b.seq_id.to(dev), w)
        return sums / cnt.clamp(min=1)[:, None]

    @staticmethod
    def _block_mask(seq_id: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive [1, 1, T, T] mask letting each token see only its own item (encoders)."""
        same = seq_id[:, None] == seq_id[None, :]
        mask = torch.zeros(same.shape, dtype=dtype, device=seq_id.device)
        mask.masked_fill_(~same, torch.finfo(dtype).min)
        return mask[None, None]
