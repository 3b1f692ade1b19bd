"""GRU4Rec baseline (Hidasi et al. 2016; RecBole's ``GRU4Rec`` layout) in the HLLM harness.

ID embeddings -> dropout -> a GRU -> a linear map back to the embedding size; the prediction at each
position scores the next item against the same ID table. RecBole's GRU4Rec (embedding 64, hidden 128,
one layer, dropout 0.3, cross-entropy over every item) was the strongest peer on MovieLens-100K under its
sequential protocol (issue 14), so an HLLM comparison that leaves it out flatters HLLM.

Trained with the harness's loss (:func:`hllm.models.losses.infonce`: cosine, learnable scale), over the
sampled pool or, with ``model.gru4rec_loss: full``, over every item as RecBole's CE does, and evaluated
under the same protocol as every other model.

Windows and histories are left-padded; a GRU that read the padding first would start each user from a
state the padding moved (zero inputs still pass through the gates' biases). Each row is therefore rolled so
that its real items come first, packed by length, run, and rolled back: the state at a position depends on
that user's items up to it and on nothing else, however much padding precedes them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hllm.data.dataset import PAD, BuiltData
from hllm.models.base import IdSeqModel


class GRU4Rec(IdSeqModel):
    def __init__(
        self,
        n_items: int,
        dim: int = 64,
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.3,
        scale_init: float = 1 / 0.07,
        scale_max: float = 100.0,
        nce_threshold: float = 0.99,
        full_softmax: bool = False,
        repeat_score: bool = False,
    ):
        super().__init__()
        from hllm.models.losses import LogitScale, RepeatScore

        self.full_softmax = full_softmax
        self.nce_threshold = nce_threshold
        self.item_emb = nn.Embedding(n_items, dim, padding_idx=PAD)
        self.emb_drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, dim)
        self.scale = LogitScale(scale_init, scale_max)
        self.repeat = RepeatScore() if repeat_score else None
        # RecBole's initialisation: Xavier-normal embeddings, Xavier-uniform recurrent weights
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
        for name, p in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """emb [B, L, d] item embeddings, mask bool [B, L] (left padding) -> [B, L, d]; padded slots are 0."""
        b, n, d = emb.shape
        lengths = mask.sum(1)
        pads = (n - lengths).unsqueeze(1)
        pos = torch.arange(n, device=emb.device).unsqueeze(0)
        first = (pos + pads) % n  # rolled slot j holds original slot j + pads: the real items come first
        x = self.emb_drop(emb.gather(1, first.unsqueeze(-1).expand(b, n, d)))
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.gru(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=n)
        back = (pos - pads) % n  # and back to the left-padded layout
        h = h.gather(1, back.unsqueeze(-1).expand(b, n, h.shape[-1]))
        return self.out(h) * mask.unsqueeze(-1)


def build(cfg, built: BuiltData, tokens=None) -> GRU4Rec:
    """Registered under ``model.kind = "gru4rec"`` in :func:`hllm.models.build_model`."""
    m = cfg.model
    return GRU4Rec(
        n_items=built.n_items,
        dim=m.gru4rec_dim,
        hidden=m.gru4rec_hidden,
        layers=m.gru4rec_layers,
        dropout=m.gru4rec_dropout,
        scale_init=cfg.train.scale_init,
        scale_max=cfg.train.scale_max,
        full_softmax=m.gru4rec_loss == "full",
        nce_threshold=cfg.train.nce_threshold,
        repeat_score=m.repeat_score,
    )
