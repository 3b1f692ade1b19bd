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

How it trains (``tune``): ``full`` (every weight, the paper), ``frozen`` (no
gradient at all; HLLM then encodes the catalogue once into a table), ``top``
(only the top ``tune_layers`` blocks and [ITEM]; encoders only) or ``lora``
(peft LoRA adapters on every linear layer of the blocks, base weights frozen).
Under ``top`` the frozen lower blocks run once per item over the text alone and
their token states are cached (bounded by ``hidden_cache_mb``); the [ITEM]
vector then enters at the first tuned block, so a step pays for k blocks, not
all of them, forward and backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

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
TUNES = ("full", "frozen", "top", "lora")


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
        tune: str = "full",
        tune_layers: int = 1,
        lora_r: int = 8,
        hidden_cache_mb: int = 1024,
    ):
        super().__init__()
        if tune not in TUNES:
            raise ValueError(f"model.item.tune must be one of {TUNES}, got {tune!r}")
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
        self.tune = tune
        self.hidden_cache_mb = hidden_cache_mb
        self._lower: tuple[torch.Tensor, np.ndarray] | None = None  # "top": cached lower-block token states
        self._n_lower = 0
        if tune == "lora":
            self._add_lora(lora_r)
        elif tune == "top":
            self._n_lower = self._split_blocks(tune_layers)
        self._freeze()

    # ------------------------------------------------------------------ tuning

    def _blocks(self) -> nn.ModuleList:
        enc = getattr(self.backbone, "encoder", None)
        layers = getattr(enc, "layer", None)
        if not self.encoder or not isinstance(layers, nn.ModuleList) or not hasattr(self.backbone, "embeddings"):
            raise ValueError(
                "model.item.tune=top caches lower-block states of BERT-style encoders (embeddings + encoder.layer); "
                f"{self.backbone.config.model_type!r} is not one: use model.item.tune=lora or full"
            )
        return layers

    def _split_blocks(self, k: int) -> int:
        n = len(self._blocks())
        if not 1 <= k <= n:
            raise ValueError(f"model.item.tune_layers must lie in [1, {n}] for this Item LLM, got {k}")
        if self.layout != "padded":
            raise ValueError("model.item.tune=top needs model.item.layout=padded")
        return n - k

    def _add_lora(self, r: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        # every linear layer inside the transformer blocks (attention and FFN), in place, so state-dict keys
        # stay under item.backbone.* and a checkpoint rebuilds by applying the same config before loading
        names = sorted({n.rsplit(".", 1)[-1] for n, m in self.backbone.named_modules()
                        if isinstance(m, nn.Linear) and ("layer" in n or "layers" in n)})  # fmt: skip
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names),
                                self.backbone)  # fmt: skip

    def _freeze(self) -> None:
        """requires_grad per ``tune``; what is frozen never gets a gradient (tested)."""
        if self.tune == "full":
            return
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(self.tune == "lora" and "lora_" in name)
        if self.tune == "top":
            for p in self._blocks()[self._n_lower :].parameters():
                p.requires_grad_(True)
        if self.item_token is not None:
            self.item_token.requires_grad_(self.tune != "frozen")

    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

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
            outs.append(self._encode_top(idx_np[g], batch) if self._n_lower else self._encode(batch))
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

    # ------------------------------------------------------------------ "top": cached lower blocks

    def _lower_states(self, b: ItemBatch) -> torch.Tensor:
        """Token states [n, T, d] after the frozen lower blocks, text only (no [ITEM]), no gradient."""
        from transformers.masking_utils import create_bidirectional_mask

        dev = self._device()
        text = b.text_mask.to(dev)
        att = text.long()
        att[text.sum(1) == 0, 0] = 1  # an empty text still needs one attended position
        embeddings = cast(nn.Module, self.backbone.embeddings)
        lower = [embeddings, *self._blocks()[: self._n_lower]]
        modes = [m.training for m in lower]
        try:  # frozen blocks run without dropout, so the cache is one fixed function of the weights
            for m in lower:
                m.eval()
            with torch.no_grad():
                h = embeddings(input_ids=b.input_ids.to(dev))
                mask = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=h, attention_mask=att)
                for blk in lower[1:]:
                    h = blk(h, mask)
        finally:
            for m, was in zip(lower, modes):
                m.train(was)
        return h

    def _lower_cache(self) -> tuple[torch.Tensor, np.ndarray] | None:
        """Every item's lower-block token states, flat [total tokens, d] + offsets (the token cache's rows),
        computed once (the lower blocks never change); None when over ``hidden_cache_mb``."""
        if self._lower is not None:
            return self._lower
        offsets = self.tokens.offsets.astype(np.int64)
        mb = int(offsets[-1]) * self.hidden_size * 4 / 2**20
        if mb > self.hidden_cache_mb:
            return None
        from tqdm.auto import tqdm

        flat = torch.zeros(int(offsets[-1]), self.hidden_size, device=self._device())
        idx = np.arange(1, self.n_items)
        groups = length_buckets(self.text_lengths(idx), self.max_tokens_per_forward, extra=0)
        for g in tqdm(groups, desc="item lower blocks", unit="batch", leave=False):
            items = idx[g]
            b = padded_batch(self.tokens, items, self.pad_id, item_slot=False)
            h = self._lower_states(b)
            text = b.text_mask.to(h.device)
            rows = torch.from_numpy(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in items]))
            flat[rows.to(h.device)] = h[text]  # row-major = item order, token order
        self._lower = (flat, offsets)
        return self._lower

    def _encode_top(self, idx: np.ndarray, b: ItemBatch) -> torch.Tensor:
        """The tuned top blocks over cached (or freshly computed, no-grad) lower states + [ITEM] slot."""
        from transformers.masking_utils import create_bidirectional_mask

        dev = self._device()
        text = b.text_mask.to(dev)
        cache = self._lower_cache()
        plain = padded_batch(self.tokens, idx, self.pad_id, item_slot=False)
        if cache is None:
            lower = self._lower_states(plain)
        else:
            flat, offsets = cache
            lower = flat.new_zeros(*plain.input_ids.shape, self.hidden_size)
            rows = torch.from_numpy(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]))
            lower[plain.text_mask.to(dev)] = flat[rows.to(dev)]
        width = text.shape[1]
        h = lower.new_zeros(len(idx), width, self.hidden_size)
        h[:, : lower.shape[1]] = lower[:, :width]
        slot = b.item_slot.to(dev)
        if self.item_token is not None:
            h = torch.where(slot[..., None], self.item_token.to(h.dtype), h)
        assert b.attention_mask is not None  # padded layout (checked in __init__)
        mask = create_bidirectional_mask(config=self.backbone.config, inputs_embeds=h,
                                         attention_mask=b.attention_mask.to(dev))  # fmt: skip
        for blk in self._blocks()[self._n_lower :]:
            h = blk(h, mask)
        if self.item_token is not None:
            return h[slot]
        return self._mean_pool(h, b, dev)
