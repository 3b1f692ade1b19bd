"""``hllm data build``: validated raw tables -> the built-dataset contract.

Writes exactly what :mod:`hllm.data.dataset` describes (``items.parquet``
with the padding row, ``users.parquet``, ``sequences.parquet``, ``stats.json``,
``tokens/``) into a staging folder that replaces ``paths.built_dir`` only when
complete. Every step is a column operation over int32 codes (no Python loop per
row), so 10 M interactions build in well under the memory of a laptop; see
``benchmarks/data_build.py``.

Choices that change results, and why:

* **k-core** (``build.k_core_user`` / ``build.k_core_item``; a value <= 1
  disables that side). ``iterative`` repeats "drop items with < k_item
  interactions, drop users with < k_user" until nothing changes: a true k-core,
  every remaining user and item meets its threshold. ``one_pass`` is what
  HLLM's Books script does: both counts are taken once on the raw data, rows
  failing either are dropped, then users left with < k_user rows are dropped;
  cheaper, but an item can end below k_item.
* **Order within a user**: a *stable* sort by timestamp, so interactions with
  the same timestamp keep the order of the input file. Many logs record several
  interactions in the same second (in MovieLens-100K three rows in four share
  their timestamp with another row of the same user) and the tie rule decides
  which item is "last", i.e. the test target. HLLM's reference code used
  pandas' default quicksort (not stable); keeping file order is what RecBole
  does, so results stay comparable with it.
* **Ids**: users and items are numbered in order of first appearance in the
  input file (after filtering); item idx 0 is padding. ``users.parquet`` and
  ``items.parquet`` are the id maps.
* Items in the catalogue that nobody interacted with (after filtering) are
  not part of the built dataset.
* **Held-out items** (``build.holdout_items`` > 0, the item cold-start split of
  inductive evaluations such as ZESRec / UniSRec): after k-core, a share of the
  catalogue is "not launched yet". They are drawn uniformly (``numpy``
  ``default_rng(build.holdout_seed)``, over the candidates sorted by original
  id, so the draw does not depend on file order) among the items that are some
  user's last interaction: only those can be a leave-one-out test target, and
  holding out any other item would only delete data. Every interaction with a
  held-out item is dropped except a user's last one, so a held-out item occurs
  only as a test target, never in a training window, a validation target or a
  history, and the "new items" slice (never seen in training) is exactly the
  users whose target was held out. Holdout runs *after* k-core so the users and
  items are those of the build without it (the same catalogue, the share is of
  it); k-core is not re-run afterwards, since it would cascade from the held-out
  items themselves (each has only its test-target interactions left), so a user
  can end below ``build.k_core_user`` (``stats.json`` counts the users left
  without a history before their target; they are not evaluated).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hllm.config import Config
from hllm.data.errors import DataError
from hllm.data.raw import INTERACTIONS, ITEMS, fingerprint, read_raw, replace_dir

log = logging.getLogger(__name__)

PAD_ID = "<pad>"


@dataclass
class KCoreResult:
    keep: np.ndarray  # bool mask over input rows
    iterations: int


def k_core(users: np.ndarray, items: np.ndarray, k_user: int, k_item: int, mode: str = "iterative") -> KCoreResult:
    """Rows to keep under user/item k-core filtering (see module docstring for the two modes).

    ``users``/``items`` are dense int codes. Each pass is two ``bincount``s
    and a gather over the surviving rows.
    """
    n = len(users)
    keep = np.ones(n, dtype=bool)
    if k_user <= 1 and k_item <= 1:
        return KCoreResult(keep, 0)
    nu = int(users.max()) + 1 if n else 0
    ni = int(items.max()) + 1 if n else 0
    if mode == "one_pass":
        ucnt = np.bincount(users, minlength=nu)
        icnt = np.bincount(items, minlength=ni)
        keep = (ucnt[users] >= k_user) & (icnt[items] >= k_item)
        ucnt = np.bincount(users[keep], minlength=nu)
        keep &= ucnt[users] >= k_user
        return KCoreResult(keep, 1)
    if mode != "iterative":
        raise ValueError(f"build.k_core_mode must be 'iterative' or 'one_pass', got {mode!r}")
    idx = np.arange(n)  # surviving row positions; arrays shrink every pass
    u, i = users, items
    it = 0
    while True:
        it += 1
        icnt = np.bincount(i, minlength=ni)
        m = icnt[i] >= k_item
        ucnt = np.bincount(u[m], minlength=nu)
        m &= ucnt[u] >= k_user
        if m.all():
            break
        idx, u, i = idx[m], u[m], i[m]
        if len(idx) == 0:
            break
    keep = np.zeros(n, dtype=bool)
    keep[idx] = True
    return KCoreResult(keep, it)


def hold_out_items(
    users: np.ndarray, items: np.ndarray, ts: np.ndarray, item_dict: pa.Array, cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The held-out items of ``build.holdout_items`` (module docstring): returns the kept rows' user codes,
    item codes and timestamps, and the ``stats.json`` record (ids, counts)."""
    from hllm.config import ConfigError

    b = cfg.build
    if cfg.eval.protocol.split != "leave_one_out":
        # the held-out items are kept as each user's *last* interaction, the leave-one-out test target; under
        # a temporal split the target is the first interaction after a cutoff, which they would not be
        raise ConfigError(
            f"build.holdout_items: needs eval.protocol.split=leave_one_out, got {cfg.eval.protocol.split!r}"
        )
    n = len(users)
    # the same order as the sequences: stable by (user, timestamp), so ties keep file order and "last" is the
    # item the leave-one-out split makes the test target
    order = np.lexsort((ts, users))
    u_sorted = users[order]
    is_last_sorted = np.ones(n, dtype=bool)
    is_last_sorted[:-1] = u_sorted[1:] != u_sorted[:-1]
    is_last = np.zeros(n, dtype=bool)
    is_last[order] = is_last_sorted
    n_items = len(np.unique(items))
    want = int(round(b.holdout_items * n_items))
    cand = np.unique(items[is_last])  # item codes that some user ends on
    cand_ids = np.asarray(item_dict.take(pa.array(cand)).cast(pa.string()).to_pylist(), dtype=object)
    by_id = np.argsort(cand_ids, kind="stable")
    cand, cand_ids = cand[by_id], cand_ids[by_id]
    if want < 1:
        raise ConfigError(
            f"build.holdout_items: {b.holdout_items!r} of {n_items} items holds out none; raise it or set 0 (off)"
        )
    if want > len(cand):
        raise ConfigError(
            f"build.holdout_items: {b.holdout_items!r} of {n_items} items is {want} items, but only {len(cand)} "
            "are some user's last interaction (a test target); lower it"
        )
    pick = np.sort(np.random.default_rng(b.holdout_seed).choice(len(cand), size=want, replace=False))
    held = np.zeros(int(items.max()) + 1, dtype=bool)
    held[cand[pick]] = True
    keep = ~held[items] | is_last
    record = {
        "share": b.holdout_items,
        "seed": b.holdout_seed,
        "items": want,
        "candidates": len(cand),
        "item_ids": sorted(cand_ids[pick].tolist()),
        "test_targets": int((held[items] & is_last).sum()),
        "rows_removed": int(n - keep.sum()),
    }
    log.info(
        "holdout: %d of %d items held out (seed %d), %d test targets, %d interactions removed",
        want, n_items, b.holdout_seed, record["test_targets"], record["rows_removed"],
    )  # fmt: skip
    return users[keep], items[keep], ts[keep], record


def first_appearance_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber codes 0..K-1 in order of first appearance. Returns (new code per row, old code per new id)."""
    uniq, first = np.unique(codes, return_index=True)
    old_by_new = uniq[np.argsort(first, kind="stable")]
    lut = np.empty(int(uniq.max()) + 1 if len(uniq) else 0, dtype=np.int32)
    lut[old_by_new] = np.arange(len(old_by_new), dtype=np.int32)
    return lut[codes], old_by_new


def _encode(col: pa.ChunkedArray, name: str, where: Path) -> tuple[np.ndarray, pa.Array]:
    arr = col.combine_chunks()
    if arr.null_count:
        raise DataError(f"{where}: column {name} has {arr.null_count} null value(s); run `hllm data validate`")
    enc = arr.dictionary_encode()
    return enc.indices.to_numpy().astype(np.int32, copy=False), enc.dictionary


def _percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.percentile(x, [5, 25, 50, 75, 95, 99])
    out = {"min": int(x.min()), "mean": round(float(x.mean()), 3)}
    out.update({f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95, 99), q)})
    out["max"] = int(x.max())
    return out


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 20)


def build_dataset(
    cfg: Config,
    raw_dir: str | Path | None = None,
    built_dir: str | Path | None = None,
    tokenize: bool | None = None,
    require_validation: bool | None = None,
) -> Path:
    """Build ``paths.built_dir`` from ``paths.raw_dir``; returns the built folder.

    Raises :class:`DataError` when the raw data has not passed validation (with
    ``build.require_validation``), cannot be read, or filtering leaves nothing.
    The previous built folder is replaced only after the new one is complete.
    """
    from tqdm.auto import tqdm

    b = cfg.build
    raw = Path(raw_dir or cfg.paths.raw_dir)
    out = Path(built_dir or cfg.paths.built_dir)
    tokenize = b.tokenize if tokenize is None else tokenize
    if b.require_validation if require_validation is None else require_validation:
        from hllm.data.validate import require_passed

        require_passed(cfg, raw)

    steps = tqdm(total=6 + int(tokenize), desc="build", unit="step", disable=None)
    tables = read_raw(raw, columns={INTERACTIONS: ["user_id", "item_id", "timestamp"]})
    inter = tables.interactions
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in inter.column_names]
    if missing:
        raise DataError(f"{raw / INTERACTIONS}: missing column(s) {missing}; run `hllm data validate`")
    ts_col = inter.column("timestamp")
    if not pa.types.is_integer(ts_col.type):
        raise DataError(f"{raw / INTERACTIONS}: timestamp is {ts_col.type}, expected int64; run `hllm data validate`")
    n_raw = inter.num_rows
    u_code, u_dict = _encode(inter.column("user_id"), "user_id", raw / INTERACTIONS)
    i_code, i_dict = _encode(inter.column("item_id"), "item_id", raw / INTERACTIONS)
    ts = ts_col.combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    del inter, tables
    steps.update()

    kc = k_core(u_code, i_code, b.k_core_user, b.k_core_item, b.k_core_mode)
    if not kc.keep.all():
        u_code, i_code, ts = u_code[kc.keep], i_code[kc.keep], ts[kc.keep]
    if len(u_code) == 0:
        raise DataError(
            f"{raw}: k-core filtering (users >= {b.k_core_user}, items >= {b.k_core_item}, "
            f"{b.k_core_mode}) left no interactions; lower build.k_core_user / build.k_core_item"
        )
    n_kcore = len(u_code)
    holdout: dict[str, Any] | None = None
    if b.holdout_items > 0:
        u_code, i_code, ts, holdout = hold_out_items(u_code, i_code, ts, i_dict, cfg)
    steps.update()

    u_new, u_old = first_appearance_ids(u_code)
    i_new, i_old = first_appearance_ids(i_code)
    i_new = i_new + 1  # idx 0 is padding
    del u_code, i_code
    steps.update()

    # Stable: rows with equal (user, timestamp) keep their input-file order.
    order = np.lexsort((ts, u_new))
    seq_items = i_new[order].astype(np.int32, copy=False)
    ts_sorted = ts[order]
    u_sorted = u_new[order]
    del order, ts, i_new
    n_users = len(u_old)
    lengths = np.bincount(u_sorted, minlength=n_users).astype(np.int64)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    same_ts = (u_sorted[1:] == u_sorted[:-1]) & (ts_sorted[1:] == ts_sorted[:-1])
    n_ties = int(same_ts.sum())
    del u_sorted, same_ts
    steps.update()

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / f".built-staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        # ---- id maps
        user_ids = u_dict.take(pa.array(u_old))
        _write(
            pa.table({"idx": pa.array(np.arange(n_users, dtype=np.int32)), "user_id": user_ids.cast(pa.string())}),
            stage / "users.parquet",
        )
        item_ids = i_dict.take(pa.array(i_old)).cast(pa.string())
        items_tbl = _items_table(raw, item_ids)
        _write(items_tbl, stage / "items.parquet")
        # ---- sequences
        big = offsets[-1] >= 2**31
        list_type = pa.large_list(pa.int32()) if big else pa.list_(pa.int32())
        arr_cls = pa.LargeListArray if big else pa.ListArray
        list_offsets = pa.array(offsets.astype(np.int64 if big else np.int32))
        seqs = arr_cls.from_arrays(list_offsets, pa.array(seq_items), type=list_type)
        # each item's timestamp, aligned with items: the temporal split (eval.protocol.split) cuts on them
        times = arr_cls.from_arrays(
            list_offsets, pa.array(ts_sorted), type=pa.large_list(pa.int64()) if big else pa.list_(pa.int64())
        )
        _write(
            pa.table({"user_idx": pa.array(np.arange(n_users, dtype=np.int32)), "items": seqs, "timestamps": times}),
            stage / "sequences.parquet",
        )
        steps.update()
        # ---- stats
        from hllm.data.dataset import Sequences, eval_split, split_plan, train_sequences, training_windows

        s = Sequences(offsets, seq_items)
        # the split of eval.protocol: under temporal, training windows come only from interactions at or
        # before the validation cutoff (training builds its windows with the same functions)
        plan = split_plan(s, cfg.eval.protocol, ts_sorted)
        train_part = train_sequences(s, plan)
        n_windows = len(training_windows(train_part, b.max_seq_len, b.window_mode))
        n_items = len(item_ids)
        icount = np.bincount(seq_items, minlength=n_items + 1)[1:]
        stats: dict[str, Any] = {
            "users": n_users,
            "items": n_items,
            "interactions": int(offsets[-1]),
            "density": round(float(offsets[-1]) / (n_users * n_items), 6),
            "sequence_length": _percentiles(lengths),
            "interactions_per_item": _percentiles(icount),
            "same_timestamp_ties": n_ties,
            "raw": {
                "interactions": n_raw,
                "users": len(u_dict),
                "items_interacted": len(i_dict),
                "catalogue_items": pq.ParquetFile(raw / ITEMS).metadata.num_rows,
            },
            "k_core": {
                "mode": b.k_core_mode,
                "user": b.k_core_user,
                "item": b.k_core_item,
                "iterations": kc.iterations,
                "rows_removed": n_raw - n_kcore,
            },
            "split": {
                **plan.info,
                "train_users": int((train_part.lengths > 0).sum()),
                "train_windows": n_windows,
                "valid_users": len(eval_split(s, "valid", 1, plan).users),
                "test_users": len(eval_split(s, "test", 1, plan).users),
            },
            # users left with their (held-out) target alone: no history, so no test target (not evaluated)
            **({"holdout": {**holdout, "users_without_history": int((lengths == 1).sum())}} if holdout else {}),
            "build": {**asdict(b), "tokenize": tokenize},
            "raw_fingerprint": fingerprint(raw),
        }
        (stage / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        steps.update()
        if tokenize:
            from hllm.data.text import ensure_tokens

            ensure_tokens(cfg, stage)
            steps.update()
        replace_dir(stage, out)
    finally:
        steps.close()
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    log.info(
        "built %d users, %d items, %d interactions (%d removed by %s k-core) -> %s",
        n_users,
        n_items,
        int(offsets[-1]),
        n_raw - n_kcore,
        b.k_core_mode,
        out,
    )
    return out


def _items_table(raw: Path, item_ids: pa.Array) -> pa.Table:
    """idx 0 = padding, then the kept items in idx order with every text column of the raw items table."""
    import pyarrow.compute as pc

    cat = pq.read_table(raw / ITEMS)
    pos = pc.index_in(item_ids, value_set=cat.column("item_id").combine_chunks())  # first match; null if absent
    body = cat.take(pos)
    cols: dict[str, pa.Array] = {
        "idx": pa.array(np.arange(len(item_ids) + 1, dtype=np.int32)),
        "item_id": pa.concat_arrays([pa.array([PAD_ID]), item_ids]),
    }
    for c in cat.column_names:
        if c != "item_id":
            vals = body.column(c).combine_chunks().cast(pa.string())
            cols[c] = pa.concat_arrays([pa.array([None], pa.string()), vals])
    return pa.table(cols)


def load_stats(cfg: Config, built_dir: str | Path | None = None) -> dict[str, Any]:
    p = Path(built_dir or cfg.paths.built_dir) / "stats.json"
    if not p.exists():
        raise DataError(f"{p}: no built dataset; run `hllm data build`")
    return json.loads(p.read_text(encoding="utf-8"))
