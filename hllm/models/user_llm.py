"""The User LLM: a causal decoder over the sequence of item embeddings.

Fed ``inputs_embeds`` only (its word-embedding table is dropped), left-padded
with an attention mask, so the most recent item is always the last position.
The output at position i predicts the item at position i + 1.
"""

from __future__ import annotations

import torch
from torch import nn

from hllm.models.hf import drop_input_embeddings, hidden_size, is_encoder


class UserLLM(nn.Module):
    def __init__(self, backbone: nn.Module, what: str = "model.user"):
        super().__init__()
        if is_encoder(backbone.config):
            raise ValueError(
                f"{what}: the User LLM must be a causal decoder (e.g. llama, qwen2), got encoder "
                f"{backbone.config.model_type!r}"
            )
        drop_input_embeddings(backbone)
        self.backbone = backbone
        self.hidden_size = hidden_size(backbone)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds [B, L, d], mask bool [B, L] (True = real item, left padding) -> [B, L, d]."""
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state
