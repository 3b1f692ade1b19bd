"""Token-cache integrity: the sidecar records the npz's sha256 + size; a truncated or corrupted cache is
rebuilt by ``ensure_tokens`` (derived data) with a warning naming it, and refused by ``load_tokens``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from hllm import testing as T
from hllm.data.dataset import CorruptFileError, file_digest, load_tokens
from hllm.data.text import ensure_tokens


@pytest.fixture
def setup(tmp_path, tiny_bert_dir, built_dir):
    d = tmp_path / "built"
    shutil.copytree(built_dir, d, ignore=shutil.ignore_patterns("tokens"))
    cfg = T.tiny_config(tmp_path, tiny_bert_dir, d)
    cache = ensure_tokens(cfg, d)
    (npz,) = (d / "tokens").glob("*.npz")
    return cfg, d, cache, npz


def _rewrite(p: Path, data: bytes) -> None:
    p.unlink()
    p.write_bytes(data)


def test_sidecar_records_the_cache_hash(setup):
    _, _, cache, npz = setup
    side = json.loads(npz.with_suffix(".json").read_text())
    assert side["file"] == file_digest(npz) and side["max_text_len"] == 24
    np.testing.assert_array_equal(load_tokens(npz).ids, cache.ids)
    assert not list(npz.parent.glob("*.tmp.*"))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_cache_is_refused_by_load_tokens_and_rebuilt_by_ensure_tokens(setup, how, caplog):
    cfg, d, cache, npz = setup
    data = bytearray(npz.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x01  # inside the offsets payload: np.load would not notice
    _rewrite(npz, bytes(data))
    with pytest.raises(CorruptFileError, match=f"{npz.name}: sha256 mismatch"):
        load_tokens(npz)
    with caplog.at_level(logging.WARNING, logger="hllm.data.text"):
        again = ensure_tokens(cfg, d)
    assert f"{npz}: corrupt token cache, rebuilding it" in caplog.text
    np.testing.assert_array_equal(again.ids, cache.ids)
    np.testing.assert_array_equal(again.offsets, cache.offsets)
    load_tokens(npz)  # the rebuilt file matches its sidecar


def test_old_cache_without_hash_loads_and_a_broken_one_is_named(setup):
    cfg, d, cache, npz = setup
    side = npz.with_suffix(".json")
    meta = json.loads(side.read_text())
    del meta["file"]
    side.write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_tokens(npz).offsets, cache.offsets)
    _rewrite(npz, npz.read_bytes()[:100])  # no hash to compare: still caught by parsing
    with pytest.raises(CorruptFileError, match=f"{npz.name}: unreadable token cache"):
        load_tokens(npz)
    again = ensure_tokens(cfg, d)
    np.testing.assert_array_equal(again.ids, cache.ids)
    assert json.loads(side.read_text())["file"] == file_digest(npz)
