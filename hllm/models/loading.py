"""Loading a saved model: ``meta.json`` + ``model.safetensors`` -> the model, on any data.

Used by evaluation, serving and the registry; writing checkpoints (optimizer, RNG, trainer state)
is training's job (:mod:`hllm.training.checkpoint`). The on-disk layout is drawn there."""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any, cast

import torch

from hllm.data.dataset import CorruptFileError, read_json_object, verify_files
from hllm.data.versioning import content_hash

log = logging.getLogger(__name__)


FORMAT = 1


STEP_PREFIX = "step-"


LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, patched to the current vocabulary: checkpoints written before
    the data-version vocabulary was unified call the built tables' hash ``data_version``; it is
    ``content_hash`` now (``data_version`` means the DVC + sequences version everywhere else)."""
    p = Path(ckpt_dir) / "meta.json"
    if not p.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint (no meta.json)")
    meta = read_json_object(p, "meta.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: checkpoint format {meta.get('format')!r}, this code reads format {FORMAT}")
    if "data_version" in meta and "content_hash" not in meta:
        meta["content_hash"] = meta.pop("data_version")
    return meta


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def verify_checkpoint(ckpt_dir: str | Path, names: list[str] | None = None) -> None:
    """Check the files of a checkpoint (or only ``names``) against the sha256 + size its ``meta.json``
    recorded (``files``); raise :class:`~hllm.data.dataset.CorruptFileError` naming the first bad one.

    A recorded file that is absent counts as corrupt, except when only the files present are asked for
    (``best/`` holds weights + meta, whose ``meta.json`` is the step checkpoint's and lists them all).
    Checkpoints written before hashes were recorded have no ``files``: nothing to check (debug log).
    Hashing streams each file once per process (see :func:`hllm.data.dataset.verify_file`)."""
    d = Path(ckpt_dir)
    files = read_meta(d).get("files")
    if not files:
        log.debug("%s: no file hashes in meta.json (older checkpoint); not verified", d)
        return
    verify_files(d, files, names)


def latest_checkpoint(run_dir: str | Path, verify: bool = True) -> Path | None:
    """The newest complete step checkpoint of a run (``checkpoints/latest``, else the highest step).

    With ``verify`` (what ``--resume`` reads) every file is checked against its recorded hash: a
    corrupt pointed checkpoint (a crash mid-copy, a full disk) is skipped with a warning for the newest
    valid one; when every step checkpoint is corrupt, the error names the newest one's bad file."""
    root = Path(run_dir) / "checkpoints"
    steps = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if (p / "meta.json").exists()), reverse=True)
    pointer = root / LATEST
    if pointer.exists():
        p = root / pointer.read_text().strip()
        if (p / "meta.json").exists():
            steps = [p, *(s for s in steps if s != p)]
    if not verify:
        return steps[0] if steps else None
    first_error: CorruptFileError | None = None
    for p in steps:
        try:
            verify_checkpoint(p)
        except CorruptFileError as e:
            log.warning("skipping corrupt checkpoint %s: %s", p, e)
            first_error = first_error or e
            continue
        if first_error is not None:
            log.warning("using %s, the newest valid checkpoint (the newer one is corrupt: %s)", p, first_error)
        return p
    if first_error is not None:
        raise CorruptFileError(f"{root}: no valid checkpoint, every one is corrupt; the newest: {first_error}")
    return None


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` (bare or FSDP-sharded); every key must match."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import ValueType, set_model_state_dict

    path = Path(ckpt_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors")
    if (Path(ckpt_dir) / "meta.json").exists():
        verify_checkpoint(ckpt_dir, ["model.safetensors"])
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError on a bad header
        raise CorruptFileError(f"{path}: unreadable weights (truncated or corrupted: {e})") from e
    missing = set(_param_names(model)) - set(sd)
    unexpected = set(sd) - set(_param_names(model))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    # torch wants an (invariant) dict[str, ValueType], where a Mapping of tensors is what it reads
    set_model_state_dict(model, cast("dict[str, ValueType]", sd), options=_options())


def _param_names(model: torch.nn.Module) -> list[str]:
    return list(model.state_dict().keys())


def catalogue_hash(item_ids) -> str:
    """Identity of an item catalogue *and its idx order*: the hash of the original ids by idx."""
    h = hashlib.sha256()
    for x in item_ids:
        h.update(str(x).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def check_catalogue(meta: dict[str, Any], built, ckpt_dir: str | Path) -> None:
    """Refuse built data whose items an ID-based checkpoint cannot score.

    Text-based item towers (``hllm.models.TEXT_KINDS``: HLLM) embed every item from its text,
    so their weights hold nothing sized or ordered by the catalogue: any built dataset works,
    its token cache (row = that dataset's idx) is what the Item LLM reads, and new items are
    simply encoded. ID-based models (SASRec's embedding table, popularity's counts) have one
    row per training idx: the catalogue must be the training one, same ids in the same idx
    order (a rebuild assigns idx by first appearance, so a changed log can move them)."""
    from hllm.models import TEXT_KINDS

    kind = meta.get("kind") or meta.get("config", {}).get("model", {}).get("kind")
    if kind in TEXT_KINDS:
        return
    why = None
    if meta.get("n_items") is not None and meta["n_items"] != built.n_items:
        why = f"it was trained on {meta['n_items']} item slots, {built.dir} has {built.n_items}"
    elif meta.get("catalogue") and meta["catalogue"] != catalogue_hash(built.item_ids):
        why = (
            f"{built.dir} has the same number of items ({built.n_items} slots) but other item ids or another "
            f"idx order (catalogue {catalogue_hash(built.item_ids)}, trained on {meta['catalogue']})"
        )
    if why:
        raise ValueError(
            f"{ckpt_dir}: a {kind!r} model cannot score this catalogue: {why}. Its item table is indexed by "
            "the training catalogue (ID-based); retrain it on the new data. (Text-based item towers such as "
            "HLLM embed items from their text and accept a changed catalogue.)"
        )


def load_model(ckpt_dir: str | Path, built_dir: str | Path | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model saved in ``ckpt_dir`` -> ``(model, cfg, built)``, in eval mode.

    The config comes from ``meta.json``; ``built_dir`` overrides its
    ``paths.built_dir`` (the same data at another path, or newer data). A
    text-based model (HLLM) is rebuilt over that dataset's items and token
    cache, whatever its catalogue (new, removed or re-indexed items: idx are
    those of ``built``); an ID-based model (SASRec, popularity) must see its
    training catalogue (:func:`check_catalogue`).
    """
    from hllm.config import config_from_dict
    from hllm.data.dataset import load_built
    from hllm.models import TEXT_KINDS, build_model

    meta = read_meta(ckpt_dir)
    cfg = config_from_dict(meta["config"])
    if built_dir is not None:
        cfg.paths.built_dir = str(built_dir)
    built = load_built(cfg.paths.built_dir)
    check_catalogue(meta, built, ckpt_dir)
    if meta.get("content_hash") and meta["content_hash"] != content_hash(built.dir):
        log.info(
            "%s: built data at %s differs from the training data (version %s)",
            ckpt_dir,
            built.dir,
            meta["content_hash"],
        )
    build_cfg = copy.deepcopy(cfg)
    # Architecture only: the weights come from the checkpoint.
    for tower in (build_cfg.model.item, build_cfg.model.user):
        if getattr(tower, "path", None) is not None:
            tower.from_scratch = True
    tokens = None
    if cfg.model.kind in TEXT_KINDS:
        from hllm.data.text import ensure_tokens

        tokens = ensure_tokens(cfg, built.dir)
    model = build_model(build_cfg, built, tokens)
    load_weights(model, ckpt_dir)
    model.to(device).eval()
    return model, cfg, built
