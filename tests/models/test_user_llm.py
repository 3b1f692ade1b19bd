"""User LLM: left padding never changes a prediction, for RoPE and absolute-position decoders."""

from __future__ import annotations

import pytest
import torch

from hllm import testing as T
from hllm.models.hf import load_backbone
from hllm.models.user_llm import UserLLM


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A random 2-layer GPT-2: learned absolute position embeddings (``wpe``), unlike RoPE."""
    from transformers import GPT2Config, GPT2Model

    out = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=8,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.2,
    )
    GPT2Model(cfg).save_pretrained(out)
    return out


def _user(kind: str, gpt2_dir) -> UserLLM:
    if kind == "gpt2":
        bb = load_backbone(str(gpt2_dir), None, from_scratch=False, attn_implementation="sdpa", what="model.user")
    else:
        torch.manual_seed(0)
        bb = load_backbone(
            None,
            {**T.TINY_USER, "initializer_range": 0.2},
            from_scratch=True,
            attn_implementation="sdpa",
            what="model.user",
        )
    return UserLLM(bb).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padding_does_not_change_the_prediction(kind, tiny_gpt2_dir):
    user = _user(kind, tiny_gpt2_dir)
    assert user.backbone.config.model_type == kind
    torch.manual_seed(1)
    hist = torch.randn(2, 4, 32)  # two 4-item histories
    with torch.no_grad():
        alone = user(hist, torch.ones(2, 4, dtype=torch.bool))
        # the same histories in a batch whose longest row is 7 items: 3 left pads each
        padded = torch.cat([torch.randn(2, 3, 32), hist], 1)
        mask = torch.tensor([[False] * 3 + [True] * 4] * 2)
        out = user(padded, mask)
        # and a mixed batch: one row unpadded (7 items), the other padded
        mixed = torch.stack([torch.randn(7, 32), padded[1]])
        mixed_mask = torch.stack([torch.ones(7, dtype=torch.bool), mask[1]])
        out_mixed = user(mixed, mixed_mask)
    torch.testing.assert_close(out[:, -1], alone[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], alone, atol=1e-5, rtol=1e-5)  # every real position, not only the last
    torch.testing.assert_close(out_mixed[1, -1], alone[1, -1], atol=1e-5, rtol=1e-5)


def test_gpt2_positions_matter_so_the_test_above_can_fail(tiny_gpt2_dir):
    """Guard: shifting GPT-2's positions changes its output (else the padding test proves nothing)."""
    user = _user("gpt2", tiny_gpt2_dir)
    torch.manual_seed(1)
    x = torch.randn(1, 4, 32)
    mask = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        a = user.backbone(inputs_embeds=x, attention_mask=mask).last_hidden_state
        b = user.backbone(inputs_embeds=x, attention_mask=mask, position_ids=torch.arange(3, 7)[None]).last_hidden_state
    assert (a - b).abs().max() > 1e-2


def test_input_dropout_acts_in_training_only():
    torch.manual_seed(0)
    bb = load_backbone(None, dict(T.TINY_USER), from_scratch=True, attn_implementation="sdpa", what="model.user")
    user = UserLLM(bb, input_dropout=0.5)
    x, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        user.train()
        a, b = user(x, mask), user(x, mask)
        user.eval()
        c, d = user(x, mask), user(x, mask)
        plain = bb(inputs_embeds=x, attention_mask=mask.long(), position_ids=torch.arange(5)[None]).last_hidden_state
    assert (a - b).abs().max() > 1e-3  # a new mask every call
    torch.testing.assert_close(c, d)
    torch.testing.assert_close(c, plain)  # evaluation reads every input, unscaled
    with pytest.raises(ValueError, match="model.user.input_dropout"):
        UserLLM(load_backbone(None, dict(T.TINY_USER), from_scratch=True, attn_implementation="sdpa", what="u"), input_dropout=1)
