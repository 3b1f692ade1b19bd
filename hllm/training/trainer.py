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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hllm import distributed as D
from hllm import lineage
from hllm.config import Config
from hllm.data import versioning
from hllm.models import loading
from hllm.models.base import SeqRecModel
from hllm.training import checkpoint as ckpt
from hllm.training.batching import GlobalBatches, negatives_per_rank, sample_negatives
from hllm.training.setup import (
    _enable_gradient_checkpointing,
    _fsdp_shard,
    _scale_modules,
    _Step,
    lr_lambda,
    param_groups,
    seed_everything,
)

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


# --------------------------------------------------------------------------- setup helpers


def _training_windows(cfg: Config, built) -> np.ndarray:
    from hllm.data.dataset import train_sequences, training_windows

    return training_windows(train_sequences(built.sequences), cfg.build.max_seq_len, cfg.build.window_mode)


def _n_targets(windows: np.ndarray) -> int:
    return int(((windows[:, :-1] != 0) & (windows[:, 1:] != 0)).sum())


# --------------------------------------------------------------------------- validation


def validate(
    model: SeqRecModel, built, cfg: Config, info: D.DistInfo
) -> tuple[dict[str, float], str, bool, torch.Tensor | None]:
    """Validation metrics, the selection key, whether higher is better, and the item table the
    metrics were computed with (None for the loss fallback).

    Uses ``hllm.evaluation.evaluate.evaluate`` (full-ranking metrics, selection metric
    ``eval.protocol.select_metric``) when that module is present; otherwise the
    InfoNCE loss on the validation targets."""
    try:
        from hllm.evaluation.evaluate import evaluate
        from hllm.evaluation.item_cache import item_embedding_table
    except ImportError:
        pass
    else:
        m = getattr(model, "module", model)
        was = m.training
        m.eval()
        try:
            with torch.inference_mode():
                table = item_embedding_table(model, built.n_items, cfg.eval.item_batch, progress=info.is_main)
        finally:
            m.train(was)
        res = evaluate(model, built, cfg, split="valid", item_table=table, progress=info.is_main)
        key = cfg.eval.protocol.select_metric
        if key not in res.metrics:
            raise ValueError(f"eval.protocol.select_metric {key!r} not among the metrics {sorted(res.metrics)}")
        return dict(res.metrics), key, True, table
    return {"loss": validation_loss(model, built, cfg, info)}, "loss", False, None


@torch.no_grad()
def validation_loss(model: SeqRecModel, built, cfg: Config, info: D.DistInfo) -> float:
    from hllm.data.dataset import eval_split

    es = eval_split(built.sequences, "valid", cfg.build.max_seq_len)
    windows = np.concatenate([es.history, es.targets[:, None]], axis=1).astype(np.int64)
    k_local = negatives_per_rank(cfg.train.num_negatives, info.world_size)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    bs = max(cfg.train.batch_size, 1) * 4
    for b, s in enumerate(range(0, len(windows), bs)):
        w = windows[s : s + bs]
        neg = sample_negatives(cfg.train.seed + 1, b, built.n_items, k_local, info.world_size, info.rank)
        out = model.train_loss(torch.from_numpy(w).to(info.device), torch.from_numpy(neg).to(info.device))
        n = _n_targets(w)
        total += float(out.loss) * n
        count += n
    model.train(was)
    return total / max(count, 1)


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
        return _Trainer(cfg, info, logger, progress).run(resume)
    finally:
        D.teardown(info)


class _Trainer:
    def __init__(self, cfg: Config, info: D.DistInfo, logger: MetricLogger | None, progress: bool):
        self.cfg, self.info, self.logger, self.progress = cfg, info, logger, progress
        self.run_dir = Path(cfg.paths.runs_dir) / cfg.train.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        self.history: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_epochs = 0
        self.last_saved: Path | None = None
        self._val_table: torch.Tensor | None = None  # item table of the last validation (see _cache_items)

    # -------------------------------------------------------------- building

    def _build(self) -> None:
        from hllm.data.dataset import load_built
        from hllm.models import TEXT_KINDS, build_model

        cfg, info = self.cfg, self.info
        t = cfg.train
        for name, v in (("batch_size", t.batch_size), ("grad_accum", t.grad_accum), ("epochs", t.epochs)):
            if v < 1:
                raise ValueError(f"train.{name} must be >= 1, got {v}")
        if t.eval_every_epoch:  # a bad protocol should fail now, not after the first epoch
            try:
                from hllm.evaluation.evaluate import check_protocol
            except ImportError:
                pass
            else:
                check_protocol(cfg.eval.protocol)
        seed_everything(t.seed)
        self.built = load_built(cfg.paths.built_dir)
        tokens = None
        if cfg.model.kind in TEXT_KINDS:
            from hllm.data.text import ensure_tokens

            if info.is_main:  # tokenise once, then the other ranks read the cache
                tokens = ensure_tokens(cfg, self.built.dir)
            D.barrier()
            if not info.is_main:
                tokens = ensure_tokens(cfg, self.built.dir)
        self.model = build_model(cfg, self.built, tokens).to(info.device)
        # identical init on every rank (above), then distinct dropout streams per rank
        torch.manual_seed(t.seed + 1_000_003 * info.rank)
        self.trainable = any(p.requires_grad for p in self.model.parameters())
        if t.gradient_checkpointing:
            n = _enable_gradient_checkpointing(self.model)
            log.info("gradient checkpointing on %d backbone(s)", n)
        self.windows = _training_windows(cfg, self.built)
        self.batches = GlobalBatches(len(self.windows), t.batch_size, info.world_size, t.grad_accum, t.seed)
        spe = self.batches.steps_per_epoch
        self.total_steps = t.epochs * spe if t.max_steps <= 0 else min(t.max_steps, t.epochs * spe)
        self.k_local = negatives_per_rank(t.num_negatives, info.world_size)
        if self.k_local * info.world_size != t.num_negatives:
            log.warning(
                "train.num_negatives=%d is not a multiple of %d ranks: the pool holds %d",
                t.num_negatives,
                info.world_size,
                self.k_local * info.world_size,
            )
        self.step_module = _Step(self.model)
        self.wrapped: nn.Module = self.step_module
        self.fsdp = False
        if self.trainable and t.fsdp and info.distributed:
            _fsdp_shard(self.step_module)
            self.fsdp = True
        elif self.trainable and info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [info.device.index] if info.device.type == "cuda" else None
            self.wrapped = DDP(self.step_module, device_ids=ids)
        self.optimizer = None
        self.scheduler = None
        if self.trainable:
            groups = param_groups(self.model, t.weight_decay, t.lr, t.new_params_lr or None)
            # logged as train/lr (pretrained parameters, train.lr) and train/lr_new (train.new_params_lr)
            self.lr_keys = [
                "lr_new" if t.new_params_lr and t.new_params_lr != t.lr and g["lr"] == t.new_params_lr else "lr"
                for g in groups
            ]
            self.optimizer = torch.optim.AdamW(groups, lr=t.lr)
            self.lr_fn = lr_lambda(self.total_steps, t.warmup_ratio)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_fn)
        self.scales = _scale_modules(self.model)
        self.content_hash = versioning.content_hash(self.built.dir) if info.is_main else None
        self.code_sha = lineage.code_version().label if info.is_main else None
        log.info(
            "train %s: %d windows, %d steps/epoch x %d epochs -> %d steps; global batch %d (%d ranks x %d x accum %d), "
            "%d negatives/step, %.2fM trainable params%s, device %s",
            cfg.model.kind,
            len(self.windows),
            spe,
            t.epochs,
            self.total_steps,
            self.batches.global_batch,
            info.world_size,
            t.batch_size,
            t.grad_accum,
            self.k_local * info.world_size,
            sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6,
            " (FSDP2)" if self.fsdp else (" (DDP)" if info.distributed and self.trainable else ""),
            info.device,
        )

    # -------------------------------------------------------------- checkpoints

    def _meta(self, step: int, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        return {
            "kind": self.cfg.model.kind,
            "step": step,
            "epoch": step / self.batches.steps_per_epoch,
            "total_steps": self.total_steps,
            "config": self.cfg.to_dict(),
            "content_hash": self.content_hash,  # of the built tables (hllm.data.versioning)
            "built_dir": str(self.built.dir),
            "n_items": self.built.n_items,
            "catalogue": loading.catalogue_hash(self.built.item_ids),  # ids by idx: ID models need the same
            "code_sha": self.code_sha,
            "world_size": self.info.world_size,
            "fsdp": self.fsdp,
            "metrics": metrics or {},
            "versions": _versions(),
        }

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }

    def _save(self, step: int, metrics: dict[str, float] | None = None) -> Path:
        dst = self.ckpt_root / loading.step_dir_name(step)
        ckpt.save_checkpoint(
            dst,
            model=self.model,
            meta=self._meta(step, metrics),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self._trainer_state(),
            rank=self.info.rank,
        )
        if self.info.is_main:
            ckpt.write_pointer(self.ckpt_root, dst)
            protect = {loading.step_dir_name(self.best_step)} if self.best_step is not None else set()
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
        saved_cfg = meta.get("config", {})
        for section in ("model",):
            if saved_cfg.get(section) != self.cfg.to_dict()[section]:
                raise ValueError(
                    f"--resume: {latest} was trained with a different `{section}` config; "
                    "resume with the same params or start a new train.run_name"
                )
        if self.info.is_main and meta.get("content_hash") not in (None, self.content_hash):
            log.warning(
                "--resume: %s was trained on data version %s, the built data is now %s",
                latest,
                meta.get("content_hash"),
                self.content_hash,
            )
        state = ckpt.load_training_state(
            latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.info.rank
        )
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        self.bad_epochs = state.get("bad_epochs", 0)
        self.history = state.get("history", [])
        self.last_saved = latest
        log.info("resumed from %s (step %d)", latest, meta["step"])
        return int(meta["step"])

    # -------------------------------------------------------------- validation

    def _validate(self, step: int) -> dict[str, float]:
        root = self.step_module if self.fsdp else None
        if root is not None:
            from torch.distributed.fsdp import FSDPModule

            assert isinstance(root, FSDPModule)  # fully_shard swapped in an FSDPModule subclass
            root.unshard()  # root-level params (embeddings, [ITEM], projection) for direct method calls
        try:
            metrics, key, higher, self._val_table = validate(self.model, self.built, self.cfg, self.info)
        finally:
            if root is not None:
                root.reshard()
        self.select_key, self.higher_better = key, higher
        value = metrics[key]
        improved = self.best_value is None or (value > self.best_value if higher else value < self.best_value)
        if improved:
            self.best_value, self.best_step, self.bad_epochs = value, step, 0
        else:
            self.bad_epochs += 1
        rec = {
            "step": step,
            "epoch": step / self.batches.steps_per_epoch,
            "split": "valid",
            "select_metric": key,
            "value": value,
            "improved": improved,
            "metrics": metrics,
        }
        self.history.append(rec)
        if self.info.is_main:
            log.info("validation at step %d: %s=%.5f%s", step, key, value, " (best)" if improved else "")
            if self.logger is not None:
                self.logger.log_metrics({f"valid/{k}": float(v) for k, v in metrics.items()}, step)
        return metrics

    def _cache_items(self, saved: Path) -> None:
        """Leave the validation's item table in the evaluation cache under the checkpoint just
        saved (same weights), so `hllm evaluate` / `hllm export` of it do not encode the items again."""
        table, self._val_table = self._val_table, None
        if table is None or not self.info.is_main:
            return
        from hllm.evaluation.item_cache import store_cached_items

        store_cached_items(table.cpu().numpy(), self.model, self.built, self.cfg, saved)

    def _publish_best(self) -> Path | None:
        if self.best_step is None or not self.info.is_main:
            return self.run_dir / "best" if (self.run_dir / "best").exists() else None
        src = self.ckpt_root / loading.step_dir_name(self.best_step)
        if src.exists():
            ckpt.publish_copy(src, self.run_dir / "best")
        return self.run_dir / "best"

    # -------------------------------------------------------------- run

    def run(self, resume: bool) -> TrainResult:
        t0 = time.perf_counter()
        cfg, info = self.cfg, self.info
        taken = (
            info.is_main
            and not resume
            and (loading.latest_checkpoint(self.run_dir) is not None or (self.run_dir / "best").exists())
        )
        if D.broadcast_object(taken):  # every rank stops, not only rank 0
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue it, or choose another "
                "train.run_name (nothing was overwritten)"
            )
        self._build()
        if info.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.select_key = cfg.eval.protocol.select_metric
        self.higher_better = True
        start = self._resume() if resume else 0
        stopped_early = False
        if not self.trainable:
            # Nothing to optimise (popularity): one validation, one checkpoint.
            metrics = self._validate(0) if cfg.train.eval_every_epoch else {}
            last = self._save(0, metrics)
            self._cache_items(last)
            step = 0
        else:
            step, stopped_early = self._loop(start)
            last = (
                self.last_saved
                if self.last_saved is not None and self.last_saved.name == loading.step_dir_name(step)
                else self._save(step)
            )
        if self.best_step is None:  # no validation ran: the final weights are the ones to ship
            self.best_step = step
        if info.is_main:
            best_src = self.ckpt_root / loading.step_dir_name(self.best_step)
            if not best_src.exists():
                log.warning("best checkpoint step %d was pruned; best/ keeps its earlier copy", self.best_step)
        best = self._publish_best()
        D.barrier()
        result = TrainResult(
            run_dir=self.run_dir,
            best_checkpoint=best if best is not None and best.exists() else None,
            last_checkpoint=last,
            history=self.history,
            select_metric=self.select_key,
            best_value=self.best_value,
            best_step=self.best_step,
            steps=step,
            stopped_early=stopped_early,
            seconds=time.perf_counter() - t0,
        )
        if info.is_main:
            (self.run_dir / "history.json").write_text(json.dumps(self.history, indent=2))
            (self.run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
            log.info(
                "done: %d steps in %.1fs; best %s=%s at step %s -> %s",
                step,
                result.seconds,
                self.select_key,
                self.best_value,
                self.best_step,
                result.best_checkpoint,
            )
        return result

    def _loop(self, start: int) -> tuple[int, bool]:
        from tqdm.auto import tqdm

        info, t = self.info, self.cfg.train
        spe = self.batches.steps_per_epoch
        bar = tqdm(
            total=self.total_steps,
            initial=start,
            desc="train",
            unit="step",
            disable=not (self.progress and info.is_main),
            dynamic_ncols=True,
        )
        autocast = (
            torch.autocast(device_type=info.device.type, dtype=torch.bfloat16) if t.bf16 else contextlib.nullcontext()
        )
        step = start
        stopped_early = start > 0 and self.bad_epochs >= t.patience  # resuming a run that had stopped early
        if stopped_early:
            self.total_steps = start
        window_stats: dict[str, float] = {}
        window_t0, window_steps = time.perf_counter(), 0
        self.step_module.train()
        while step < self.total_steps:
            self._train_step(step, autocast, window_stats)
            step += 1
            window_steps += 1
            bar.update(1)
            if step % max(t.log_every, 1) == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_t0
                stats = D.all_reduce_mean({k: v / window_steps for k, v in window_stats.items()}, info.device)
                row = self._step_log(stats, elapsed, window_steps, step)
                if info.is_main:
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", items_s=f"{row['train/items_per_s']:.0f}")
                    if self.logger is not None:
                        self.logger.log_metrics(row, step)
                    self.history.append({"step": step, "split": "train", "metrics": row})
                window_stats, window_t0, window_steps = {}, time.perf_counter(), 0
            epoch_end = step % spe == 0 or step == self.total_steps
            validated = False
            if epoch_end and t.eval_every_epoch:
                metrics = self._validate(step)
                saved = self._save(step, metrics)
                self._cache_items(saved)
                validated = True
                if info.is_main and self.best_step == step:
                    ckpt.publish_copy(saved, self.run_dir / "best")
                D.barrier()
                if self.bad_epochs >= t.patience and step < self.total_steps:
                    log.info("early stopping: %d epochs without improvement of %s", self.bad_epochs, self.select_key)
                    stopped_early = True
                    break
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and not validated:
                self._save(step)
        bar.close()
        return step, stopped_early

    def _train_step(self, step: int, autocast, acc: dict[str, float]) -> None:
        info, t = self.info, self.cfg.train
        rates: dict[str, float] = {}
        n_global = _n_targets(self.windows[self.batches.step_indices(step)])
        neg = sample_negatives(t.seed, step, self.built.n_items, self.k_local, info.world_size, info.rank)
        for micro in range(t.grad_accum):
            idx = self.batches.micro_indices(step, micro, info.rank)
            w = self.windows[idx]
            last = micro == t.grad_accum - 1
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if not last and isinstance(self.wrapped, DistributedDataParallel):
                sync = self.wrapped.no_sync()
            elif self.fsdp:
                from torch.distributed.fsdp import FSDPModule

                assert isinstance(self.step_module, FSDPModule)  # fully_shard swapped in an FSDPModule subclass
                self.step_module.set_requires_gradient_sync(last)
            with sync:
                with autocast:
                    out = self.wrapped(
                        torch.from_numpy(w).long().to(info.device), torch.from_numpy(neg).to(info.device)
                    )
                n_local = _n_targets(w)
                # mean over the local targets -> sum -> share of the global mean;
                # x world because DDP/FSDP average gradients over ranks
                loss = out.loss * (n_local * info.world_size / max(n_global, 1))
                loss.backward()
            for k, v in out.stats.items():
                acc[k] = acc.get(k, 0.0) + float(v) / t.grad_accum
            acc["loss"] = acc.get("loss", 0.0) + float(out.loss.detach()) * n_local / max(n_global, 1) * info.world_size
        if t.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            acc["grad_norm"] = acc.get("grad_norm", 0.0) + float(
                norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            )
        assert self.optimizer is not None and self.scheduler is not None  # only a trainable model takes steps
        # the rates this step applies (the scheduler set them after the previous step), per group kind
        for key, g in zip(self.lr_keys, self.optimizer.param_groups):
            rates.setdefault(key, float(g["lr"]))
        for key, v in rates.items():
            acc[key] = acc.get(key, 0.0) + v
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for s in self.scales:
            s.clamp_()

    def _step_log(self, stats: dict[str, float], elapsed: float, steps: int, step: int) -> dict[str, float]:
        """Per-step means over the logging window (and over ranks), plus throughput."""
        world = self.info.world_size
        row = {
            f"train/{k}": v
            for k, v in stats.items()
            if k not in ("items", "item_tokens", "padded_tokens", "slots", "targets")
        }
        per_s = steps / max(elapsed, 1e-9)
        row["train/steps_per_s"] = per_s
        # stats are per-rank means; x world for the whole job
        row["train/items_per_s"] = stats.get("items", 0.0) * world * per_s
        row["train/item_tokens_per_s"] = stats.get("item_tokens", 0.0) * world * per_s
        if stats.get("slots"):
            row["train/distinct_ratio"] = stats.get("items", 0.0) / stats["slots"]
        if stats.get("padded_tokens"):
            row["train/padding_waste"] = 1.0 - stats.get("item_tokens", 0.0) / stats["padded_tokens"]
        row["train/epoch"] = step / self.batches.steps_per_epoch
        return row


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
