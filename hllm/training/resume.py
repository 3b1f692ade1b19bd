"""Resume a crashed night's training instead of starting it over.

A nightly run killed while it trained (OOM killer, preempted node, reboot) leaves its run folder
``runs/nightly-<stamp>-<kind>/`` with step checkpoints but no ``result.json``. When the next night
trains the same model on the same data with the same settings, those steps are still good work:
:func:`find_crashed` picks the newest such folder whose latest valid checkpoint matches (data
content hash, and the ``model``, ``train`` except its run name, ``build`` and ``eval.protocol``
settings), and :func:`adopt` hard-links its checkpoints and ``best/`` into this run's folder, so
that ``train(cfg, resume=True)`` continues from there (bit-identical to an uninterrupted run, see
``tests/training/test_loop.py``). The crashed folder itself is left to retention
(``flow.keep_runs``). Anything that does not match is trained from scratch, with the reason logged.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hllm.config import Config
from hllm.data.dataset import CorruptFileError
from hllm.models import loading

log = logging.getLogger(__name__)

COMPARED = ("model", "train", "build", "eval.protocol")  # settings a resumed run must share
IGNORED_TRAIN = ("run_name",)  # differs every night by construction


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in COMPARED:
        node: Any = cfg
        for part in key.split("."):
            node = (node or {}).get(part)
        out[key] = copy.deepcopy(node)
    for k in IGNORED_TRAIN:
        (out.get("train") or {}).pop(k, None)
    return out


def mismatch(meta: dict[str, Any], cfg: Config, content_hash: str) -> str | None:
    """Why a checkpoint (its ``meta.json``) cannot be resumed by ``cfg`` on data ``content_hash``; None if it can."""
    if meta.get("content_hash") != content_hash:
        return f"trained on data {meta.get('content_hash')}, the built data is now {content_hash}"
    mine, theirs = _settings(cfg.to_dict()), _settings(meta.get("config") or {})
    for key in COMPARED:
        if mine[key] != theirs[key]:
            a, b = mine[key] or {}, theirs[key] or {}
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) else []
            return f"different `{key}` settings" + (f" ({', '.join(diff[:5])})" if diff else "")
    return None


def find_crashed(cfg: Config, content_hash: str, prefix: str = "nightly-", scan: int = 3) -> Path | None:
    """The latest valid checkpoint of the newest unfinished ``<prefix>*-<kind>`` run that ``cfg`` may
    resume (at most ``scan`` unfinished folders are looked at, newest first); None when there is none."""
    runs = Path(cfg.paths.runs_dir)
    if not runs.is_dir():
        return None
    kind, current = cfg.model.kind, cfg.train.run_name
    folders = sorted((d for d in runs.glob(f"{prefix}*-{kind}") if d.is_dir() and d.name != current), reverse=True)
    unfinished = [d for d in folders if not (d / "result.json").exists()][:scan]
    for run_dir in unfinished:
        try:
            ckpt = loading.latest_checkpoint(run_dir)
        except CorruptFileError as e:
            log.info("not resuming %s: %s", run_dir.name, e)
            continue
        if ckpt is None:
            continue
        why = mismatch(loading.read_meta(ckpt), cfg, content_hash)
        if why:
            log.info("not resuming %s: %s", run_dir.name, why)
            continue
        return ckpt
    return None


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)  # same filesystem: no copy; files of a checkpoint are never rewritten in place
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=False)


def adopt(ckpt: Path, cfg: Config) -> Path:
    """Bring the crashed run of checkpoint ``ckpt`` into ``cfg``'s run folder (its ``checkpoints/``,
    with ``latest`` naming ``ckpt``, and ``best/``); returns the new run folder. The target must not
    hold checkpoints yet."""
    from hllm.training import checkpoint

    src_run = ckpt.parent.parent
    dst_run = Path(cfg.paths.runs_dir) / cfg.train.run_name
    tmp = dst_run.with_name(f".tmp-adopt-{dst_run.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _link_tree(ckpt, tmp / "checkpoints" / ckpt.name)
        best = src_run / "best"
        if best.is_dir():
            _link_tree(best, tmp / "best")
        checkpoint.write_pointer(tmp / "checkpoints", tmp / "checkpoints" / ckpt.name)
        dst_run.mkdir(parents=True, exist_ok=True)
        for part in ("checkpoints", "best"):  # the run folder may exist (empty); its parts appear whole
            if (tmp / part).exists():
                os.replace(tmp / part, dst_run / part)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("resuming the crashed run %s from %s (step %s)", src_run.name, ckpt.name,
             loading.read_meta(ckpt).get("step"))  # fmt: skip
    return dst_run
