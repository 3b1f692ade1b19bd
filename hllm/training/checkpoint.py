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
``--resume`` or evaluation would find it. A write that fails (a full disk:
``ENOSPC``) removes the temporary folder and raises :class:`CheckpointWriteError`
naming the checkpoint; the previous checkpoint and ``latest`` are untouched.
``best/`` holds only weights + meta (hard links to the step checkpoint's files
when possible).

``meta.json`` records ``files``: the sha256 and size of every other file of the
checkpoint. Loading verifies them (:func:`hllm.models.loading.verify_checkpoint`)
and refuses a truncated or corrupted file by name; ``latest_checkpoint`` skips a
corrupt checkpoint for the newest valid one.

``load_model(ckpt_dir)`` rebuilds any registered model kind from ``meta.json``
alone: the architecture comes from the saved config, the weights from
``model.safetensors`` (pretrained weights are never loaded twice).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from hllm.data.dataset import CorruptFileError, digest_tree, verify_files
from hllm.models.loading import FORMAT, LATEST, STEP_PREFIX, _options, load_weights, read_meta

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- small helpers


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


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (collective under FSDP: every rank must call)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # torch's return type covers optimizer state too; a full model state dict holds tensors only
    sd = cast("dict[str, torch.Tensor]", get_model_state_dict(model, options=_options(cpu_offload=True)))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


# --------------------------------------------------------------------------- saving


class CheckpointWriteError(OSError):
    """A checkpoint (or ``best/``, or the ``latest`` pointer) could not be written; nothing was replaced."""


def _write_failed(target: Path, e: OSError, tmp: Path | None) -> CheckpointWriteError:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    why = os.strerror(e.errno) if e.errno else type(e).__name__
    return CheckpointWriteError(
        e.errno or 0,
        f"{target}: checkpoint not written ({why}: {e}); the temporary folder was removed and the previous "
        "checkpoint and the `latest` pointer are untouched",
    )


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
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # a crashed earlier save
            (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            raise _write_failed(dst, e, tmp) from e
    _barrier()
    # Every rank's RNG (dropout streams differ per rank); needs the run dir on
    # storage all ranks can write (shared FS for multi-node resume).
    try:
        torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    except OSError as e:  # (multi-rank: the other ranks then stop at the next collective)
        raise _write_failed(dst, e, tmp) from e
    _barrier()
    if rank == 0:
        try:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": str(FORMAT)})
            if optim is not None:
                torch.save(optim, tmp / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if trainer_state is not None:
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=_json_default))
            # sha256 + size of every file (weights, optimizer, scheduler, trainer state, rng/*), checked on
            # load. Cost: one streamed read of what was just written (~0.5-2 s per GB; the optimizer state
            # of Adam is 2x the weights), once per save; verification happens on load only.
            files = digest_tree(tmp, skip=("meta.json",))
            full_meta = {"format": FORMAT, **meta, "files": files, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=_json_default))
            _fsync_dir(tmp)
        except OSError as e:
            raise _write_failed(dst, e, tmp) from e
        old = dst.parent / f".old-{dst.name}"
        if dst.exists():  # re-saving the same step after a resume: swap, never delete first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
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
    try:
        tmp.write_text(target.name + "\n")
        os.replace(tmp, ckpt_root / LATEST)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            e.errno or 0,
            f"{ckpt_root / LATEST}: pointer to {target.name} not written ({e}); it still names the previous checkpoint",
        ) from e


def publish_copy(src: Path, dst: Path, files: tuple[str, ...] = ("model.safetensors", "meta.json")) -> Path:
    """Replace ``dst`` (e.g. ``best/``) by ``files`` of checkpoint ``src``, atomically:
    build ``.tmp-<dst>``, move the old one aside, rename, then delete the old one. A failed write
    (full disk) removes the temporary folder, keeps the old ``dst`` and raises :class:`CheckpointWriteError`.
    A copy (not a hard link) is checked against the hashes ``src``'s ``meta.json`` recorded."""
    tmp = dst.parent / f".tmp-{dst.name}"
    old = dst.parent / f".old-{dst.name}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        copied = []
        for name in files:
            if (src / name).exists():
                try:
                    os.link(src / name, tmp / name)
                except OSError:
                    shutil.copy2(src / name, tmp / name)
                    copied.append(name)
        if copied and (tmp / "meta.json").exists():
            verify_files(tmp, read_meta(tmp).get("files") or {}, copied)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        raise _write_failed(dst, e, tmp) from e
    except CorruptFileError:  # the copy is not what was recorded: keep the old dst
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError as e:
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise _write_failed(dst, e, tmp) from e
    if old.exists():
        shutil.rmtree(old)
    return dst


def prune(ckpt_root: Path, keep: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep`` step checkpoints (never one named in ``protect``)."""
    steps = sorted(p for p in ckpt_root.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for p in steps[: max(len(steps) - max(keep, 1), 0)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- loading


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
    # every file this reads is checked against meta.json's hashes first (a recorded file that is
    # missing is refused too); older checkpoints without hashes load unchecked
    files = read_meta(d).get("files") or {}
    verify_files(d, files, [n for n in files if n != "model.safetensors"])
    load_weights(model, d)
    if optimizer is not None and (d / "optimizer.pt").exists():
        osd = torch.load(d / "optimizer.pt", map_location="cpu", weights_only=False)
        # not strict: a trainable weight that has had no gradient yet (the Item LLM during a frozen stage,
        # train.frozen_share) has no AdamW state in the checkpoint, exactly as in the run that wrote it
        set_optimizer_state_dict(model, optimizer, osd, options=_options(strict=False))
        # torch initialises every parameter's state on load (a zero-gradient step): drop it again for those
        # the checkpoint had none for, or their first real AdamW step would count as the second
        saved = set(osd.get("state", {}))
        for name, p in model.named_parameters():
            if p.requires_grad and name not in saved:
                optimizer.state.pop(p, None)
    if scheduler is not None and (d / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(d / "scheduler.pt", map_location="cpu", weights_only=False))
    rng = d / "rng" / f"rank-{rank:05d}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    else:
        log.warning("%s: no RNG state for rank %d (different world size?): dropout streams will differ", d, rank)
    state_path = d / "trainer_state.json"
    return json.loads(state_path.read_text()) if state_path.exists() else {}
