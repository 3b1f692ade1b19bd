"""Item-embedding tables: encode the catalogue once per checkpoint, cache it on disk by key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from hllm.config import Config, stable_hash
from hllm.data.dataset import BuiltData
from hllm.distributed import rank_world
from hllm.evaluation.results import _atomic_write_text
from hllm.models.base import model_device, unwrap

log = logging.getLogger(__name__)


@torch.inference_mode()
def item_embedding_table(model, n_items: int, batch: int = 128, progress: bool = True) -> torch.Tensor:
    """``[n_items, d]`` float32 embeddings of every item idx; row 0 (padding) is zero.

    Under torchrun each rank encodes one contiguous block and the blocks are
    all-gathered. Every rank runs the same number of forwards (the short last
    block is padded with item 1), which FSDP needs to avoid a hang.
    """
    from tqdm.auto import tqdm

    m = unwrap(model)
    rank, world = rank_world()
    device = model_device(m)
    n_real = n_items - 1
    block = -(-n_real // world) if n_real else 0
    lo = 1 + rank * block
    idx = torch.arange(lo, lo + block, device=device)
    idx = torch.where(idx < n_items, idx, torch.ones_like(idx))
    parts = []
    steps = range(0, block, batch)
    for s in tqdm(steps, total=len(steps), desc="encode items", unit="batch", disable=not progress or rank != 0):
        parts.append(m.item_embeddings(idx[s : s + batch]).float())
    if not parts:
        raise ValueError("no items to encode")
    mine = torch.cat(parts)
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        mine = torch.cat(gathered)
    table = torch.zeros(n_items, mine.shape[1], dtype=torch.float32, device=device)
    table[1:] = mine[:n_real]
    return table


def _file_sha(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def checkpoint_fingerprint(ckpt_dir: str | Path) -> str:
    """Identity of a checkpoint's weights: the hash of ``model.safetensors``."""
    p = Path(ckpt_dir) / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint (no model.safetensors)")
    return _file_sha(p)[:16]


def item_cache_key(ckpt_dir: str | Path, built: BuiltData, cfg: Config, model=None) -> str:
    """What decides the item table: the checkpoint's weights, the item table (ids by idx), the
    item-text settings and, for a text tower, the exact token cache it reads (``model``'s
    ``item_inputs_fingerprint``)."""
    items = built.dir / "items.parquet"
    m = unwrap(model) if model is not None else None
    return stable_hash(
        {
            "weights": checkpoint_fingerprint(ckpt_dir),
            "items": _file_sha(items) if items.exists() else list(map(str, built.item_ids)),
            "n_items": built.n_items,
            "item_model": dataclasses.asdict(cfg.model.item),
            "inputs": m.item_inputs_fingerprint() if m is not None and hasattr(m, "item_inputs_fingerprint") else None,
        },
        n=16,
    )


def item_cache_dir(cfg: Config) -> Path:
    """Outside every run folder, so that caching never modifies a checkpoint (which may be read-only,
    or a DVC-tracked stage output)."""
    return Path(cfg.paths.runs_dir) / ".item_emb_cache"


def _cache_enabled(model, cfg: Config) -> bool:
    return bool(cfg.eval.item_cache) and getattr(unwrap(model), "cache_item_embeddings", True)


def load_cached_items(model, built: BuiltData, cfg: Config, ckpt_dir: str | Path) -> np.ndarray | None:
    """The cached ``[n_items, d]`` item table of checkpoint ``ckpt_dir`` over ``built``, or None.

    Shared by evaluation and export (``hllm.serving.export``), so the items of one checkpoint are encoded
    once whichever runs first."""
    if not _cache_enabled(model, cfg):
        return None
    npy = item_cache_dir(cfg) / f"{item_cache_key(ckpt_dir, built, cfg, model)}.npy"
    if not npy.exists():
        return None
    try:
        arr = np.load(npy)
    except (ValueError, OSError) as e:  # a torn or foreign file is recomputed, not trusted
        log.warning("ignoring unreadable item-embedding cache %s: %s", npy, e)
        return None
    if arr.ndim != 2 or arr.shape[0] != built.n_items or not np.isfinite(arr).all():
        log.warning("ignoring item-embedding cache %s of shape %s (want %d rows)", npy, arr.shape, built.n_items)
        return None
    try:
        os.utime(npy)  # most recently used, for pruning
    except OSError:
        pass
    log.info("item embeddings of %s from cache %s", ckpt_dir, npy)
    return arr.astype(np.float32, copy=False)


def store_cached_items(table: np.ndarray, model, built: BuiltData, cfg: Config, ckpt_dir: str | Path) -> None:
    """Save an item table under its key (rank 0; atomic; failures only logged: it is an optimisation)."""
    if not _cache_enabled(model, cfg) or rank_world()[0] != 0:
        return
    d = item_cache_dir(cfg)
    try:
        key = item_cache_key(ckpt_dir, built, cfg, model)
        d.mkdir(parents=True, exist_ok=True)
        npy = d / f"{key}.npy"
        tmp = d / f".{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, np.asarray(table, dtype=np.float32))
        tmp.replace(npy)
        _atomic_write_text(
            d / f"{key}.json",
            json.dumps(
                {
                    "checkpoint": str(ckpt_dir),
                    "n_items": built.n_items,
                    "dim": int(table.shape[1]),
                    "built_dir": str(built.dir),
                }
            ),
        )
        _prune_cache(d, cfg.eval.item_cache_keep)
    except OSError as e:
        log.warning("could not write item-embedding cache in %s: %s", d, e)


def cached_item_embeddings(
    model, built: BuiltData, cfg: Config, ckpt_dir: str | Path, progress: bool = True
) -> torch.Tensor:
    """Item table of a saved checkpoint, from ``<runs_dir>/.item_emb_cache/<key>.npy`` when present,
    else computed and saved there. The key (:func:`item_cache_key`) hashes the weights, the item
    table, the item-text settings and the token cache, so a changed checkpoint or catalogue never
    reads stale embeddings. Models whose items are a table lookup (``cache_item_embeddings =
    False``) are not cached."""
    arr = load_cached_items(model, built, cfg, ckpt_dir)
    if arr is not None:
        return torch.from_numpy(arr).to(model_device(unwrap(model)))
    table = item_embedding_table(model, built.n_items, cfg.eval.item_batch, progress)
    store_cached_items(table.cpu().numpy(), model, built, cfg, ckpt_dir)
    return table


def _prune_cache(d: Path, keep: int) -> None:
    files = sorted(d.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[max(keep, 1) :]:
        p.unlink(missing_ok=True)
        p.with_suffix(".json").unlink(missing_ok=True)
