"""Model registry: ``cfg.model.kind`` -> a builder ``build(cfg, built, tokens) -> SeqRecModel``.

Builders are registered as lazy ``"module:function"`` strings so importing
this package stays cheap and each model's module imports only what it needs.
``tokens`` is the item token cache (``hllm.data.text.ensure_tokens``) for
text-based models; ID models ignore it, and HLLM builds it when given None.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hllm.config import Config
    from hllm.data.dataset import BuiltData, TokenCache
    from hllm.models.base import SeqRecModel

_REGISTRY: dict[str, str | Callable[..., Any]] = {
    "hllm": "hllm.models.hllm:build",
    "sasrec": "hllm.models.sasrec:build",
    "gru4rec": "hllm.models.gru4rec:build",
    "pop": "hllm.models.pop:build",
}

# Kinds whose builder needs the item token cache (text-based item towers).
TEXT_KINDS = {"hllm"}


def register(kind: str, builder: str | Callable[..., Any]) -> None:
    """Add (or replace) a model kind: ``builder`` is a callable or ``"module:function"``."""
    _REGISTRY[kind] = builder


def kinds() -> list[str]:
    return sorted(_REGISTRY)


def get_builder(kind: str) -> Callable[..., Any]:
    if kind not in _REGISTRY:
        raise ValueError(f"model.kind {kind!r} is not registered; known kinds: {kinds()}")
    target = _REGISTRY[kind]
    if callable(target):
        return target
    module, _, fn = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ValueError(f"model.kind {kind!r}: module {module} is not available") from e
        raise
    return getattr(mod, fn)


def build_model(cfg: "Config", built: "BuiltData", tokens: "TokenCache | None" = None) -> "SeqRecModel":
    return get_builder(cfg.model.kind)(cfg, built, tokens)
