"""Checkpoints: a folder per save, written atomically, loadable without the training code's state.

Layout of one checkpoint (``runs/<run>/checkpoints/step-000050/``)::

    model.safetensors    full (unsharded) model weights, FQN keys
    meta.json            format, model kind, step, epoch, resolved config, data
                         version, code sha, world size, metrics, library versions
    optimizer.pt         full optimizer state (FQN keyed; loadable on any world size)
    scheduler.pt         LR scheduler state
    trainer_state.json   best value/step, epochs without improvement, history
    rng/rank-00000.pt    torch/numpy/python RNG states of each rank

A save goes to ``.tmp-<name>`` next to the target and is renamed into place
only when complete, so a crash mid-save never leaves a half checkpoint where
``--resume`` or evaluation would find it. ``best/`` holds only weights + meta
(hard links to the step checkpoint's files when possible).

``load_model(ckpt_dir)`` rebuilds any registered model kind from ``meta.json``
alone: the architecture comes from the saved config, the weights from
``model.safetensors`` (pretrained weights are never loaded twice).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1
STEP_PREFIX = "step-"
LATEST = "latest"


# --------------------------------------------------------------------------- small helpers


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def code_sha(cwd: str | Path | None = None) -> str | None:
    """Git commit of the code (with ``-dirty`` when the tree has changes), or None outside git."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def data_version(built_dir: str | Path) -> str:
    """Content hash of the built dataset's tables (what the model was trained on)."""
    h = hashlib.sha256()
    for name in ("items.parquet", "users.parquet", "sequences.parquet"):
        p = Path(built_dir) / name
        h.update(name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    p = Path(ckpt_dir) / "meta.json"
    if not p.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint (no meta.json)")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p}: checkpoint format {meta.get('format')!r}, this code reads format {FORMAT}")
    return meta


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (collective under FSDP: every rank must call)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


# --------------------------------------------------------------------------- saving


def _barrier() -> None:
    from hllm.distributed import barrier

    barrier()


def save_checkpoint(
    dst: str | Path,
    *,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict[str, Any] | None = None,
    rank: int = 0,
) -> Path:
    """Write a checkpoint folder atomically. Collective: every rank calls it.

    ``model`` is the bare model (not the DDP wrapper). ``meta`` must be JSON
    serialisable; ``format`` and ``saved_at`` are added.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    tmp = dst.parent / f".tmp-{dst.name}"
    weights = full_model_state(model)
    optim = full_optimizer_state(model, optimizer) if optimizer is not None else None
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # a crashed earlier save
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    # Every rank's RNG (dropout streams differ per rank); needs the run dir on
    # storage all ranks can write (shared FS for multi-node resume).
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    _barrier()
    if rank == 0:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": str(FORMAT)})
        if optim is not None:
            torch.save(optim, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=_json_default))
        full_meta = {"format": FORMAT, **meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=_json_default))
        _fsync_dir(tmp)
        if dst.exists():  # re-saving the same step after a resume
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    _barrier()
    return dst


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_pointer(ckpt_root: Path, target: Path) -> None:
    """``checkpoints/latest`` names the newest complete checkpoint (atomic replace)."""
    tmp = ckpt_root / f".{LATEST}.tmp"
    tmp.write_text(target.name + "\n")
    os.replace(tmp, ckpt_root / LATEST)


def publish_copy(src: Path, dst: Path, files: tuple[str, ...] = ("model.safetensors", "meta.json")) -> Path:
    """Replace ``dst`` (e.g. ``best/``) by ``files`` of checkpoint ``src``, atomically:
    build ``.tmp-<dst>``, move the old one aside, rename, then delete the old one."""
    tmp = dst.parent / f".tmp-{dst.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in files:
        if (src / name).exists():
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copy2(src / name, tmp / name)
    old = dst.parent / f".old-{dst.name}"
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old)
    return dst


def prune(ckpt_root: Path, keep: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep`` step checkpoints (never one named in ``protect``)."""
    steps = sorted(p for p in ckpt_root.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for p in steps[: max(len(steps) - max(keep, 1), 0)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step checkpoint of a run (``checkpoints/latest``, else the highest step)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.exists():
        p = root / pointer.read_text().strip()
        if (p / "meta.json").exists():
            return p
    steps = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if (p / "meta.json").exists())
    return steps[-1] if steps else None


# --------------------------------------------------------------------------- loading


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` (bare or FSDP-sharded); every key must match."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    path = Path(ckpt_dir) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors")
    sd = load_file(str(path))
    missing = set(_param_names(model)) - set(sd)
    unexpected = set(sd) - set(_param_names(model))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    set_model_state_dict(model, sd, options=_options())


def _param_names(model: torch.nn.Module) -> list[str]:
    return list(model.state_dict().keys())


def load_training_state(
    ckpt_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    rank: int,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return trainer_state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    d = Path(ckpt_dir)
    load_weights(model, d)
    if optimizer is not None and (d / "optimizer.pt").exists():
        osd = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, osd, options=_options())
    if scheduler is not None and (d / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(d / "scheduler.pt", map_location="cpu", weights_only=False))
    rng = d / "rng" / f"rank-{rank:05d}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:
        log.warning("%s: no RNG state for rank %d (different world size?): dropout streams will differ", d, rank)
    state_path = d / "trainer_state.json"
    return json.loads(state_path.read_text()) if state_path.exists() else {}


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
        why = (f"{built.dir} has the same number of items ({built.n_items} slots) but other item ids or another "
               f"idx order (catalogue {catalogue_hash(built.item_ids)}, trained on {meta['catalogue']})")
    if why:
        raise ValueError(
            f"{ckpt_dir}: a {kind!r} model cannot score this catalogue: {why}. Its item table is indexed by "
            "the training catalogue (ID-based); retrain it on the new data. (Text-based item towers such as "
            "HLLM embed items from their text and accept a changed catalogue.)")


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
    from hllm.data.artifacts import load_built
    from hllm.models import TEXT_KINDS, build_model

    meta = read_meta(ckpt_dir)
    cfg = config_from_dict(meta["config"])
    if built_dir is not None:
        cfg.paths.built_dir = str(built_dir)
    built = load_built(cfg.paths.built_dir)
    check_catalogue(meta, built, ckpt_dir)
    if meta.get("data_version") and meta["data_version"] != data_version(built.dir):
        log.info("%s: built data at %s differs from the training data (version %s)", ckpt_dir, built.dir,
                 meta["data_version"])
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
