"""The User LLM: a causal decoder over the sequence of item embeddings.

Fed ``inputs_embeds`` only (its word-embedding table is dropped), left-padded
with an attention mask, so the most recent item is always the last position.
The output at position i predicts the item at position i + 1.

Position ids count real items only (the first real item is position 0,
padding slots are clamped to 0 and masked anyway): HF's default positions
count padding too, which RoPE decoders (Llama, Qwen) shrug off (relative)
but absolute-position decoders (GPT-2's learned ``wpe``) do not, so the same
history would score differently depending on how much padding its batch has.
Training, evaluation, user-embedding export and serving all come through
``forward``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from hllm.models.hf import drop_input_embeddings, hidden_size, is_encoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class UserLLM(nn.Module):
    def __init__(self, backbone: PreTrainedModel, what: str = "model.user", input_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"{what}.input_dropout must lie in [0, 1), got {input_dropout}")
        if is_encoder(backbone.config):
            raise ValueError(
                f"{what}: the User LLM must be a causal decoder (e.g. llama, qwen2), got encoder "
                f"{backbone.config.model_type!r}"
            )
        drop_input_embeddings(backbone)
        self.backbone = backbone
        self.input_drop = nn.Dropout(input_dropout)  # identity in eval: serving and evaluation read every value
        self.hidden_size = hidden_size(backbone)
        # ALiBi decoders (bloom, mpt) take no position ids: their bias is relative already
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds [B, L, d], mask bool [B, L] (True = real item, left padding) -> [B, L, d]."""
        mask = mask.long()
        kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if self._takes_positions else {}
        out = self.backbone(inputs_embeds=self.input_drop(embeds), attention_mask=mask, use_cache=False, **kwargs)
        return out.last_hidden_state
