"""Item text and its pre-tokenised cache.

Item text = prompt + ``key: value`` per configured field, fields separated by a
space (the reference code concatenated them with no separator, "title: Xtag: Y"),
empty fields skipped. Tokenised once per (tokenizer, max length, prompt, fields)
and stored under ``<built_dir>/tokens/<key>.npz``; training never tokenises.
Its sidecar ``<key>.json`` records the settings and the npz's sha256 + size: a
truncated or corrupted cache is rebuilt (it is derived data) with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hllm.config import Config, stable_hash
from hllm.data.dataset import CorruptFileError, TokenCache, file_digest, load_tokens

log = logging.getLogger(__name__)


def item_texts(items: pd.DataFrame, prompt: str, fields: list[str]) -> list[str]:
    """One string per row of ``items``, in row order (vectorised over columns)."""
    parts = []
    for f in fields:
        if f not in items.columns:
            continue
        col = items[f].astype("string").fillna("").str.strip()
        parts.append(col.where(col == "", f + ": " + col))
    if not parts:
        return [prompt.rstrip()] * len(items)
    joined = parts[0]
    for p in parts[1:]:
        joined = (joined + " " + p).str.strip()
    return (prompt + joined).tolist()


def token_cache_key(tok_identity: dict, max_len: int, prompt: str, fields: list[str]) -> str:
    return stable_hash({"tok": tok_identity, "max_len": max_len, "prompt": prompt, "fields": fields}, n=16)


def tokenize(texts: list[str], tokenizer, max_len: int, batch: int = 4096) -> TokenCache:
    from tqdm.auto import tqdm

    lengths = np.zeros(len(texts), dtype=np.int64)
    chunks = []
    for s in tqdm(range(0, len(texts), batch), desc="tokenize items", unit="batch", disable=len(texts) <= batch):
        enc = tokenizer(texts[s : s + batch], truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
        lengths[s : s + len(enc)] = [len(x) for x in enc]
        chunks.append(np.fromiter((t for x in enc for t in x), dtype=np.int32))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return TokenCache(ids=ids, offsets=offsets)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez`` (``np.load`` reads it) but byte-reproducible: zip entries carry a fixed
    date instead of the clock, so the same build gives the same DVC hash for ``data/built``."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


def ensure_tokens(cfg: Config, built_dir: str | Path | None = None) -> TokenCache:
    """Load the token cache for ``cfg.model.item``, building it on first use.

    Row ``idx`` of the cache is item idx ``idx`` of ``items.parquet``; row 0
    (padding) is empty.
    """
    from hllm.pretrained import load_tokenizer, tokenizer_identity

    d = Path(built_dir or cfg.paths.built_dir)
    icfg = cfg.model.item
    if icfg.path is None:
        raise ValueError("model.item.path is None: a tokenizer is needed to pre-tokenise item text")
    tok = load_tokenizer(icfg.path, "model.item.path")
    key = token_cache_key(tokenizer_identity(tok), icfg.max_text_len, icfg.prompt, icfg.text_fields)
    path = d / "tokens" / f"{key}.npz"
    if path.exists():
        try:
            return load_tokens(path)  # checked against the sidecar's sha256 + size
        except CorruptFileError as e:
            log.warning("%s: corrupt token cache, rebuilding it (derived data): %s", path, e)
    items = pd.read_parquet(d / "items.parquet").sort_values("idx")
    if len(items) == 0 or items["idx"].iloc[0] != 0:
        raise ValueError(f"{d / 'items.parquet'}: expected the padding row idx 0 first")
    texts = item_texts(items.iloc[1:], icfg.prompt, icfg.text_fields)
    body = tokenize(texts, tok, icfg.max_text_len)
    cache = TokenCache(ids=body.ids, offsets=np.concatenate([[0], body.offsets]))  # row 0 (padding) is empty
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    save_npz(tmp, ids=cache.ids, offsets=cache.offsets)
    side = {
        "model": icfg.path,
        "max_text_len": icfg.max_text_len,
        "prompt": icfg.prompt,
        "fields": icfg.text_fields,
        "tokenizer": tokenizer_identity(tok),
        "file": file_digest(tmp),  # sha256 + size of the npz, checked by load_tokens
    }
    # sidecar first: a crash between the two renames leaves an npz that fails its check and is rebuilt
    side_tmp = path.with_suffix(".tmp.json")
    side_tmp.write_text(json.dumps(side, indent=2))
    side_tmp.replace(path.with_suffix(".json"))
    tmp.replace(path)
    log.info("tokenised %d items -> %s (%.1f tokens/item)", len(texts), path, cache.lengths()[1:].mean())
    return cache
