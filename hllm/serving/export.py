"""Embedding export for serving: items, users, a FAISS index and a manifest.

An export folder holds::

    manifest.json          model/data versions (data: the checkpoint's content hash ``version`` and the
                           MLflow/registry ``data_version``), config + protocol hashes, dim, normalisation, counts
    items.parquet          row, item_id (original id), title, text_key
    item_embeddings.npy    float32 [n_items, d] raw item-tower output (input of the user model)
    items.faiss            FAISS index over the items (normalised vectors when the model scores by cosine)
    users.parquet          row, user_id (original id), n_seen
    user_embeddings.npy    float32 [n_users, d] query vectors at each user's latest position
    seen.npz               offsets, items: each user's full history as item rows (excluded when serving)

The manifest's ``files`` records the sha256 and size of every other file; loading an export
(:func:`verify_export`, called by :class:`hllm.serving.recommend.Recommender`) refuses a truncated or
corrupted file by name. Older manifests without ``files`` load unchecked.

Item row r is item idx r + 1 of the built dataset (idx 0 is padding). The user
vector is computed from the user's *whole* sequence (the test history plus the
test item): it predicts what comes next, which is what serving needs.

Writes are atomic: everything goes to a temporary sibling folder that replaces
the old export only once complete, so a failed export leaves the previous one
intact. Re-exporting reuses item embeddings whose ``text_key`` (hash of item
id + item text) and ``item_model_version`` (hash of the item tower's weights
and item-text settings) are unchanged, and encodes only new or changed items.
Rows are matched by original item id + text, never by idx, so a rebuilt
catalogue that renumbers items still reuses them. When an evaluation of the same
checkpoint over the same built data has cached its item table
(``<runs_dir>/.item_emb_cache/``), the export reads it instead of running the
Item LLM again (and leaves its own table there for a later evaluation).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hllm import faults
from hllm.config import Config, protocol_hash, stable_hash
from hllm.data import versioning
from hllm.data.dataset import (
    PAD,
    BuiltData,
    digest_tree,
    left_pad_windows,
    read_json_object,
    verify_files,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    items_encoded: int
    items_reused: int


# --------------------------------------------------------------------------- versions and keys


def state_hash(model: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """Hash of the model's tensors (optionally only keys starting with ``prefixes``)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def item_model_version(model: torch.nn.Module, cfg: Config) -> str:
    """What decides an item's embedding besides its text: the item tower's
    weights and the item-text settings. A model may declare
    ``item_state_prefixes`` (state_dict key prefixes of its item tower) so that
    a retrained user tower alone does not invalidate item embeddings; without
    it the whole model counts."""
    m = getattr(model, "module", model)
    prefixes = getattr(m, "item_state_prefixes", None)
    return stable_hash(
        {
            "kind": cfg.model.kind,
            "weights": state_hash(m, tuple(prefixes) if prefixes else None),
            "item": dataclasses.asdict(cfg.model.item),
        },
        n=16,
    )


def item_text_keys(built: BuiltData, cfg: Config):
    """(items table without padding, text_key per item): hash of original id + item text."""
    from hllm.data.text import item_texts

    items = built.items_table().sort_values("idx")
    items = items[items["idx"] != PAD].reset_index(drop=True)
    if not np.array_equal(items["idx"].to_numpy(), np.arange(1, built.n_items)):
        raise ValueError(f"{built.dir / 'items.parquet'}: idx must be 1..{built.n_items - 1} besides padding")
    texts = item_texts(items, cfg.model.item.prompt, cfg.model.item.text_fields)
    ids = items["item_id"].astype(str).tolist()
    keys = [hashlib.sha1(f"{i}\x1f{t}".encode()).hexdigest()[:20] for i, t in zip(ids, texts)]
    return items, keys


def data_lineage(built: BuiltData, cfg: Config, root: str | Path = ".") -> dict[str, str]:
    """The manifest's ``data`` section: the built tables' ``content_hash`` (as in a checkpoint's
    ``meta.json``) and the ``data_version`` (``d<dvc md5>-s<sequences md5>``, what runs and registered versions are
    tagged with, so an export can be matched to them) with its two parts. The DVC md5 comes from
    ``data.dvc`` under ``root`` (the project root), as for the MLflow run."""

    dv = versioning.DataVersion(versioning.dvc_md5(cfg, root), versioning.sequences_md5(built.dir))
    return {
        "built_dir": str(built.dir),
        "content_hash": versioning.content_hash(built.dir),
        "data_version": dv.version,
        "dvc_md5": dv.dvc_md5,
        "sequences_md5": dv.sequences_md5,
    }


# --------------------------------------------------------------------------- export


def export(
    ckpt_dir: str | Path,
    out_dir: str | Path | None = None,
    cfg: Config | None = None,
    built_dir: str | Path | None = None,
    progress: bool = True,
) -> ExportResult:
    """Export a saved checkpoint. ``cfg`` supplies the ``eval`` (max history)
    and ``export`` sections and output paths; the model comes from the checkpoint."""
    from hllm.evaluation.evaluate import load_for_eval
    from hllm.evaluation.item_cache import checkpoint_fingerprint
    from hllm.models.loading import read_meta

    model, cfg, built = load_for_eval(ckpt_dir, cfg, built_dir)
    meta = read_meta(ckpt_dir)
    info: dict[str, Any] = {
        "checkpoint": str(Path(ckpt_dir).resolve()),
        "fingerprint": checkpoint_fingerprint(ckpt_dir),
        **{k: meta[k] for k in ("step", "epoch", "code_sha", "content_hash") if k in meta},
        "run_name": cfg.train.run_name,
    }
    out = Path(out_dir) if out_dir is not None else Path(cfg.paths.export_dir) / cfg.train.run_name
    return export_model(model, built, cfg, out, model_info=info, progress=progress, checkpoint_dir=ckpt_dir)


@torch.inference_mode()
def export_model(
    model,
    built: BuiltData,
    cfg: Config,
    out_dir: str | Path,
    *,
    model_info: dict[str, Any] | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
) -> ExportResult:
    """Write an export of ``model`` over ``built`` to ``out_dir`` atomically.

    Item embeddings come, in this order, from the previous export in ``out_dir`` (same item
    tower, same text), from the evaluation's item cache of ``checkpoint_dir`` over ``built``
    (``hllm.evaluation.item_cache.load_cached_items``: `hllm evaluate` just encoded them), and only then from
    the Item LLM; the full table is left in that cache for a later evaluation."""
    from hllm.evaluation.evaluate import user_embedding_fn
    from hllm.models.base import model_device, unwrap

    out = Path(out_dir)
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        items, keys = item_text_keys(built, cfg)
        version = item_model_version(m, cfg)
        table, n_new, sources = _item_table(m, built, cfg, keys, version, out, progress, checkpoint_dir)
        table_t = torch.from_numpy(table).to(model_device(m))
        seqs = built.sequences
        users = np.arange(seqs.n_users)
        hist = left_pad_windows(seqs, seqs.offsets[1:], users, cfg.eval.protocol.max_history)
        ufn = user_embedding_fn(m, table_t, hist)
        chunk = cfg.eval.user_chunk
        user_emb = (
            np.concatenate([ufn(s, min(s + chunk, len(users))).cpu().numpy() for s in range(0, len(users), chunk)])
            if len(users)
            else np.zeros((0, table.shape[1]), np.float32)
        )
    finally:
        m.train(was_training)
    if not np.isfinite(table).all() or not np.isfinite(user_emb).all():
        raise ValueError("the model produced non-finite item or user embeddings; nothing exported")
    item_vecs = table[1:]
    # an ID model's rows of items that never occurred in its training part are untrained: evaluation counts
    # them as no candidates (``hllm.evaluation.evaluate``), so the index leaves them out too (predict = eval)
    servable = None
    if not m.scores_unseen_items:
        from hllm.evaluation.slices import item_train_counts

        servable = item_train_counts(seqs, built.n_items, built.split_plan(cfg.eval.protocol))[1:] > 0
    manifest = {
        "format": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"kind": cfg.model.kind, **(model_info or {})},
        "item_model_version": version,
        "data": data_lineage(built, cfg),
        "config_hash": cfg.hash(),
        "protocol_hash": protocol_hash(cfg.eval.protocol),
        "dim": int(table.shape[1]),
        "normalize": bool(m.normalize),
        "max_history": cfg.eval.protocol.max_history,
        "seen_bonus": m.seen_bonus(),  # the learned repeat score in the index's units (None: off)
        "counts": {
            "items": len(item_vecs),
            "servable_items": len(item_vecs) if servable is None else int(servable.sum()),
            "users": len(users),
            "interactions": int(len(seqs.items)),
        },
        "index": {
            "type": cfg.export.faiss_index,
            "metric": "inner_product",
            **(
                {"m": cfg.export.hnsw_m, "ef_search": cfg.export.hnsw_ef_search}
                if cfg.export.faiss_index == "hnsw"
                else {}
            ),
        },
        "refresh": {"items_encoded": n_new, "items_reused": len(item_vecs) - n_new, "reused_from": sources},
    }
    import pandas as pd

    title = items["title"].astype("string").fillna("") if "title" in items.columns else pd.Series([""] * len(items))
    item_df = pd.DataFrame(
        {
            "row": np.arange(len(items), dtype=np.int64),
            "item_id": items["item_id"].astype(str),
            "title": title.astype(str),
            "text_key": keys,
        }
    )
    user_df = pd.DataFrame(
        {"row": users.astype(np.int64), "user_id": built.user_ids.astype(str), "n_seen": seqs.lengths.astype(np.int64)}
    )

    def write(tmp: Path) -> None:
        item_df.to_parquet(tmp / "items.parquet", index=False)
        np.save(tmp / "item_embeddings.npy", item_vecs)
        user_df.to_parquet(tmp / "users.parquet", index=False)
        np.save(tmp / "user_embeddings.npy", user_emb.astype(np.float32))
        np.savez(tmp / "seen.npz", offsets=seqs.offsets.astype(np.int64), items=(seqs.items - 1).astype(np.int64))
        write_index(item_vecs, bool(m.normalize), cfg, tmp / "items.faiss", servable)
        # one streamed read of what was just written (~0.5-2 s per GB: the user table dominates)
        manifest["files"] = digest_tree(tmp, skip=(MANIFEST,))
        faults.point("export:files-written")  # a crash here: a .tmp- folder without manifest, no export
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    atomic_dir(out, write)
    log.info(
        "exported %d items (%d encoded, %d reused) and %d users to %s",
        len(item_vecs),
        n_new,
        len(item_vecs) - n_new,
        len(users),
        out,
    )
    return ExportResult(out, manifest, n_new, len(item_vecs) - n_new)


def _item_table(
    m,
    built: BuiltData,
    cfg: Config,
    keys: list[str],
    version: str,
    out: Path,
    progress: bool,
    checkpoint_dir: str | Path | None,
) -> tuple[np.ndarray, int, dict[str, int]]:
    """[n_items, d] float32 item table (row 0 zero), the number of items encoded, and where the
    others came from (``previous_export`` / ``evaluation_cache`` counts)."""
    from tqdm.auto import tqdm

    from hllm.evaluation.item_cache import load_cached_items, store_cached_items
    from hllm.models.base import model_device

    sources = {"previous_export": 0, "evaluation_cache": 0}
    reuse: dict[str, np.ndarray] = {}
    prev = read_manifest(out)
    if prev is not None and prev.get("item_model_version") == version:
        import pandas as pd

        try:
            verify_export(out, ["items.parquet", "item_embeddings.npy"], prev)  # never reuse corrupt vectors
            prev_keys = pd.read_parquet(out / "items.parquet", columns=["text_key"])["text_key"].tolist()
            prev_emb = np.load(out / "item_embeddings.npy", mmap_mode="r")
            reuse = {k: prev_emb[i] for i, k in enumerate(prev_keys)}
        except (OSError, ValueError, KeyError) as e:
            log.warning("previous export in %s unreadable (%s); encoding every item", out, e)
            reuse = {}
    elif prev is not None:
        log.info("item model changed (%s -> %s): encoding every item", prev.get("item_model_version"), version)
    # rows are matched by text_key (original id + text), never by idx: a rebuilt catalogue may renumber
    todo = np.array([i + 1 for i, k in enumerate(keys) if k not in reuse], dtype=np.int64)
    sources["previous_export"] = len(keys) - len(todo)
    cached = None
    if len(todo) and checkpoint_dir is not None:
        cached = load_cached_items(m, built, cfg, checkpoint_dir)
    if cached is not None:
        table = np.array(cached, dtype=np.float32)
        sources = {"previous_export": 0, "evaluation_cache": len(keys)}
        return table, 0, sources
    device = model_device(m)
    batch = cfg.export.batch
    parts = []
    for s in tqdm(range(0, len(todo), batch), desc="encode items", unit="batch", disable=not progress or not len(todo)):
        parts.append(m.item_embeddings(torch.from_numpy(todo[s : s + batch]).to(device)).float().cpu().numpy())
    if parts:
        dim = parts[0].shape[1]
    elif reuse:
        dim = len(next(iter(reuse.values())))
    else:
        raise ValueError(f"{built.dir}: no items to export")
    table = np.zeros((built.n_items, dim), dtype=np.float32)
    for i, k in enumerate(keys):
        if k in reuse:
            table[i + 1] = reuse[k]
    if parts:
        table[todo] = np.concatenate(parts)
        if checkpoint_dir is not None and np.isfinite(table).all():
            store_cached_items(table, m, built, cfg, checkpoint_dir)  # a later `hllm evaluate` reads it
    return table, len(todo), sources


def write_index(
    vectors: np.ndarray, normalize: bool, cfg: Config, path: Path, servable: np.ndarray | None = None
) -> None:
    """FAISS inner-product index over the items (cosine when the vectors are normalised). With ``servable``
    (bool per row) only those rows are indexed, under their row numbers (an ID map), so a search never
    returns the others and the rows it returns still index ``items.parquet``."""
    faiss = import_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    d = x.shape[1]
    kind = cfg.export.faiss_index
    if kind == "flat_ip":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.export.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.export.hnsw_ef_search
    else:
        raise ValueError(f"export.faiss_index must be 'flat_ip' or 'hnsw', got {kind!r}")
    if servable is None:
        index.add(x)
    else:
        index = faiss.IndexIDMap2(index)
        keep = np.nonzero(servable)[0]
        index.add_with_ids(np.ascontiguousarray(x[keep]), keep.astype(np.int64))
    faiss.write_index(index, str(path))


def import_faiss():
    """``faiss``, with its loader's INFO chatter (one line per SIMD variant tried) silenced."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def read_manifest(out: Path) -> dict[str, Any] | None:
    p = Path(out) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        log.warning("unreadable manifest %s: %s", p, e)
        return None


def verify_export(
    out: str | Path, names: list[str] | None = None, manifest: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check an export's files (or only ``names``) against the sha256 + size its manifest recorded;
    raise :class:`~hllm.data.dataset.CorruptFileError` naming the first truncated, corrupted or missing
    one. Returns the manifest. Cost: one streamed read of each file (~0.5-2 s per GB), once per process
    while the file is unchanged."""
    d = Path(out)
    if manifest is None:
        p = d / MANIFEST
        if not p.exists():
            raise FileNotFoundError(f"{d}: not an export (no {MANIFEST}); run `hllm export` first")
        manifest = read_json_object(p, "manifest")
    files = manifest.get("files")
    if files:
        verify_files(d, files, names)
    else:
        log.debug("%s: no file hashes in the manifest (older export); not verified", d)
    return manifest


def atomic_dir(out: Path, write) -> None:
    """Run ``write(tmp)`` into a fresh sibling folder, then swap it in for ``out``.

    On any failure the temporary folder is removed and ``out`` is untouched.
    The swap is two renames on the same filesystem; if the second fails the
    old folder is renamed back.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{tag}"
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old.exists():
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def clean_partial(parent: str | Path) -> list[str]:
    """Remove what a crash inside :func:`atomic_dir` left under ``parent`` (e.g. ``paths.export_dir``):
    ``.<name>.tmp-*`` folders (never complete: no manifest, never registered) are deleted; an
    ``.<name>.old-*`` folder goes back to ``<name>`` when the swap was cut between its renames, and is
    deleted when the swap completed. Call it only while no export is being written (the nightly
    flow holds its slot). Returns what was done."""
    parent = Path(parent)
    done: list[str] = []
    if not parent.is_dir():
        return done
    for p in sorted(parent.glob(".*.tmp-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"deleted the half-written export {p}")
    for p in sorted(parent.glob(".*.old-*")):
        if not p.is_dir():
            continue
        out = parent / p.name[1:].rsplit(".old-", 1)[0]
        if out.exists():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"deleted {p} (its swap had completed)")
        else:
            os.rename(p, out)
            done.append(f"restored {out} from {p.name} (a crash interrupted its replacement)")
    for line in done:
        log.warning("crash recovery: %s", line)
    return done
