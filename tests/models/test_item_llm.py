"""Item LLM: the [ITEM] embedding, padded/packed batches vs item-by-item encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hllm.data.dataset import TokenCache
from hllm.models.hf import load_backbone
from hllm.models.item_llm import ItemLLM

TOL = 1e-5


def ragged_tokens(vocab: int, lengths: list[int], seed: int = 0) -> TokenCache:
    """Row 0 empty (padding), then one row of random ids per length."""
    rng = np.random.default_rng(seed)
    lens = np.array([0] + lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    ids = rng.integers(5, vocab, size=int(lens.sum())).astype(np.int32)
    return TokenCache(ids=ids, offsets=offsets)


def item_llm(path, tokens, **kw) -> ItemLLM:
    bb = load_backbone(
        str(path), None, from_scratch=False, attn_implementation=kw.pop("attn", "sdpa"), what="model.item"
    )
    torch.manual_seed(0)
    return ItemLLM(bb, tokens, **kw).eval()


@pytest.fixture(params=["bert", "llama"])
def model_dir(request, tiny_bert_dir, tiny_llama_dir):
    return {"bert": tiny_bert_dir, "llama": tiny_llama_dir}[request.param]


LENGTHS = [3, 9, 1, 14, 6, 9, 2, 11]


@torch.no_grad()
def test_item_embedding_is_final_hidden_state_at_item_slot(model_dir):
    m = item_llm(model_dir, ragged_tokens(40, LENGTHS))
    emb, _ = m(torch.tensor([2, 4]))
    for row, i in enumerate([2, 4]):
        ids = torch.from_numpy(m.tokens.of(i).astype(np.int64))[None]
        text = m.backbone.get_input_embeddings()(ids)
        x = torch.cat([text, m.item_token.view(1, 1, -1)], dim=1)  # text, then the [ITEM] vector
        hidden = m.backbone(inputs_embeds=x).last_hidden_state
        torch.testing.assert_close(emb[row], hidden[0, -1], atol=TOL, rtol=0)
    # the learnable vector is really what sits in that slot (a random shift: LayerNorm ignores a constant one)
    m.item_token.add_(torch.randn(m.item_token.shape, generator=torch.Generator().manual_seed(1)))
    emb2, _ = m(torch.tensor([2, 4]))
    assert (emb2 - emb).abs().max() > 1e-3


@torch.no_grad()
def test_item_token_initialised_small_random(tiny_bert_dir):
    m = item_llm(tiny_bert_dir, ragged_tokens(40, LENGTHS))
    assert m.item_token.shape == (32,)
    assert 0.005 < float(m.item_token.std()) < 0.05


@torch.no_grad()
@pytest.mark.parametrize("pooling", ["item_token", "mean"])
def test_padded_batch_equals_item_by_item(model_dir, pooling):
    m = item_llm(model_dir, ragged_tokens(40, LENGTHS), pooling=pooling, max_tokens_per_forward=40)
    idx = torch.arange(1, len(LENGTHS) + 1)
    batch, counts = m(idx)
    single = torch.cat([m(idx[i : i + 1])[0] for i in range(len(idx))])
    torch.testing.assert_close(batch, single, atol=TOL, rtol=0)
    assert counts["items"] == len(LENGTHS)
    assert counts["item_tokens"] == sum(LENGTHS) + (len(LENGTHS) if pooling == "item_token" else 0)
    # a token budget of 40 forces several length groups; their order must not leak into the result
    whole, _ = item_llm(model_dir, ragged_tokens(40, LENGTHS), pooling=pooling, max_tokens_per_forward=10_000)(idx)
    torch.testing.assert_close(batch, whole, atol=TOL, rtol=0)


@torch.no_grad()
def test_mean_pooling_averages_text_tokens(tiny_bert_dir):
    m = item_llm(tiny_bert_dir, ragged_tokens(40, LENGTHS), pooling="mean")
    emb, _ = m(torch.tensor([3]))
    ids = torch.from_numpy(m.tokens.of(3).astype(np.int64))[None]
    hidden = m.backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb[0], hidden[0].mean(0), atol=TOL, rtol=0)
    assert m.item_token is None


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("pooling", ["item_token", "mean"])
def test_packed_layout_equals_padded(model_dir, pooling, device):
    """Packed (one row, positions restart per item, no padding) vs padded, both under sdpa.
    Decoders go through HF's packed-sequence mask, encoders through our block mask. On CUDA
    this is the packed path that runs without flash-attn installed (fp32: kernels differ from
    the CPU ones, hence the looser tolerance)."""
    tokens = ragged_tokens(40, LENGTHS)
    padded = item_llm(model_dir, tokens, pooling=pooling).to(device)
    packed = item_llm(model_dir, tokens, pooling=pooling, layout="packed").to(device)
    packed.load_state_dict(padded.state_dict())
    assert packed.backbone.config._attn_implementation == "sdpa"
    idx = torch.tensor([5, 1, 8, 2, 2, 7])
    a, ca = padded(idx)
    b, cb = packed(idx)
    assert a.device.type == b.device.type == device
    torch.testing.assert_close(a, b, atol=TOL if device == "cpu" else 1e-4, rtol=0)
    assert cb["padded_tokens"] == cb["item_tokens"]  # no padding at all
    assert ca["padded_tokens"] >= ca["item_tokens"]


@CUDA
def test_packed_flash_attention_equals_padded_on_gpu(tiny_llama_dir):
    # flash-attn is an optional CUDA build, not a dependency (README: "GPU training")
    pytest.importorskip(
        "flash_attn", reason="flash-attn is not installed (pip install flash-attn --no-build-isolation)"
    )
    tokens = ragged_tokens(40, LENGTHS)
    padded = item_llm(tiny_llama_dir, tokens).cuda().to(torch.bfloat16)
    packed = item_llm(tiny_llama_dir, tokens, layout="packed", attn="flash_attention_2").cuda().to(torch.bfloat16)
    packed.load_state_dict(padded.state_dict())
    idx = torch.arange(1, len(LENGTHS) + 1)
    with torch.no_grad():
        torch.testing.assert_close(padded(idx)[0].float(), packed(idx)[0].float(), atol=2e-2, rtol=2e-2)


def test_out_of_range_item_is_an_error(tiny_bert_dir):
    m = item_llm(tiny_bert_dir, ragged_tokens(40, LENGTHS))
    with pytest.raises(IndexError, match="out of range"):
        m(torch.tensor([0]))
    with pytest.raises(IndexError, match="out of range"):
        m(torch.tensor([len(LENGTHS) + 1]))
