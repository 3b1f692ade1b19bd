"""The built-dataset contract shared by training, evaluation and export.

``hllm data build`` writes, under ``paths.built_dir``::

    items.parquet       idx (int32, 0 = padding row), item_id (str, original id), one column per text field
    users.parquet       idx (int32, 0..U-1), user_id (str, original id)
    sequences.parquet   user_idx (int32), items (list<int32>): the user's full chronological item list
    stats.json          users, items, interactions, sequence-length percentiles, build params
    tokens/<key>.npz    pre-tokenised item text: ids (int32, flat), offsets (int64, n_items + 1)
    tokens/<key>.json   its settings, and the npz's sha256 + size (a corrupt cache is rebuilt)

Item index 0 is padding and never a real item. Everything downstream derives
its splits from ``sequences.parquet`` with the pure functions below, so the
split rule lives in one place.

``sequences.parquet`` also holds ``timestamps`` (list<int64>, aligned with ``items``), which the
temporal split reads; a dataset built before it had them can only be split leave-one-out.

Split rules (``eval.protocol.split``; :func:`split_plan` turns either into per-user positions):

leave_one_out (as in the HLLM paper):
    train      = all items but the last two
    validation = target items[-2], history items[:-2]
    test       = target items[-1], history items[:-1] (includes the validation item)

temporal (a global time cutoff; cutoffs ``valid_cutoff`` < ``test_cutoff``, quantiles of every
interaction's timestamp or epoch seconds; an interaction at or before a cutoff is the past):
    train      = every interaction at or before the validation cutoff
    validation = target: the user's first interaction after the validation cutoff and at or before the
                 test cutoff; history: everything before it (= the user's training part)
    test       = target: the user's first interaction after the test cutoff; history: everything before
                 it (the training part and the validation period)
    A user with no interaction before a target has nothing to read and is not evaluated on that split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PAD = 0


@dataclass
class Sequences:
    """Ragged per-user item lists in CSR form: user u owns items[offsets[u]:offsets[u+1]]."""

    offsets: np.ndarray  # int64, len U + 1
    items: np.ndarray  # int32

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def of(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> "Sequences":
        lengths = np.array([len(x) for x in lists], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.fromiter((i for x in lists for i in x), dtype=np.int32, count=int(offsets[-1]))
        return cls(offsets, items)

    def truncate_tail(self, drop: int) -> "Sequences":
        """Drop the last ``drop`` items of every user (vectorised)."""
        lengths = np.maximum(self.lengths - drop, 0)
        keep = _ranges(self.offsets[:-1], lengths)
        offsets = np.zeros_like(self.offsets)
        np.cumsum(lengths, out=offsets[1:])
        return Sequences(offsets, self.items[keep])


@dataclass
class EvalSplit:
    """One evaluation split: for each evaluated user, a left-padded window of
    the most recent history, the target, and the full history (for masking)."""

    users: np.ndarray  # int32 user idx
    history: np.ndarray  # int32 [n, max_history], left-padded with PAD
    targets: np.ndarray  # int32 [n]
    full_history: Sequences  # untruncated history per evaluated user, for masking seen items


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    rep_starts = np.repeat(np.asarray(starts, dtype=np.int64), lengths)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rep_starts + within


def left_pad_windows(seqs: Sequences, ends: np.ndarray, users: np.ndarray, width: int) -> np.ndarray:
    """For each (user, end) take items[offsets[u] : end] truncated to the last ``width``, left-padded."""
    starts = np.maximum(seqs.offsets[users], ends - width)
    lengths = ends - starts
    out = np.full((len(users), width), PAD, dtype=np.int32)
    rows = np.repeat(np.arange(len(users)), lengths)
    cols = width - np.repeat(lengths, lengths) + (_ranges(np.zeros_like(lengths), lengths))
    out[rows, cols] = seqs.items[_ranges(starts, lengths)]
    return out


@dataclass
class SplitPlan:
    """Where each user's sequence splits: every split rule is a training prefix and at most one
    validation and one test target per user, so both rules share one representation."""

    train_len: np.ndarray  # int64 [U]: items of the training part, a prefix of the sequence
    valid_pos: np.ndarray  # int64 [U]: flat index into Sequences.items of the validation target, -1 = none
    test_pos: np.ndarray  # int64 [U]: the same for the test target
    info: dict[str, Any]  # how it was made, for metrics.json: rule, resolved cutoff times, counts


def leave_one_out_plan(seqs: Sequences) -> SplitPlan:
    lengths, ends = seqs.lengths, seqs.offsets[1:]
    return SplitPlan(
        train_len=np.maximum(lengths - 2, 0),
        valid_pos=np.where(lengths >= 3, ends - 2, -1),  # a target needs one history item before it
        test_pos=np.where(lengths >= 2, ends - 1, -1),
        info={"split": "leave_one_out"},
    )


def temporal_plan(seqs: Sequences, timestamps: np.ndarray, valid_cutoff: float, test_cutoff: float,
                  cutoff_unit: str = "quantile") -> SplitPlan:  # fmt: skip
    """The global temporal split of the module docstring. ``timestamps`` is aligned with
    ``seqs.items`` and non-decreasing within each user (the build sorts by time). Quantile cutoffs are
    ``numpy.quantile`` (linear interpolation) over every interaction's timestamp."""
    from hllm.config import check_cutoffs

    check_cutoffs(valid_cutoff, test_cutoff, cutoff_unit)
    ts = np.asarray(timestamps, dtype=np.int64)
    if ts.shape != seqs.items.shape:
        raise ValueError(f"timestamps has {len(ts)} values for {len(seqs.items)} interactions")
    if len(ts) == 0:
        raise ValueError("a temporal split needs interactions; the dataset is empty")
    lengths = seqs.lengths
    owner = np.repeat(np.arange(seqs.n_users), lengths)
    if ((np.diff(ts) < 0) & (owner[1:] == owner[:-1])).any():
        raise ValueError("timestamps must be non-decreasing within each user's sequence (rebuild the dataset)")
    if cutoff_unit == "quantile":
        tv, tt = (float(np.quantile(ts, q)) for q in (valid_cutoff, test_cutoff))
    else:
        tv, tt = float(valid_cutoff), float(test_cutoff)
    # sorted by time within a user, so "at or before a cutoff" is a prefix: count it per user
    n_v = np.bincount(owner[ts <= tv], minlength=seqs.n_users).astype(np.int64)
    n_t = np.bincount(owner[ts <= tt], minlength=seqs.n_users).astype(np.int64)
    starts = seqs.offsets[:-1]
    has_valid, has_test = n_t > n_v, lengths > n_t  # an interaction in (tv, tt] / after tt
    plan = SplitPlan(
        train_len=n_v,
        valid_pos=np.where(has_valid & (n_v > 0), starts + n_v, -1),
        test_pos=np.where(has_test & (n_t > 0), starts + n_t, -1),
        info={
            "split": "temporal",
            "valid_cutoff_time": tv,
            "test_cutoff_time": tt,
            "train_interactions": int(n_v.sum()),
            # users whose first interaction came after the cutoff: no history to read, not evaluated
            "valid_users_without_history": int((has_valid & (n_v == 0)).sum()),
            "test_users_without_history": int((has_test & (n_t == 0)).sum()),
        },
    )
    if plan.info["train_interactions"] == 0:
        raise ValueError(
            f"eval.protocol.valid_cutoff: no interaction at or before it (time {tv:g}); "
            "the temporal split has nothing to train on"
        )
    return plan


def split_plan(seqs: Sequences, protocol, timestamps: np.ndarray | None = None) -> SplitPlan:
    """The split ``protocol`` (an ``eval.protocol`` block) defines on ``seqs``."""
    if protocol.split == "leave_one_out":
        return leave_one_out_plan(seqs)
    if protocol.split != "temporal":
        raise ValueError(f"eval.protocol.split: unknown split {protocol.split!r}")
    if timestamps is None:
        raise ValueError(
            "eval.protocol.split=temporal needs the interaction timestamps in sequences.parquet, and this "
            "dataset was built without them; rebuild it (`hllm data build`)"
        )
    return temporal_plan(seqs, timestamps, protocol.valid_cutoff, protocol.test_cutoff, protocol.cutoff_unit)


def train_sequences(seqs: Sequences, plan: SplitPlan | None = None) -> Sequences:
    """Each user's training part: ``plan``'s prefix, or all but the last two items (leave-one-out)."""
    if plan is None:
        return seqs.truncate_tail(2)
    keep = _ranges(seqs.offsets[:-1], plan.train_len)
    offsets = np.zeros_like(seqs.offsets)
    np.cumsum(plan.train_len, out=offsets[1:])
    return Sequences(offsets, seqs.items[keep])


def eval_split(seqs: Sequences, which: str, max_history: int, plan: SplitPlan | None = None) -> EvalSplit:
    """``which`` is "valid" or "test": the targets of ``plan`` (default leave-one-out: the second-to-last
    and the last item), with everything before each target as its history."""
    if which not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {which!r}")
    plan = plan if plan is not None else leave_one_out_plan(seqs)
    pos = plan.valid_pos if which == "valid" else plan.test_pos
    users = np.nonzero((pos >= 0) & (pos > seqs.offsets[:-1]))[0].astype(np.int32)  # one history item at least
    target_pos = pos[users]
    history = left_pad_windows(seqs, target_pos, users, max_history)
    hist_len = target_pos - seqs.offsets[users]
    full = Sequences(
        np.concatenate([[0], np.cumsum(hist_len)]).astype(np.int64), seqs.items[_ranges(seqs.offsets[users], hist_len)]
    )
    return EvalSplit(users=users, history=history, targets=seqs.items[target_pos].astype(np.int32), full_history=full)


def training_windows(train: Sequences, max_seq_len: int, mode: str = "split") -> np.ndarray:
    """Training samples as an int32 [n_windows, L + 1] matrix, left-padded with PAD.

    ``split``: each user's list is cut into non-overlapping windows of L+1
    aligned to the end (the newest window is complete). The leading remainder
    becomes a shorter window when it holds >= 2 items; the reference code
    silently dropped it. ``last``: one window per user, the most recent L+1.
    ``sliding``: one window ending at every training position (the most recent L+1 items up to it),
    so every target is also trained with its full left context, as RecBole trains every prefix
    (about L times more windows than ``split``; memory n_windows x (L + 1) int32).
    Users with fewer than 2 training items yield nothing (no next-item target).
    """
    width = max_seq_len + 1
    lengths = train.lengths
    ok = lengths >= 2
    if mode == "last":
        users = np.nonzero(ok)[0]
        return left_pad_windows(train, train.offsets[users + 1], users, width)
    if mode == "sliding":
        n_win = np.where(ok, lengths - 1, 0)  # windows end after the 2nd .. last item
        users = np.repeat(np.arange(train.n_users), n_win)
        ends = train.offsets[users] + 2 + _ranges(np.zeros_like(n_win), n_win)
        return left_pad_windows(train, ends, users, width)
    if mode != "split":
        raise ValueError(f"build.window_mode must be 'split', 'last' or 'sliding', got {mode!r}")
    n_win = np.where(ok, -(-lengths // width), 0)
    users = np.repeat(np.arange(train.n_users), n_win)
    # window k (0 = newest) of user u ends at offsets[u+1] - k*width
    k = _ranges(np.zeros_like(n_win), n_win)
    ends = train.offsets[users + 1] - k * width
    starts = np.maximum(train.offsets[users], ends - width)
    keep = (ends - starts) >= 2
    users, ends = users[keep], ends[keep]
    return left_pad_windows(train, ends, users, width)


# --------------------------------------------------------------------------- loading


@dataclass
class TokenCache:
    ids: np.ndarray  # int32 flat token ids
    offsets: np.ndarray  # int64 [n_items + 1]; row 0 is the padding item

    def of(self, idx: int) -> np.ndarray:
        return self.ids[self.offsets[idx] : self.offsets[idx + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class BuiltData:
    dir: Path
    item_ids: np.ndarray  # object array of original ids, index = item idx (0 = "<pad>")
    user_ids: np.ndarray  # object array of original ids, index = user idx
    sequences: Sequences
    stats: dict
    timestamps: np.ndarray | None = None  # int64, aligned with sequences.items; None: built without them

    def split_plan(self, protocol) -> SplitPlan:
        """The split ``protocol`` defines on this dataset (see :func:`split_plan`)."""
        return split_plan(self.sequences, protocol, self.timestamps)

    @property
    def n_items(self) -> int:
        """Number of item slots including the padding row 0."""
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def items_table(self):
        import pandas as pd

        return pd.read_parquet(self.dir / "items.parquet")


def load_built(built_dir: str | Path) -> BuiltData:
    import pyarrow.parquet as pq

    d = Path(built_dir)
    missing = [n for n in ("items.parquet", "users.parquet", "sequences.parquet") if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"{d}: built dataset incomplete, missing {missing}; run `hllm data build` first")
    items = pq.read_table(d / "items.parquet", columns=["idx", "item_id"]).to_pandas()
    users = pq.read_table(d / "users.parquet", columns=["idx", "user_id"]).to_pandas()
    seq = pq.read_table(d / "sequences.parquet")
    col = seq.column("items").combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    flat = col.flatten().to_numpy().astype(np.int32)
    order = seq.column("user_idx").to_numpy()
    if not np.array_equal(order, np.arange(len(order))):
        raise ValueError(f"{d / 'sequences.parquet'}: user_idx must be 0..U-1 in order")
    item_ids = items.sort_values("idx")["item_id"].to_numpy(dtype=object)
    user_ids = users.sort_values("idx")["user_id"].to_numpy(dtype=object)
    stats = json.loads((d / "stats.json").read_text()) if (d / "stats.json").exists() else {}
    timestamps = None
    if "timestamps" in seq.column_names:
        tcol = seq.column("timestamps").combine_chunks()
        toffs = tcol.offsets.to_numpy().astype(np.int64)
        if not np.array_equal(toffs - toffs[0], offsets - offsets[0]):
            raise ValueError(f"{d / 'sequences.parquet'}: timestamps are not aligned with items")
        timestamps = tcol.flatten().to_numpy().astype(np.int64)
    return BuiltData(d, item_ids, user_ids, Sequences(offsets - offsets[0], flat), stats, timestamps)


def tokens_sidecar(path: str | Path) -> Path:
    """``tokens/<key>.json`` next to ``tokens/<key>.npz``."""
    return Path(path).with_suffix(".json")


def load_tokens(path: str | Path) -> TokenCache:
    """Read a token cache, refusing (:class:`CorruptFileError`, naming the file) one whose bytes do not
    match the sha256 + size its sidecar ``<key>.json`` recorded, or that does not parse as a cache
    (an old cache without a recorded hash still loads when it parses)."""
    path = Path(path)
    side = tokens_sidecar(path)
    want = None
    if side.exists():
        try:
            want = json.loads(side.read_text()).get("file")
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable token-cache sidecar (%s); the cache is checked by parsing only", side, e)
    if want:
        verify_file(path, want)
    else:
        log.debug("%s: no recorded sha256 (older cache); not verified", path)
    try:
        with np.load(path) as z:
            ids, offsets = z["ids"].astype(np.int32), z["offsets"].astype(np.int64)
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError...
        raise CorruptFileError(f"{path}: unreadable token cache ({type(e).__name__}: {e})") from e
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(ids) or (np.diff(offsets) < 0).any():
        raise CorruptFileError(f"{path}: inconsistent token cache (offsets do not describe {len(ids)} token ids)")
    return TokenCache(ids=ids, offsets=offsets)


# --------------------------------------------------------------------------- file integrity
#
# Checkpoints (``meta.json``), exports (``manifest.json``) and token caches (``tokens/<key>.json``)
# record ``{"sha256": ..., "bytes": ...}`` of each file they wrote; readers verify before loading.
# Cost: sha256 streams the file in 4 MiB chunks at about the disk's/CPU's rate (measured 0.075 s per 100 MB,
# ~1.3 GB/s, from the page cache on the dev box; a cold disk is slower: roughly 0.5-2 GB/s,
# ~0.5-2 s per GB), so a multi-GB checkpoint costs seconds to hash at save and once at load. A file
# verified once in a process is not hashed again while its size, mtime and inode are unchanged
# (``latest_checkpoint`` then ``load_training_state`` read the same files).

HASH_CHUNK = 1 << 22

_verified: dict[str, tuple[int, int, int, str]] = {}


class CorruptFileError(ValueError):
    """A file whose bytes are not the ones recorded when it was written (truncated, corrupted, missing)."""


def human_bytes(n: int) -> str:
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1000 or unit == "GB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"  # pragma: no cover


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": size}`` of a file, streamed in chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


def verify_file(path: str | Path, want: Mapping[str, Any]) -> None:
    """Raise :class:`CorruptFileError` naming ``path`` unless it has the recorded size and sha256."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: missing (expected {human_bytes(int(want['bytes']))})") from None
    key = str(path.resolve())
    if _verified.get(key) == (st.st_size, st.st_mtime_ns, st.st_ino, want["sha256"]):
        return
    if st.st_size != int(want["bytes"]):
        got_s, want_s = human_bytes(st.st_size), human_bytes(int(want["bytes"]))
        if got_s == want_s:  # a few bytes short: say how many
            got_s, want_s = f"{st.st_size:,} bytes", f"{int(want['bytes']):,} bytes"
        raise CorruptFileError(f"{path}: sha256 mismatch (truncated or corrupted: {got_s}, expected {want_s})")
    got = file_digest(path)["sha256"]
    if got != want["sha256"]:
        raise CorruptFileError(
            f"{path}: sha256 mismatch (corrupted: the size is right, {human_bytes(st.st_size)}, the content is not; "
            f"sha256 {got[:12]}…, expected {str(want['sha256'])[:12]}…)"
        )
    _verified[key] = (st.st_size, st.st_mtime_ns, st.st_ino, want["sha256"])


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON sidecar (``meta.json``, an export manifest) that must be an object; a torn or foreign
    file is a :class:`CorruptFileError` naming it, e.g. ``…/meta.json: unreadable meta.json (…)``."""
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise CorruptFileError(f"{path}: unreadable {what} (truncated or corrupted: {e})") from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: the {what} is not a JSON object (corrupted)")
    return obj


def verify_files(root: str | Path, files: Mapping[str, Mapping[str, Any]], names: list[str] | None = None) -> None:
    """:func:`verify_file` for each recorded ``files`` entry (relative to ``root``), or only ``names``."""
    for name in names if names is not None else sorted(files):
        if name in files:
            verify_file(Path(root) / name, files[name])


def digest_tree(root: str | Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative posix path: file_digest}`` of every file under ``root`` except ``skip``."""
    root = Path(root)
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel not in skip:
                out[rel] = file_digest(p)
    return dict(sorted(out.items()))
