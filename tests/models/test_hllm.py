"""HLLM: deduplicated step == every slot encoded, projection, clear errors, registry."""

from __future__ import annotations

import logging

import pytest
import torch

from hllm import testing as T
from hllm.data.dataset import load_built
from hllm.data.text import ensure_tokens
from hllm.models import build_model, get_builder, kinds
from hllm.training.setup import param_groups


def make(tmp_path, item_dir, built_dir, **overrides):
    cfg = T.tiny_config(tmp_path, item_dir, built_dir, **{"model.item.prompt": "", **overrides})
    built = load_built(cfg.paths.built_dir)
    torch.manual_seed(0)
    return build_model(cfg, built, ensure_tokens(cfg, built.dir)), cfg, built


# windows with repeats inside and across rows, padding, and negatives that collide with targets
WINDOWS = torch.tensor([[0, 0, 3, 5, 3, 7, 9], [2, 4, 4, 5, 11, 3, 8], [0, 0, 0, 0, 0, 12, 5]])
NEGATIVES = torch.tensor([9, 14, 15, 3, 14, 20, 21, 22])


@pytest.mark.parametrize("item", ["bert", "llama"])
def test_dedup_gives_the_same_loss_and_gradients_as_encoding_every_slot(
    tmp_path, tiny_bert_dir, tiny_llama_dir, built_dir, item
):
    item_dir = {"bert": tiny_bert_dir, "llama": tiny_llama_dir}[item]
    model, _, _ = make(tmp_path, item_dir, built_dir)
    results = {}
    for dedup in (True, False):
        model.dedup = dedup
        model.zero_grad()
        out = model.train_loss(WINDOWS, NEGATIVES)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[dedup] = (float(out.loss.detach()), grads, out.stats)
    (l1, g1, s1), (l2, g2, s2) = results[True], results[False]
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) == len(list(model.parameters()))  # every parameter gets a gradient
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)
    distinct = len(set(WINDOWS[WINDOWS > 0].tolist()) | set(NEGATIVES.tolist()))
    assert s1["items"] == distinct and s2["items"] == int((WINDOWS > 0).sum()) + len(NEGATIVES)
    assert s1["targets"] == 4 + 6 + 1


def test_identical_texts_are_filtered_as_false_negatives(tmp_path, tiny_bert_dir, built_dir):
    """The built data's last item has the first item's text: as a negative for a
    target of item 1 it is the same vector, and the 0.99 filter must drop it."""
    model, _, built = make(tmp_path, tiny_bert_dir, built_dir)
    last = built.n_items - 1
    model.eval()
    with torch.no_grad():
        e = model.item_embeddings(torch.tensor([1, last]))
        torch.testing.assert_close(e[0], e[1])
        w = torch.tensor([[2, 1]])
        kept = model.train_loss(w, torch.tensor([5, 6])).stats["negatives"]
        dup = model.train_loss(w, torch.tensor([5, 6, last])).stats["negatives"]
    assert dup == kept


def test_user_embeddings_is_the_last_position(tmp_path, tiny_bert_dir, built_dir):
    model, _, _ = make(tmp_path, tiny_bert_dir, built_dir)
    model.eval()
    with torch.no_grad():
        hist = torch.tensor([[0, 0, 4, 5], [1, 2, 3, 4]])
        emb = model.item_embeddings(hist.reshape(-1)).view(2, 4, -1)
        assert (emb[0, :2] == 0).all()  # padding idx 0 -> zero vector
        u = model.user_embeddings(emb, hist != 0)
        full = model.user(emb, hist != 0)
        torch.testing.assert_close(u, full[:, -1])
        # left padding is invisible: a 2-item history alone gives the same prediction
        alone = model.user_embeddings(emb[:1, 2:], hist[:1, 2:] != 0)
        torch.testing.assert_close(u[:1], alone, atol=1e-5, rtol=0)


def test_projection_when_hidden_sizes_differ(tmp_path, tiny_bert_dir, built_dir):
    user = {**T.TINY_USER, "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
    model, _, _ = make(tmp_path, tiny_bert_dir, built_dir, **{"model.user.config": user})
    assert model.proj is not None and model.proj.in_features == 32 and model.proj.out_features == 48
    assert model.item_embeddings(torch.tensor([1, 2])).shape == (2, 48)
    out = model.train_loss(WINDOWS, NEGATIVES)
    out.loss.backward()
    assert model.proj.weight.grad is not None
    with pytest.raises(ValueError, match=r"hidden size 32 != User LLM hidden size 48.*projection"):
        make(tmp_path, tiny_bert_dir, built_dir, **{"model.user.config": user, "model.user.projection": "none"})


def test_missing_model_path_is_a_clear_error_naming_the_setting(tmp_path, built_dir, tiny_bert_dir):
    built = load_built(built_dir)
    nope = str(tmp_path / "nope" / "model")
    cfg = T.tiny_config(tmp_path, tiny_bert_dir, built_dir, **{"model.user.path": nope})
    with pytest.raises(FileNotFoundError, match=rf"^model\.user\.path '{nope}' does not exist$"):
        build_model(cfg, built, ensure_tokens(cfg, built.dir))
    # the item tokenizer is loaded first (token cache), and names its setting too
    cfg = T.tiny_config(tmp_path, nope, built_dir)
    with pytest.raises(FileNotFoundError, match=rf"^model\.item\.path '{nope}' does not exist$"):
        build_model(cfg, built)
    cfg = T.tiny_config(tmp_path, "pkg:no_such_model_package", built_dir)
    with pytest.raises(FileNotFoundError, match=r"^model\.item\.path 'pkg:no_such_model_package': package"):
        build_model(cfg, built)
    # a folder that exists but holds no tokenizer
    (tmp_path / "empty").mkdir()
    cfg = T.tiny_config(tmp_path, tmp_path / "empty", built_dir)
    with pytest.raises(FileNotFoundError, match=r"^model\.item\.path .*empty.*: cannot load a tokenizer"):
        build_model(cfg, built)


def test_user_model_must_be_a_decoder(tmp_path, tiny_bert_dir, built_dir):
    with pytest.raises(ValueError, match="causal decoder"):
        make(tmp_path, tiny_bert_dir, built_dir, **{"model.user.path": str(tiny_bert_dir), "model.user.config": None})


def test_tokenizer_without_pad_token_gets_one_and_says_so(tmp_path, tiny_llama_dir, built_dir, caplog):
    with caplog.at_level(logging.WARNING):
        model, _, _ = make(tmp_path, tiny_llama_dir, built_dir, **{"model.item.prompt": "for"})
    assert "has no pad token" in caplog.text
    assert not model.item.encoder and model.item.pad_id == 0


def test_no_word_embeddings_or_lm_head_in_the_model(tmp_path, tiny_bert_dir, built_dir):
    model, _, _ = make(tmp_path, tiny_bert_dir, built_dir)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n or "pooler" in n for n in names)
    assert not any(n.startswith("user.") and "embed_tokens" in n for n in names)


def test_weight_decay_groups(tmp_path, tiny_bert_dir, built_dir):
    model, _, _ = make(tmp_path, tiny_bert_dir, built_dir)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"item.item_token", "scale.log_scale"} <= nd
    assert any("LayerNorm" in n or "norm" in n for n in nd) and any(n.endswith(".bias") for n in nd)
    assert all(not n.endswith(".bias") and "norm" not in n.lower() for n in d)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(d) + len(nd) == len(names)
    # parameters trained from scratch (User LLM from config, [ITEM], scale) can get their own lr
    groups = param_groups(model, 0.01, lr=1e-4, new_lr=1e-3)
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in groups if g["lr"] == 1e-3}
    new = by_lr[1e-3]
    assert {"item.item_token", "scale.log_scale"} <= new and any(n.startswith("user.") for n in new)
    assert not any(n.startswith("item.backbone.") for n in new)  # pretrained weights keep train.lr
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_registry_knows_every_kind_and_rejects_unknown():
    assert {"hllm", "sasrec", "pop"} <= set(kinds())
    with pytest.raises(ValueError, match="not registered"):
        get_builder("nope")


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_llama_dir, built_dir):
    from hllm.training.setup import _enable_gradient_checkpointing

    grads = []
    for ckpt in (False, True):
        model, _, _ = make(tmp_path, tiny_llama_dir, built_dir)
        model.train()
        if ckpt:
            assert _enable_gradient_checkpointing(model) == 2  # item and user backbones
        model.train_loss(WINDOWS, NEGATIVES).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_bf16_autocast_step_is_finite(tmp_path, tiny_bert_dir, built_dir):
    model, _, _ = make(tmp_path, tiny_bert_dir, built_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train_loss(WINDOWS, NEGATIVES)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_item_model_version_keys_on_the_item_tower_only(tmp_path, tiny_bert_dir, built_dir):
    """Export refresh (``hllm.serving.export.item_model_version``) and the item-embedding cache must change
    with the Item LLM, the [ITEM] vector and the projection, and not with the User LLM or the scale."""
    from hllm.serving.export import item_model_version

    user = {**T.TINY_USER, "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
    model, cfg, _ = make(tmp_path, tiny_bert_dir, built_dir, **{"model.user.config": user})
    assert model.item_state_prefixes[:2] == ("item.", "proj.") and model.proj is not None
    # the adaptor and, for a frozen Item LLM, the item table it reads belong to the item tower too
    assert {"adaptor.", "item_table", "frozen_now"} <= set(model.item_state_prefixes)
    base = item_model_version(model, cfg)
    keys = [k for k in model.state_dict() if not k.startswith(model.item_state_prefixes)]
    assert any(k.startswith("user.") for k in keys) and "scale.log_scale" in keys
    with torch.no_grad():
        for p in model.user.parameters():
            p.mul_(1.5)
        model.scale.log_scale.add_(0.3)
    assert item_model_version(model, cfg) == base
    for name in ("item.item_token", "proj.weight", "item.backbone.embeddings.word_embeddings.weight"):
        p = model.get_parameter(name)
        keep = p.detach().clone()
        with torch.no_grad():
            p.mul_(1.5)
        assert item_model_version(model, cfg) != base, name
        with torch.no_grad():
            p.copy_(keep)
    assert item_model_version(model, cfg) == base


def test_item_inputs_fingerprint_is_the_token_cache(tmp_path, tiny_bert_dir, built_dir):
    model, cfg, built = make(tmp_path, tiny_bert_dir, built_dir)
    other, _, _ = make(tmp_path, tiny_bert_dir, built_dir, **{"model.item.max_text_len": 8})
    assert model.item_inputs_fingerprint() == make(tmp_path, tiny_bert_dir, built_dir)[0].item_inputs_fingerprint()
    assert model.item_inputs_fingerprint() != other.item_inputs_fingerprint()
