"""SASRec baseline (Kang & McAuley 2018) in the HLLM harness.

ID embeddings + learned positional embeddings + a causal pre-norm transformer,
trained with the same InfoNCE (:func:`hllm.models.losses.infonce`: cosine, learnable
scale, shared negative pool gathered across ranks, false-negative filter) as
HLLM, and evaluated under the same protocol, so the comparison is like for like.
The paper's SASRec* rows use this setup too.

Positions count from the user's first real item (0, 1, 2, ...), not from the
window's first slot, so a prefix gets the same encoding however much left
padding precedes it (training windows and evaluation histories may differ in
width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hllm.data.dataset import PAD, BuiltData
from hllm.models.base import IdSeqModel


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.sasrec_dim {dim} must be divisible by model.sasrec_heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(IdSeqModel):
    def __init__(
        self,
        n_items: int,
        dim: int = 64,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        max_len: int = 50,
        scale_init: float = 1 / 0.07,
        scale_max: float = 100.0,
        nce_threshold: float = 0.99,
        full_softmax: bool = False,
        repeat_score: bool = False,
    ):
        super().__init__()
        self.full_softmax = full_softmax
        from hllm.models.losses import LogitScale, RepeatScore

        self.max_len = max_len
        self.nce_threshold = nce_threshold
        self.item_emb = nn.Embedding(n_items, dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_norm = nn.LayerNorm(dim)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.scale = LogitScale(scale_init, scale_max)
        self.repeat = RepeatScore() if repeat_score else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """emb [B, L, d] item embeddings, mask bool [B, L] (left padding) -> [B, L, d]."""
        n = emb.shape[1]
        pos = (mask.long().cumsum(1) - 1).clamp(0, self.max_len - 1)
        x = self.emb_drop(self.emb_norm(emb + self.pos_emb(pos))) * mask.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=emb.device).tril()
        # attend to earlier real items; a padded slot attends to itself only, so no row is
        # fully masked (that would give NaN) and real positions never see padding
        allowed = (causal & mask[:, None, :]) | torch.eye(n, dtype=torch.bool, device=emb.device)
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for blk in self.blocks:
            x = blk(x, allowed)
        return self.final_norm(x)


def build(cfg, built: BuiltData, tokens=None) -> SASRec:
    """Registered under ``model.kind = "sasrec"`` in :func:`hllm.models.build_model`."""
    m = cfg.model
    return SASRec(
        n_items=built.n_items,
        dim=m.sasrec_dim,
        layers=m.sasrec_layers,
        heads=m.sasrec_heads,
        dropout=m.sasrec_dropout,
        # positions beyond the training window are never trained; size for the longer of the two
        max_len=max(cfg.build.max_seq_len, cfg.eval.protocol.max_history) + 1,
        scale_init=cfg.train.scale_init,
        scale_max=cfg.train.scale_max,
        full_softmax=m.sasrec_loss == "full",
        nce_threshold=cfg.train.nce_threshold,
        repeat_score=m.repeat_score,
    )
