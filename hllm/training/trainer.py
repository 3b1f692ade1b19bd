"""Training loop for every registered model kind: single process, DDP or FSDP2 under torchrun.

``train(cfg, resume=False, logger=None)`` is the library entry; ``python -m
hllm.training.trainer --params params.yaml [--set k=v]... [--resume]`` is the torchrun
entry (``hllm train --nproc N`` launches it).

What a step does (global batch = batch_size x world_size x grad_accum windows):
each rank takes its slice of the step's windows (``hllm.training.batching``), samples
its share of the shared negative pool, and calls ``model.train_loss``. The loss
is re-normalised to the mean over every target position of the whole global
step (not the mean of per-rank means), so N ranks with batch b give the same
gradients as one process with batch N*b. Then: gradient clipping, AdamW,
warmup + cosine LR, clamping of the learnable similarity scale.

Run folder ``paths.runs_dir/<train.run_name>/``::

    checkpoints/step-XXXXXX/   every ``checkpoint_every`` steps, each epoch end and the end
    checkpoints/latest         name of the newest complete checkpoint (``--resume`` reads it)
    best/                      weights + meta of the best validation checkpoint
    history.json               per-epoch validation metrics and sampled step logs
    result.json                the TrainResult of a finished run
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from hllm import distributed as D
from hllm import faults
from hllm.config import Config
from hllm.data.dataset import BuiltData
from hllm.evaluation.evaluate import evaluate
from hllm.evaluation.item_cache import item_embedding_table, store_cached_items
from hllm.models import loading
from hllm.models.base import SeqRecModel, eval_mode, unwrap
from hllm.models.hllm import HLLM
from hllm.training import checkpoint as ckpt
from hllm.training.batching import sample_negatives
from hllm.training.metric_buffer import BackgroundMetrics
from hllm.training.setup import TrainSetup, build_setup, describe

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    select_metric: str = ""
    best_value: float | None = None
    best_step: int | None = None
    steps: int = 0
    stopped_early: bool = False
    stopped_by_budget: bool = False  # train.time_budget_s ran out before the planned steps
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("run_dir", "best_checkpoint", "last_checkpoint"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainResult":
        d = json.loads((Path(run_dir) / "result.json").read_text())
        for k in ("run_dir", "best_checkpoint", "last_checkpoint"):
            d[k] = Path(d[k]) if d[k] is not None else None
        return cls(**d)


def _n_targets(windows: np.ndarray) -> int:
    return int(((windows[:, :-1] != 0) & (windows[:, 1:] != 0)).sum())


# --------------------------------------------------------------------------- validation


@dataclass
class Validation:
    metrics: dict[str, float]  # full-ranking metrics on the validation split
    key: str  # eval.protocol.select_metric: picks the best checkpoint and drives early stopping
    item_table: torch.Tensor | None = None  # the item embeddings they were computed with (reused by the cache)

    @property
    def value(self) -> float:
        return self.metrics[self.key]


def validate(model: SeqRecModel, built: BuiltData, cfg: Config, info: D.DistInfo) -> Validation:
    """Full-ranking validation metrics (``hllm.evaluation.evaluate``), higher is better."""
    with eval_mode(unwrap(model)), torch.inference_mode():
        table = item_embedding_table(model, built.n_items, cfg.eval.item_batch, progress=info.is_main)
    res = evaluate(model, built, cfg, split="valid", item_table=table, progress=info.is_main)
    key = cfg.eval.protocol.select_metric
    if key not in res.metrics:
        raise ValueError(f"eval.protocol.select_metric {key!r} not among the metrics {sorted(res.metrics)}")
    return Validation(dict(res.metrics), key, table)


# --------------------------------------------------------------------------- the loop


def train(
    cfg: Config, resume: bool = False, logger: MetricLogger | None = None, *, progress: bool = True
) -> TrainResult:
    """Train ``cfg.model.kind`` on the built dataset; see the module docstring.

    Under torchrun every rank calls this (the process group is created from the
    environment, or reused when the caller created one). Rank 0 writes the
    run folder and calls ``logger.log_metrics``; every rank returns the result.
    """
    info = D.setup(cfg.train.device)
    try:
        run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
        taken = info.is_main and not resume and (loading.latest_checkpoint(run_dir) is not None
                                                 or (run_dir / "best").exists())  # fmt: skip
        if D.broadcast_object(taken):  # every rank stops, not only rank 0
            raise FileExistsError(
                f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another "
                "train.run_name (nothing was overwritten)"
            )
        setup = build_setup(cfg, info)
        log.info(describe(setup, cfg, info))
        # a tracking outage must not end the run: rank 0's metrics go out from a background buffer
        tc = cfg.tracking
        sink = None
        if logger is not None and info.is_main:
            sink = BackgroundMetrics(logger, tc.metrics_buffer_rows, tc.metrics_flush_s)
        try:
            return _Trainer(cfg, info, setup, sink, progress).run(resume)
        finally:
            if sink is not None:
                sink.close()
    finally:
        D.teardown(info)


@dataclass
class _Progress:
    """What changes as training goes on (and a checkpoint's ``trainer_state.json`` restores)."""

    best_value: float | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class _Trainer:
    """The loop over a built :class:`~hllm.training.setup.TrainSetup`: steps, per-epoch validation,
    checkpoints, early stopping. ``run`` reads top to bottom; each step is ``_train_step``."""

    def __init__(self, cfg: Config, info: D.DistInfo, setup: TrainSetup, logger: MetricLogger | None,
                 progress: bool):  # fmt: skip
        self.cfg, self.info, self.s, self.logger, self.progress = cfg, info, setup, logger, progress
        self.run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.p = _Progress()
        self.total_steps = setup.total_steps  # shortened when resuming a run that had stopped early
        self.stopped_by_budget = False
        self._t0 = time.perf_counter()  # the time budget counts from here: setup (model load, tokens) is free
        self.last_saved: Path | None = None
        self._val_table: torch.Tensor | None = None  # item table of the last validation (see _cache_items)

    # -------------------------------------------------------------- run

    def run(self, resume: bool) -> TrainResult:
        t0 = time.perf_counter()
        if self.info.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        D.barrier()
        start = self._resume() if resume else 0
        stopped_early = False
        if not self.s.trainable:  # nothing to optimise (popularity): one validation, one checkpoint
            metrics = self._validate(0) if self.cfg.train.eval_every_epoch else {}
            last = self._save(0, metrics)
            self._cache_items(last)
            step = 0
        else:
            step, stopped_early = self._loop(start)
            saved = self.last_saved is not None and self.last_saved.name == loading.step_dir_name(step)
            last = self.last_saved if saved and self.last_saved is not None else self._save(step)
        if self.p.best_step is None:  # no validation ran: the final weights are the ones to ship
            self.p.best_step = step
        best = self._publish_best()
        D.barrier()
        result = TrainResult(
            run_dir=self.run_dir,
            best_checkpoint=best if best is not None and best.exists() else None,
            last_checkpoint=last,
            history=self.p.history,
            select_metric=self.cfg.eval.protocol.select_metric,
            best_value=self.p.best_value,
            best_step=self.p.best_step,
            steps=step,
            stopped_early=stopped_early,
            stopped_by_budget=self.stopped_by_budget,
            seconds=time.perf_counter() - t0,
        )
        if self.info.is_main:
            (self.run_dir / "history.json").write_text(json.dumps(self.p.history, indent=2))
            (self.run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
            log.info("done: %d steps in %.1fs; best %s=%s at step %s -> %s", step, result.seconds,
                     result.select_metric, self.p.best_value, self.p.best_step, result.best_checkpoint)  # fmt: skip
        return result

    def _loop(self, start: int) -> tuple[int, bool]:
        from tqdm.auto import tqdm

        info, t = self.info, self.cfg.train
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and info.is_main))  # fmt: skip
        autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if t.bf16 else contextlib.nullcontext()
        step = start
        stopped_early = start > 0 and self.p.bad_epochs >= t.patience  # resuming a run that had stopped early
        if stopped_early:
            self.total_steps = start
        window: dict[str, float] = {}
        window_t0, window_steps = time.perf_counter(), 0
        self.s.step_module.train()
        while step < self.total_steps:
            self._train_step(step, autocast, window)
            step, window_steps = step + 1, window_steps + 1
            bar.update(1)
            if step % max(t.log_every, 1) == 0 or step == self.total_steps:
                self._log_window(window, time.perf_counter() - window_t0, window_steps, step, bar)
                window, window_t0, window_steps = {}, time.perf_counter(), 0
            if self._over_budget(step):
                spent = time.perf_counter() - self._t0
                log.info("time budget: %.0f s of train.time_budget_s=%.0f spent after step %d of %d; "
                         "validating and stopping", spent, t.time_budget_s, step, self.total_steps)  # fmt: skip
                self.stopped_by_budget = True
                self.total_steps = step  # this step is now the last one: validate and save it
            epoch_end = step % self.s.batches.steps_per_epoch == 0 or step == self.total_steps
            if epoch_end and t.eval_every_epoch:
                self._end_of_epoch(step)
                if self.p.bad_epochs >= t.patience and step < self.total_steps:
                    log.info("early stopping: %d epochs without improvement of %s", self.p.bad_epochs,
                             self.cfg.eval.protocol.select_metric)  # fmt: skip
                    stopped_early = True
                    break
            elif t.checkpoint_every > 0 and step % t.checkpoint_every == 0:
                self._save(step)
        bar.close()
        return step, stopped_early

    def _over_budget(self, step: int) -> bool:
        """Whether train.time_budget_s is spent (rank 0's clock decides, so every rank stops at the same step)."""
        budget = self.cfg.train.time_budget_s
        if budget <= 0 or step >= self.total_steps:
            return False
        return bool(D.broadcast_object(time.perf_counter() - self._t0 >= budget))

    def _train_step(self, step: int, autocast: contextlib.AbstractContextManager[Any], acc: dict[str, float]) -> None:
        info, t, s = self.info, self.cfg.train, self.s
        assert s.optimizer is not None and s.scheduler is not None  # only a trainable model takes steps
        self._item_table_schedule(step)
        n_global = _n_targets(s.windows[s.batches.step_indices(step)])
        neg = sample_negatives(t.seed, step, s.built.n_items, s.k_local, info.world_size, info.rank)
        for micro in range(t.grad_accum):
            w = s.windows[s.batches.micro_indices(step, micro, info.rank)]
            # mean over the local targets -> sum -> share of the global mean;
            # x world because DDP/FSDP average gradients over ranks
            share = _n_targets(w) * info.world_size / max(n_global, 1)
            with self._grad_sync(last=micro == t.grad_accum - 1):
                with autocast:
                    out = s.wrapped(torch.from_numpy(w).long().to(info.device), torch.from_numpy(neg).to(info.device))
                (out.loss * share).backward()
            for k, v in out.stats.items():
                acc[k] = acc.get(k, 0.0) + float(v) / t.grad_accum
            acc["loss"] = acc.get("loss", 0.0) + float(out.loss.detach()) * share
        if t.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), t.max_grad_norm)
            norm_value = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
            acc["grad_norm"] = acc.get("grad_norm", 0.0) + float(norm_value)
        # the rates this step applies (the scheduler set them after the previous step), per group kind
        rates: dict[str, float] = {}
        for key, g in zip(s.lr_keys, s.optimizer.param_groups):
            rates.setdefault(key, float(g["lr"]))
        for key, v in rates.items():
            acc[key] = acc.get(key, 0.0) + v
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        for scale in s.scales:
            scale.clamp_()

    def _item_table_schedule(self, step: int) -> None:
        """HLLM's cached item table (``train.hllm_loss``, ``model.item.tune``, ``train.frozen_share``): end the
        frozen stage when its share of the run is spent, then encode the table when it is missing or, while the
        Item LLM trains, every ``train.item_table_refresh`` steps (0: at each epoch start). A pure function of
        the step and the checkpointed table state, except the time-based stage end (rank 0's clock decides)."""
        m, t = self.s.model, self.cfg.train
        if not getattr(m, "uses_table", False):
            return
        assert isinstance(m, HLLM)
        if m.item_frozen and m.item.tune != "frozen":
            if t.time_budget_s > 0:
                over = time.perf_counter() - self._t0 >= t.frozen_share * t.time_budget_s
            else:
                over = step >= round(t.frozen_share * self.total_steps)
            if D.broadcast_object(over):
                log.info("frozen stage over at step %d: model.item.tune=%s from now on", step, m.item.tune)
                m.unfreeze_item()
        due = int(m.table_step) < 0
        if not due and not m.item_frozen:  # a training Item LLM: the table goes stale, refresh on schedule
            every = t.item_table_refresh or self.s.batches.steps_per_epoch
            due = step % every == 0 and int(m.table_step) != step
        if due:
            root = self.s.step_module if self.s.fsdp else None
            if root is not None:  # root-level params (embeddings, [ITEM]) for a direct call, as in validation
                # before the first step no forward has run: the root must claim its children first, or a child's
                # forward would initialise itself as a root of its own (FSDP2's lazy init)
                root._get_fsdp_state()._lazy_init()  # type: ignore[operator]
                root.unshard()  # type: ignore[operator]
            try:
                m.refresh_table(step, progress=self.progress and self.info.is_main)
            finally:
                if root is not None:
                    root.reshard()  # type: ignore[operator]

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient all-reduce only on the last micro-batch of a step (DDP ``no_sync``; FSDP2's flag)."""
        if isinstance(self.s.wrapped, DistributedDataParallel) and not last:
            return self.s.wrapped.no_sync()
        if self.s.fsdp:
            from torch.distributed.fsdp import FSDPModule

            assert isinstance(self.s.step_module, FSDPModule)  # fully_shard swapped in an FSDPModule subclass
            self.s.step_module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _log_window(self, window: dict[str, float], elapsed: float, steps: int, step: int, bar: Any) -> None:
        stats = D.all_reduce_mean({k: v / steps for k, v in window.items()}, self.info.device)
        row = self._step_log(stats, elapsed, steps, step)
        if self.info.is_main:
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", items_s=f"{row['train/items_per_s']:.0f}")
            if self.logger is not None:
                self.logger.log_metrics(row, step)
            self.p.history.append({"step": step, "split": "train", "metrics": row})

    def _end_of_epoch(self, step: int) -> None:
        """Validate, save (the best also to ``best/``), and leave the item table in the eval cache."""
        metrics = self._validate(step)
        saved = self._save(step, metrics)
        self._cache_items(saved)
        if self.info.is_main and self.p.best_step == step:
            ckpt.publish_copy(saved, self.run_dir / "best")
        D.barrier()

    def _step_log(self, stats: dict[str, float], elapsed: float, steps: int, step: int) -> dict[str, float]:
        """Per-step means over the logging window (and over ranks), plus throughput."""
        world = self.info.world_size
        skip = ("items", "item_tokens", "padded_tokens", "slots", "targets")
        row = {f"train/{k}": v for k, v in stats.items() if k not in skip}
        per_s = steps / max(elapsed, 1e-9)
        row["train/steps_per_s"] = per_s
        # stats are per-rank means; x world for the whole job
        row["train/items_per_s"] = stats.get("items", 0.0) * world * per_s
        row["train/item_tokens_per_s"] = stats.get("item_tokens", 0.0) * world * per_s
        if stats.get("slots"):
            row["train/distinct_ratio"] = stats.get("items", 0.0) / stats["slots"]
        if stats.get("padded_tokens"):
            row["train/padding_waste"] = 1.0 - stats.get("item_tokens", 0.0) / stats["padded_tokens"]
        row["train/epoch"] = step / self.s.batches.steps_per_epoch
        return row

    # -------------------------------------------------------------- validation

    def _validate(self, step: int) -> dict[str, float]:
        root = self.s.step_module if self.s.fsdp else None
        if root is not None:
            from torch.distributed.fsdp import FSDPModule

            assert isinstance(root, FSDPModule)  # fully_shard swapped in an FSDPModule subclass
            root.unshard()  # root-level params (embeddings, [ITEM], projection) for direct method calls
        try:
            v = validate(self.s.model, self.s.built, self.cfg, self.info)
        finally:
            if root is not None:
                root.reshard()
        self._val_table = v.item_table
        improved = self.p.best_value is None or v.value > self.p.best_value
        if improved:
            self.p.best_value, self.p.best_step, self.p.bad_epochs = v.value, step, 0
        else:
            self.p.bad_epochs += 1
        epoch = step / self.s.batches.steps_per_epoch
        self.p.history.append({"step": step, "epoch": epoch, "split": "valid", "select_metric": v.key,
                               "value": v.value, "improved": improved, "metrics": v.metrics})  # fmt: skip
        if self.info.is_main:
            log.info("validation at step %d: %s=%.5f%s", step, v.key, v.value, " (best)" if improved else "")
            if self.logger is not None:
                self.logger.log_metrics({f"valid/{k}": float(x) for k, x in v.metrics.items()}, step)
        return v.metrics

    def _cache_items(self, saved: Path) -> None:
        """Leave the validation's item table in the evaluation cache under the checkpoint just
        saved (same weights), so `hllm evaluate` / `hllm export` of it do not encode the items again."""
        table, self._val_table = self._val_table, None
        if table is not None and self.info.is_main:
            store_cached_items(table.cpu().numpy(), self.s.model, self.s.built, self.cfg, saved)

    # -------------------------------------------------------------- checkpoints

    def _meta(self, step: int, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        s = self.s
        return {
            "kind": self.cfg.model.kind,
            "step": step,
            "epoch": step / s.batches.steps_per_epoch,
            "total_steps": self.total_steps,
            "config": self.cfg.to_dict(),
            "content_hash": s.content_hash,  # of the built tables (hllm.data.versioning)
            "built_dir": str(s.built.dir),
            "n_items": s.built.n_items,
            "catalogue": loading.catalogue_hash(s.built.item_ids),  # ids by idx: ID models need the same
            "code_sha": s.code_sha,
            "world_size": self.info.world_size,
            "fsdp": s.fsdp,
            "metrics": metrics or {},
            "versions": _versions(),
        }

    def _save(self, step: int, metrics: dict[str, float] | None = None) -> Path:
        dst = self.ckpt_root / loading.step_dir_name(step)
        ckpt.save_checkpoint(dst, model=self.s.model, meta=self._meta(step, metrics), optimizer=self.s.optimizer,
                             scheduler=self.s.scheduler, trainer_state=asdict(self.p), rank=self.info.rank)  # fmt: skip
        if self.info.is_main:
            ckpt.write_pointer(self.ckpt_root, dst)
            faults.point("train:checkpoint-saved")  # mid training: a checkpoint the next night can train on from
            protect = {loading.step_dir_name(self.p.best_step)} if self.p.best_step is not None else set()
            ckpt.prune(self.ckpt_root, self.cfg.train.keep_checkpoints, protect | {dst.name})
        D.barrier()
        self.last_saved = dst
        return dst

    def _resume(self) -> int:
        latest = loading.latest_checkpoint(self.run_dir)
        if latest is None:
            log.info("--resume: no checkpoint under %s, starting from scratch", self.run_dir)
            return 0
        meta = loading.read_meta(latest)
        if meta.get("config", {}).get("model") != self.cfg.to_dict()["model"]:
            raise ValueError(f"--resume: {latest} was trained with a different `model` config; "
                             "resume with the same params or start a new train.run_name")  # fmt: skip
        if self.info.is_main and meta.get("content_hash") not in (None, self.s.content_hash):
            log.warning("--resume: %s was trained on data version %s, the built data is now %s", latest,
                        meta.get("content_hash"), self.s.content_hash)  # fmt: skip
        state = ckpt.load_training_state(latest, model=self.s.model, optimizer=self.s.optimizer,
                                         scheduler=self.s.scheduler, rank=self.info.rank)  # fmt: skip
        known = {k: state[k] for k in ("best_value", "best_step", "bad_epochs", "history") if k in state}
        self.p = _Progress(**known)
        self.last_saved = latest
        log.info("resumed from %s (step %d)", latest, meta["step"])
        return int(meta["step"])

    def _publish_best(self) -> Path | None:
        best = self.run_dir / "best"
        if self.p.best_step is None or not self.info.is_main:
            return best if best.exists() else None
        src = self.ckpt_root / loading.step_dir_name(self.p.best_step)
        if src.exists():
            ckpt.publish_copy(src, best)
        else:
            log.warning("best checkpoint step %d was pruned; best/ keeps its earlier copy", self.p.best_step)
        return best


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
