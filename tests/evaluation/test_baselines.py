"""Popularity, SASRec and GRU4Rec baselines through the same evaluation path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hllm.evaluation import metrics as M
from hllm.evaluation.evaluate import evaluate
from hllm.models import gru4rec, pop, sasrec
from tests.helpers.evalkit import make_built, small_cfg


def test_popularity_counts_training_part_only(tmp_path):
    # training part = all but the last two items of each sequence
    seqs = [[1, 1, 2, 3, 4], [2, 1, 5, 6], [3, 2, 4, 6]]
    built = make_built(tmp_path / "b", seqs, n_items=7)
    model = pop.build(small_cfg(), built)
    # train parts: [1,1,2], [2,1], [3,2] -> 1:3, 2:3, 3:1; valid/test targets 3,4,5,6,4,6 do not count
    assert model.counts.tolist() == [0, 3, 3, 1, 0, 0, 0]
    assert sum(p.numel() for p in model.parameters()) == 0
    assert "counts" in model.state_dict()
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        model.train_loss(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_popularity_evaluation_hand_computed(tmp_path):
    seqs = [[1, 1, 2, 3, 4], [2, 1, 5, 6], [3, 2, 4, 6]]
    built = make_built(tmp_path / "b", seqs, n_items=7)
    cfg = small_cfg(ks=(1, 2, 5))
    res = evaluate(pop.build(cfg, built), built, cfg, "test", progress=False)
    # counts 1:3 2:3 3:1 4:0 5:0 6:0
    # u0 target 4, history {1,2,3}: candidates 4,5,6 all 0 -> tied with 5 and 6 -> rank 2
    # u1 target 6, history {1,2,5}: candidates 3:1 4:0 6:0 -> behind 3, tied with 4 -> rank 2
    # u2 target 6, history {2,3,4}: candidates 1:3 5:0 6:0 -> behind 1, tied with 5 -> rank 2
    assert res.per_user["rank"].tolist() == [2, 2, 2]
    assert res.metrics["recall@2"] == 0.0 and res.metrics["recall@5"] == 1.0
    cfg.eval.protocol.mask_history = False
    res = evaluate(pop.build(cfg, built), built, cfg, "test", progress=False)
    # u0 without masking: 1:3 2:3 3:1 ahead, 5 and 6 tied -> rank 5
    assert res.per_user["rank"][0] == 5


def _cfg(**kw):
    cfg = small_cfg(ks=(1, 5, 10))
    cfg.model.kind = "sasrec"
    cfg.model.sasrec_dim = 16
    cfg.model.sasrec_heads = 2
    cfg.model.sasrec_layers = 1
    cfg.model.sasrec_dropout = 0.0
    cfg.build.max_seq_len = 6
    cfg.eval.protocol.max_history = 6
    for k, v in kw.items():
        setattr(cfg.model, k, v)
    return cfg


def test_sasrec_is_causal_and_padding_invariant(tmp_path):
    built = make_built(tmp_path / "b", [[1, 2, 3, 4]], n_items=10)
    torch.manual_seed(0)
    model = sasrec.build(_cfg(), built).eval()
    a = torch.tensor([[0, 0, 3, 5, 7, 2]])
    b = torch.tensor([[0, 0, 3, 5, 7, 9]])  # differs only in the last item
    with torch.no_grad():
        ha = model.encode(model.item_emb(a), a != 0)
        hb = model.encode(model.item_emb(b), b != 0)
        assert torch.allclose(ha[:, :-1], hb[:, :-1])  # earlier positions never see later items
        assert not torch.allclose(ha[:, -1], hb[:, -1])
        short = torch.tensor([[0, 0, 0, 0, 3, 5, 7, 2]])  # same history, more left padding
        u1 = model.user_embeddings(model.item_emb(a), a != 0)
        u2 = model.user_embeddings(model.item_emb(short), short != 0)
        assert torch.allclose(u1, u2, atol=1e-6)
        assert torch.isfinite(ha).all()  # padded rows do not produce NaN


@pytest.mark.slow
def test_sasrec_learns_a_deterministic_sequence(tmp_path):
    """Users walk the catalogue i -> i+1; a few InfoNCE steps must beat popularity by far."""
    from hllm.data.dataset import train_sequences, training_windows

    n_items = 30
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(60):
        start = int(rng.integers(1, n_items - 8))
        seqs.append(list(range(start, start + 8)))
    built = make_built(tmp_path / "b", seqs, n_items=n_items)
    cfg = _cfg()
    torch.manual_seed(0)
    model = sasrec.build(cfg, built)
    windows = torch.from_numpy(
        training_windows(train_sequences(built.sequences), cfg.build.max_seq_len).astype(np.int64)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for step in range(30):
        neg = torch.randint(1, n_items, (16,))
        out = model.train_loss(windows, neg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert {"scale", "top1_acc"} <= set(out.stats)
    res = evaluate(model, built, cfg, "test", progress=False)
    base = evaluate(pop.build(cfg, built), built, cfg, "test", progress=False)
    assert res.protocol_hash == base.protocol_hash
    # the walk's last items occur only as test targets: an ID model cannot score them (misses, by rule)
    from hllm.evaluation.slices import item_train_counts

    es_targets = np.array([s[-1] for s in seqs])
    seen = item_train_counts(built.sequences, n_items)[es_targets] > 0
    assert 0 < (~seen).sum() < len(seqs) // 2
    hit = res.per_user["recall@1"]
    assert hit[seen].mean() > 0.8 and hit[~seen].max() == 0.0
    assert res.slices["new_items"]["n"] == (~seen).sum() and res.slices["new_items"]["recall@1"] == 0.0
    assert res.metrics["recall@1"] > base.metrics["recall@1"] + 0.4
    assert ((res.per_user["rank"] == M.MASKED) == ~seen).all()  # only the never-trained targets


def test_sasrec_full_softmax_trains_against_every_item(tmp_path):
    """``model.sasrec_loss: full``: the negatives are the whole catalogue (RecBole's CE), whatever the
    sampled pool; it learns the deterministic walk like the sampled loss does."""
    from hllm.data.dataset import train_sequences, training_windows

    n_items = 30
    rng = np.random.default_rng(0)
    seqs = [list(range(s, s + 8)) for s in rng.integers(1, n_items - 8, size=60)]
    built = make_built(tmp_path / "b", seqs, n_items=n_items)
    cfg = _cfg()
    cfg.model.sasrec_loss = "full"
    torch.manual_seed(0)
    model = sasrec.build(cfg, built)
    assert model.full_softmax
    windows = torch.from_numpy(
        training_windows(train_sequences(built.sequences), cfg.build.max_seq_len, "sliding").astype(np.int64)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    first = None
    for _ in range(30):
        out = model.train_loss(windows, torch.zeros(1, dtype=torch.long))  # the sampled pool is ignored
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    # every other real item is a negative: n_items - 1 real items, minus the target itself
    assert out.stats["negatives"] == pytest.approx(n_items - 2, abs=1.0)
    assert out.loss.item() < 0.5 * first
    res = evaluate(model, built, cfg, "test", progress=False)
    seen = res.slices["new_items"]["n"] < len(seqs)
    assert seen and res.slices["head_items"].get("recall@1", 0) + res.slices["tail_items"].get("recall@1", 0) > 0.8


def _gru_cfg(**kw):
    cfg = small_cfg(ks=(1, 5, 10))
    cfg.model.kind = "gru4rec"
    cfg.model.gru4rec_dim = 16
    cfg.model.gru4rec_hidden = 24
    cfg.model.gru4rec_dropout = 0.0
    cfg.build.max_seq_len = 6
    cfg.eval.protocol.max_history = 6
    for k, v in kw.items():
        setattr(cfg.model, k, v)
    return cfg


def test_gru4rec_is_causal_and_blind_to_left_padding(tmp_path):
    """A position's state depends on that user's items up to it only: not on later items, and not on how
    much padding precedes the history (a GRU fed the padding first would start from a moved state)."""
    built = make_built(tmp_path / "b", [[1, 2, 3, 4]], n_items=10)
    torch.manual_seed(0)
    model = gru4rec.build(_gru_cfg(), built).eval()
    a = torch.tensor([[0, 0, 3, 5, 7, 2], [0, 0, 0, 0, 0, 4]])
    b = torch.tensor([[0, 0, 3, 5, 7, 9], [0, 0, 0, 0, 0, 4]])  # row 0 differs only in the last item
    with torch.no_grad():
        ha = model.encode(model.item_emb(a), a != 0)
        hb = model.encode(model.item_emb(b), b != 0)
        assert torch.allclose(ha[:, :-1], hb[:, :-1])  # earlier positions never see later items
        assert not torch.allclose(ha[0, -1], hb[0, -1])
        assert (ha[0, :2] == 0).all() and (ha[1, :5] == 0).all()  # padded slots carry nothing
        longer = torch.tensor([[0, 0, 0, 0, 3, 5, 7, 2]])  # the same history behind more padding
        unpadded = torch.tensor([[3, 5, 7, 2]])
        u = [model.user_embeddings(model.item_emb(x), x != 0) for x in (a[:1], longer, unpadded)]
        assert torch.allclose(u[0], u[1], atol=1e-6) and torch.allclose(u[0], u[2], atol=1e-6)
        # the same as a plain GRU over the real items alone
        ref, _ = model.gru(model.item_emb(unpadded))
        assert torch.allclose(u[0], model.out(ref[:, -1]), atol=1e-6)
        # a one-item history in a batch of longer ones gets its own one-step state
        one = model.user_embeddings(model.item_emb(torch.tensor([[4]])), torch.tensor([[True]]))
        assert torch.allclose(model.user_embeddings(model.item_emb(a), a != 0)[1], one[0], atol=1e-6)


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_gru4rec_learns_a_deterministic_sequence(tmp_path, loss):
    """The walk i -> i+1 again: GRU4Rec learns it with either loss, and scores no never-trained item."""
    from hllm.data.dataset import train_sequences, training_windows

    n_items = 30
    rng = np.random.default_rng(0)
    seqs = [list(range(s, s + 8)) for s in rng.integers(1, n_items - 8, size=60)]
    built = make_built(tmp_path / "b", seqs, n_items=n_items)
    cfg = _gru_cfg(gru4rec_loss=loss)
    torch.manual_seed(0)
    model = gru4rec.build(cfg, built)
    assert model.full_softmax == (loss == "full")
    windows = torch.from_numpy(
        training_windows(train_sequences(built.sequences), cfg.build.max_seq_len, "sliding").astype(np.int64)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(40):
        out = model.train_loss(windows, torch.randint(1, n_items, (16,)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    if loss == "full":  # every other real item is a negative: n_items - 1 real items, minus the target
        assert out.stats["negatives"] == pytest.approx(n_items - 2, abs=1.0)
    res = evaluate(model, built, cfg, "test", progress=False)
    from hllm.evaluation.slices import item_train_counts

    seen = item_train_counts(built.sequences, n_items)[np.array([s[-1] for s in seqs])] > 0
    hit = res.per_user["recall@1"]
    assert 0 < (~seen).sum() and hit[seen].mean() > 0.8 and hit[~seen].max() == 0.0
