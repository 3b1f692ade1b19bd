"""Batches: which windows and negatives each rank gets at each step, and how
pre-tokenised item texts become padded or packed Item-LLM inputs.

Everything here is a pure function of (seed, step, rank), so a resumed run or a
run on a different number of ranks sees exactly the same global batches and
negative pools: a run on 2 ranks with batch b equals a run on 1 rank with 2b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- windows and negatives


@dataclass
class GlobalBatches:
    """Shuffled, rank-sharded training windows.

    One step consumes ``global_batch = batch_size * world_size * grad_accum``
    windows: epoch ``e`` walks a permutation seeded by (seed, e); the last
    incomplete global batch is filled from the start of the permutation (like
    ``DistributedSampler``), so every step has the same shape. Micro-batch
    ``m`` of rank ``r`` at a step is slice ``(m * world + r) * batch_size`` of
    that step's global batch.
    """

    n_windows: int
    batch_size: int
    world_size: int = 1
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_windows <= 0:
            raise ValueError("no training windows: every user has fewer than 2 training items")
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_windows // self.global_batch)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n_windows)
            pad = self.steps_per_epoch * self.global_batch - self.n_windows
            self._perm = np.concatenate([perm, np.resize(perm, pad)]) if pad else perm
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self, step: int) -> np.ndarray:
        """Window indices of the whole global batch of ``step`` (all ranks, all micro-steps)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_indices(self, step: int, micro: int, rank: int) -> np.ndarray:
        g = self.step_indices(step)
        s = (micro * self.world_size + rank) * self.batch_size
        return g[s : s + self.batch_size]


def negatives_per_rank(num_negatives: int, world_size: int) -> int:
    """Each rank samples an equal share of the global pool (all_gather needs equal sizes)."""
    if num_negatives <= 0:
        raise ValueError(f"train.num_negatives must be > 0, got {num_negatives}")
    return -(-num_negatives // world_size)


def sample_negatives(seed: int, step: int, n_items: int, k_local: int, world_size: int, rank: int) -> np.ndarray:
    """Uniform item idx in [1, n_items) for this rank's slice of the global pool.

    The whole pool is drawn from a generator keyed by (seed, step), and rank r
    keeps slice r, so the gathered pool is the same whatever the number of
    ranks (given the same global pool size). Every micro-step of a step uses
    the same pool (re-encoded each time, which costs what a fresh pool would),
    so gradient accumulation equals the larger batch exactly. No history
    exclusion, as in the paper's ``num_negatives`` mode: the false-negative
    filter handles collisions.
    """
    if n_items < 2:
        raise ValueError("need at least one real item to sample negatives")
    rng = np.random.default_rng([seed, 7919, step])
    pool = rng.integers(1, n_items, size=k_local * world_size, dtype=np.int64)
    return pool[rank * k_local : (rank + 1) * k_local]


# --------------------------------------------------------------------------- item token batches
