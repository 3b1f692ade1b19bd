"""Cheap item-tower recipes (model.item.tune, model.item.adaptor, train.hllm_loss): what is frozen gets no
gradient, the cached lower blocks equal recomputing them, the bank/full loss equals a hand computation, and a
frozen Item LLM is never run in a step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hllm import testing as T
from hllm.data.dataset import load_built
from hllm.data.text import ensure_tokens
from hllm.models import build_model
from hllm.models.item_llm import ItemLLM
from hllm.models.losses import infonce

WINDOWS = torch.tensor([[0, 0, 3, 5, 3, 7, 9], [2, 4, 4, 5, 11, 3, 8]])
NEGATIVES = torch.tensor([9, 14, 15, 3])


def make(tmp_path, item_dir, built_dir, **overrides):
    cfg = T.tiny_config(tmp_path, item_dir, built_dir, **{"model.item.prompt": "", **overrides})
    built = load_built(cfg.paths.built_dir)
    torch.manual_seed(0)
    return build_model(cfg, built, ensure_tokens(cfg, built.dir)), cfg, built


def test_infonce_with_ids_drops_the_targets_own_bank_row_and_matches_a_hand_computation():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # row 1 is item 7: a stale copy of row 1's target
    scale = torch.tensor(2.0)
    loss, stats = infonce(pred, pos, neg, scale, threshold=0.99, pos_ids=torch.tensor([5, 7]),
                          neg_ids=torch.tensor([3, 7, 9]))  # fmt: skip
    c = 2**-0.5
    # row 0: positive cos 1/sqrt2, negatives cos 1, 0, 1/sqrt2 (none is item 5, none above 0.99 of its target)
    r0 = -2 * c + torch.logsumexp(torch.tensor([2 * c, 2.0, 0.0, 2 * c]), 0)
    # row 1: positive cos 1; negative item 7 is its own target (dropped by id), [0, 1] also cos 1 to the target
    # (dropped by the threshold: the same row), leaving [1, 0] (cos 0) and [1, -1] (cos -1/sqrt2)
    r1 = -2.0 + torch.logsumexp(torch.tensor([2.0, 0.0, -2 * c]), 0)
    assert float(loss) == pytest.approx(float((r0 + r1) / 2), rel=1e-6)
    assert stats["negatives"] == pytest.approx((3 + 2) / 2)


@pytest.mark.parametrize("kind", ["full", "bank"])
def test_frozen_table_loss_equals_a_hand_computation(tmp_path, tiny_bert_dir, built_dir, kind):
    sets = {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
            "train.hllm_loss": kind}  # fmt: skip
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir, **sets)
    model.refresh_table(0)
    calls = []
    handle = model.item.register_forward_hook(lambda *a: calls.append(1))
    out = model.train_loss(WINDOWS, NEGATIVES)
    handle.remove()
    assert calls == []  # a frozen Item LLM is never run in a step: table lookups only
    with torch.no_grad():
        adapted = model.adaptor(model.item_table)  # the adapted table, row = item idx
        emb = F.normalize(adapted, dim=-1)
        win = adapted[WINDOWS] * (WINDOWS > 0)[..., None]
        pred = F.normalize(model.user(win[:, :-1], WINDOWS[:, :-1] != 0), dim=-1)
        seen = model.neg_ok  # items of the training part: the only negatives (an unseen item did not exist yet)
        assert seen is not None and not bool(seen[0])
        neg_ids = seen.nonzero()[:, 0] if kind == "full" else torch.tensor([n for n in NEGATIVES if bool(seen[n])])
        s = float(model.scale())
        losses = []
        for b in range(WINDOWS.shape[0]):
            for i in range(WINDOWS.shape[1] - 1):
                x, y = int(WINDOWS[b, i]), int(WINDOWS[b, i + 1])
                if x == 0 or y == 0:
                    continue
                keep = [int(n) for n in neg_ids if int(n) != y and float(emb[y] @ emb[n]) <= 0.99]
                logits = s * torch.stack([pred[b, i] @ emb[y], *[pred[b, i] @ emb[n] for n in keep]])
                losses.append(-logits[0] + torch.logsumexp(logits, 0))
    assert float(out.loss.detach()) == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
    out.loss.backward()
    assert all(p.grad is None for p in model.item.parameters())
    assert model.adaptor[0].weight.grad is not None and model.adaptor[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tune", ["frozen", "top", "lora"])
def test_frozen_weights_get_no_gradient_and_the_tuned_ones_do(tmp_path, tiny_bert_dir, built_dir, tune):
    model, _, _ = make(tmp_path, tiny_bert_dir, built_dir, **{"model.item.tune": tune, "model.item.tune_layers": 1,
                       "train.hllm_loss": "bank"})  # fmt: skip
    model.refresh_table(0)
    model.train_loss(WINDOWS, NEGATIVES).loss.backward()
    got = {n for n, p in model.item.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    frozen = {n for n, p in model.item.named_parameters() if not p.requires_grad}
    assert frozen and not got & frozen
    if tune == "frozen":
        assert got == set()
    elif tune == "top":
        assert "item_token" in got and got and all(n == "item_token" or ".layer.1." in n for n in got)
        assert not any(".layer.0." in n or "embeddings" in n for n in got)
    else:
        assert (
            "item_token" in got
            and {n for n in got if n != "item_token"}
            and all("lora_" in n for n in got if n != "item_token")
        )


def test_top_tuning_reads_cached_lower_blocks_equal_to_recomputing_them(tmp_path, tiny_bert_dir, built_dir):
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir, **{"model.item.tune": "top"})
    item: ItemLLM = model.item
    item.eval()
    idx = torch.arange(1, built.n_items)
    with torch.no_grad():
        cached, _ = item(idx)
        assert item._lower is not None
        item._lower, item.hidden_cache_mb = None, 0  # over the cap: recomputed every call, never stored
        fresh, _ = item(idx)
        assert item._lower is None
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)


def test_top_tuning_rejects_a_decoder_item_model(tmp_path, tiny_llama_dir, built_dir):
    with pytest.raises(ValueError, match="tune=top"):
        make(tmp_path, tiny_llama_dir, built_dir, **{"model.item.tune": "top"})


@pytest.mark.parametrize("kind", ["full", "bank"])
def test_items_unseen_in_training_are_never_negatives(tmp_path, tiny_bert_dir, built_dir, kind):
    """A held-out / late-launch item is not a negative of any step: with it in the pool, a content model learns
    to rank every new item below everything (issue 14's cold-start finding)."""
    sets = {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
            "train.hllm_loss": kind}  # fmt: skip
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir, **sets)
    model.refresh_table(0)
    before = float(model.train_loss(WINDOWS, NEGATIVES).loss.detach())
    assert model.neg_ok is not None and bool(model.neg_ok[14])
    model.neg_ok[14] = False  # as if item 14 first occurred at test time
    with torch.no_grad():
        model.item_table[14] = model.item_table[9]  # make it a strong negative: any effect would show
    out = model.train_loss(WINDOWS, NEGATIVES)
    model.neg_ok[14] = True
    with_it = float(model.train_loss(WINDOWS, NEGATIVES).loss.detach())
    assert float(out.loss.detach()) != pytest.approx(with_it)  # item 14 was in the pool when seen...
    assert float(out.loss.detach()) < with_it  # ...and its (strong) negative logit is gone when unseen
    assert before != pytest.approx(with_it)
    assert "neg_ok" not in model.state_dict()  # rebuilt from the built data, never saved


def test_id_delta_moves_items_seen_in_training_only(tmp_path, tiny_bert_dir, built_dir):
    sets = {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
            "train.hllm_loss": "full", "model.item.id_delta": True}  # fmt: skip
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir, **sets)
    model.refresh_table(0)
    assert model.id_delta is not None and not bool(model.id_seen[0])
    model.id_seen[15] = False  # as if item 15 never occurred in training
    model.train_loss(WINDOWS, NEGATIVES).loss.backward()
    g = model.id_delta.weight.grad
    assert g is not None and g[15].abs().sum() == 0 and g[3].abs().sum() > 0  # 15 is only ever a negative
    with torch.no_grad():
        model.id_delta.weight.normal_()
        text = model.adaptor(model.item_table)
        e = model.item_embeddings(torch.arange(built.n_items))
    torch.testing.assert_close(e[15], text[15])  # an unseen item keeps its text embedding
    assert not torch.allclose(e[3], text[3]) and torch.all(e[0] == 0)


def test_id_delta_dropout_drops_whole_items_in_training_steps_only(tmp_path, tiny_bert_dir, built_dir):
    """model.item.id_delta_dropout (DropoutNet): within a training step a dropped item has no delta anywhere
    (no gradient reaches its row), a kept one has it; evaluation embeddings always carry every delta."""
    sets = {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
            "train.hllm_loss": "full", "model.item.id_delta": True, "model.item.id_delta_dropout": 0.5}  # fmt: skip
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir, **sets)
    assert model.delta_dropout == 0.5
    model.refresh_table(0)
    with torch.no_grad():
        model.id_delta.weight.normal_()
    model.train()
    torch.manual_seed(3)
    keep = torch.rand(built.n_items) >= 0.5  # the draw train_loss makes next under the same seed
    torch.manual_seed(3)
    model.train_loss(WINDOWS, NEGATIVES).loss.backward()
    assert model._delta_keep is None  # only for the step
    g = model.id_delta.weight.grad.abs().sum(1)
    seen = model.id_seen.clone()
    assert (g[~keep] == 0).all() and (g[keep & seen] > 0).any()  # every seen item is a full-softmax negative
    assert (g[keep & seen] > 0).all()
    model.eval()
    with torch.no_grad():
        e = model.item_embeddings(torch.arange(built.n_items))
        text = model.adaptor(model.item_table)
    moved = (e - text).abs().sum(1) > 0
    assert torch.equal(moved[1:], seen[1:])  # every seen item's delta, dropped in training or not
    with pytest.raises(ValueError, match="id_delta_dropout"):
        make(tmp_path / "bad", tiny_bert_dir, built_dir, **{**sets, "model.item.id_delta_dropout": 1.0})


def test_cold_delta_stands_in_for_every_missing_delta(tmp_path, tiny_bert_dir, built_dir):
    """model.item.cold_delta: one learned vector replaces the delta of the items dropped in a training step (so it
    gets their gradient) and of every item never seen in training at evaluation; seen items keep their own."""
    sets = {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
            "train.hllm_loss": "full", "model.item.id_delta": True, "model.item.id_delta_dropout": 0.5,
            "model.item.cold_delta": True}  # fmt: skip
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir, **sets)
    assert model.cold_delta is not None and "cold_delta" in model.new_parameter_prefixes()
    model.refresh_table(0)
    model.id_seen[15] = False  # as if item 15 never occurred in training
    model.train()
    model.train_loss(WINDOWS, NEGATIVES).loss.backward()
    assert model.cold_delta.grad is not None and model.cold_delta.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model.id_delta.weight.normal_()
        model.cold_delta.normal_()
        text = model.adaptor(model.item_table)
        e = model.item_embeddings(torch.arange(built.n_items))
    torch.testing.assert_close(e[15], text[15] + model.cold_delta)  # a new item: its text + the cold vector
    torch.testing.assert_close(e[3], text[3] + model.id_delta.weight[3])  # a seen item: its own delta
    assert torch.all(e[0] == 0)  # padding
    with pytest.raises(ValueError, match="cold_delta needs"):
        make(tmp_path / "bad", tiny_bert_dir, built_dir, **{**sets, "model.item.id_delta_dropout": 0.0})
