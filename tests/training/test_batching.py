"""Global batches, rank sharding, negative pools and length buckets."""

from __future__ import annotations

import numpy as np
import pytest

from hllm.models.item_batch import length_buckets
from hllm.training.batching import GlobalBatches, negatives_per_rank, sample_negatives


def test_ranks_partition_the_global_batch_of_a_single_process():
    one = GlobalBatches(n_windows=103, batch_size=8, world_size=1, grad_accum=1, seed=3)
    two = GlobalBatches(n_windows=103, batch_size=4, world_size=2, grad_accum=1, seed=3)
    acc = GlobalBatches(n_windows=103, batch_size=2, world_size=2, grad_accum=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == acc.steps_per_epoch == 13
    for step in (0, 5, 12, 13, 27):
        ref = one.micro_indices(step, 0, 0)
        shards = np.concatenate([two.micro_indices(step, 0, r) for r in range(2)])
        micro = np.concatenate([acc.micro_indices(step, m, r) for m in range(2) for r in range(2)])
        assert np.array_equal(ref, shards) and np.array_equal(ref, micro)


def test_each_epoch_visits_every_window_and_reshuffles():
    b = GlobalBatches(n_windows=50, batch_size=4, world_size=2, seed=0)
    e0 = np.concatenate([b.step_indices(s) for s in range(b.steps_per_epoch)])
    e1 = np.concatenate([b.step_indices(s) for s in range(b.steps_per_epoch, 2 * b.steps_per_epoch)])
    assert set(e0) == set(range(50)) == set(e1)
    assert len(e0) == b.steps_per_epoch * 8  # last global batch filled from the start
    assert not np.array_equal(e0[:50], e1[:50])


def test_negative_pool_is_the_same_whatever_the_number_of_ranks():
    single = sample_negatives(7, step=4, n_items=1000, k_local=64, world_size=1, rank=0)
    split = np.concatenate([sample_negatives(7, 4, 1000, 32, 2, r) for r in range(2)])
    assert np.array_equal(single, split)
    assert single.min() >= 1 and single.max() < 1000  # never the padding item
    other_step = sample_negatives(7, 5, 1000, 64, 1, 0)
    assert not np.array_equal(single, other_step)
    assert negatives_per_rank(64, 3) == 22
    with pytest.raises(ValueError):
        negatives_per_rank(0, 1)


def test_length_buckets_respect_the_token_budget_and_cover_all_items():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200)
    groups = length_buckets(lengths, max_tokens=256, extra=1)
    flat = np.concatenate(groups)
    assert sorted(flat) == list(range(200))
    for g in groups:
        assert len(g) == 1 or len(g) * (lengths[g].max() + 1) <= 256
    # sorting by length keeps padding low: < 10% here versus ~50% for one padded block
    padded = sum(len(g) * (lengths[g].max() + 1) for g in groups)
    assert (lengths + 1).sum() / padded > 0.90  # under 10 % padding
    assert (lengths + 1).sum() / (len(lengths) * (lengths.max() + 1)) < 0.6  # padding-to-max wastes > 40 %
