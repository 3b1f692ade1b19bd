"""Hugging Face loading: path resolution, tokenizers, bare backbones (never an LM head)."""

from __future__ import annotations

import logging
from typing import Any

from hllm.pretrained import resolve_path

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- backbones


# Model types whose bare AutoModel is a bidirectional encoder (they ship a
# masked-LM head, not a causal one). Everything else is treated as a decoder.
def is_encoder(hf_config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(hf_config, "is_decoder", False):
        return False
    return hf_config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _config_from_dict(config: dict[str, Any], what: str):
    from transformers import AutoConfig

    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{what}.config needs a model_type (e.g. 'llama', 'bert'), got keys {sorted(config)}")
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except ValueError as e:
        raise ValueError(f"{what}.config: {e}") from e


def load_backbone(
    path: str | None,
    config: dict[str, Any] | None,
    *,
    from_scratch: bool,
    attn_implementation: str,
    what: str,
):
    """A bare Hugging Face backbone (``AutoModel``; never a ``*ForCausalLM`` head).

    ``path`` set: the folder's config (with ``config`` entries overriding its
    fields) and, unless ``from_scratch``, its pretrained weights. ``path`` None:
    a fresh model from ``config`` (which must name a ``model_type``).
    ``what`` ("model.item", "model.user") prefixes every error message.
    """
    from transformers import AutoConfig, AutoModel

    if path is None and not config:
        raise ValueError(f"{what}: set either path (a model folder) or config (a dict with model_type)")
    if path is not None:
        resolved = resolve_path(path, f"{what}.path")
        try:
            hf_config = AutoConfig.from_pretrained(resolved)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{what}.path {path!r} ({resolved}): no loadable model config: {e}") from e
        for k, v in (config or {}).items():
            if k == "model_type":
                if v != hf_config.model_type:
                    raise ValueError(f"{what}.config.model_type={v!r} contradicts {path!r} ({hf_config.model_type})")
                continue
            setattr(hf_config, k, v)
    else:
        hf_config = _config_from_dict(config or {}, what)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ValueError(f"{what}: encoder-decoder models ({hf_config.model_type}) are not supported")
    hf_config._attn_implementation = attn_implementation
    if path is not None and not from_scratch:
        try:
            model = AutoModel.from_pretrained(resolved, config=hf_config, attn_implementation=attn_implementation)
        except OSError as e:
            raise FileNotFoundError(f"{what}.path {path!r} ({resolved}): cannot load weights: {e}") from e
    else:
        model = AutoModel.from_config(hf_config, attn_implementation=attn_implementation)
    # Heads we never use would otherwise sit in the optimizer and break DDP's
    # "every parameter gets a gradient" assumption (the reference code's dead params).
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def drop_input_embeddings(model) -> None:
    """Remove the word-embedding table of a model that is only fed ``inputs_embeds``
    (the User LLM): for a pretrained 7B decoder that is ~0.5B dead parameters."""
    emb = model.get_input_embeddings()
    for _name, module in model.named_modules():
        for child_name, child in list(module.named_children()):
            if child is emb:
                setattr(module, child_name, None)
                return


def hidden_size(model) -> int:
    cfg = model.config
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or getattr(cfg, "dim", None)
    if size is None:
        raise ValueError(f"cannot tell the hidden size of {cfg.model_type}")
    return int(size)
