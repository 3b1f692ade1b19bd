"""Export integrity: the manifest records sha256 + size of each file; a truncated or corrupted file is
refused by name when loading, and never reused by a re-export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from hllm.data.dataset import CorruptFileError, file_digest
from hllm.serving import export as E
from hllm.serving.recommend import Recommender
from tests.helpers.evalkit import random_dataset, small_cfg, text_model_for

FILES = {"items.parquet", "item_embeddings.npy", "items.faiss", "users.parquet", "user_embeddings.npy", "seen.npz"}


def _export(tmp_path: Path):
    built = random_dataset(tmp_path / "b", n_users=20, n_items=30, seed=0)
    cfg = small_cfg(ks=(1, 5))
    cfg.eval.protocol.max_history = 5
    cfg.model.item.text_fields = ["title"]
    model = text_model_for(built, cfg)
    res = E.export_model(model, built, cfg, tmp_path / "exp", progress=False)
    return res, model, built, cfg


def _rewrite(p: Path, data: bytes) -> None:
    p.unlink()  # a fresh inode, as a torn copy would be
    p.write_bytes(data)


def test_manifest_records_every_file(tmp_path):
    res, *_ = _export(tmp_path)
    files = res.manifest["files"]
    assert set(files) == FILES
    for name, want in files.items():
        assert file_digest(res.out_dir / name) == want, name
    assert json.loads((res.out_dir / E.MANIFEST).read_text())["files"] == files
    assert len(Recommender.from_export(res.out_dir).for_user(str(Recommender(res.out_dir).user_ids[0]), k=3)) == 3


@pytest.mark.parametrize("name", ["item_embeddings.npy", "user_embeddings.npy", "items.faiss", "seen.npz"])
def test_truncated_export_file_is_refused_by_name(tmp_path, name):
    res, *_ = _export(tmp_path)
    p = res.out_dir / name
    _rewrite(p, p.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match=f"exp/{name}: sha256 mismatch \\(truncated or corrupted"):
        Recommender.from_export(res.out_dir)


def test_flipped_byte_in_embeddings_is_refused(tmp_path):
    res, *_ = _export(tmp_path)
    p = res.out_dir / "item_embeddings.npy"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # inside the float payload: np.load would read it without complaint
    _rewrite(p, bytes(data))
    with pytest.raises(CorruptFileError, match="exp/item_embeddings.npy: sha256 mismatch \\(corrupted"):
        Recommender.from_export(res.out_dir)
    (res.out_dir / "users.parquet").unlink()
    with pytest.raises(CorruptFileError, match="users.parquet: missing"):
        E.verify_export(res.out_dir, ["users.parquet"])


def test_old_manifest_without_hashes_still_loads(tmp_path):
    res, *_ = _export(tmp_path)
    man = json.loads((res.out_dir / E.MANIFEST).read_text())
    del man["files"]
    (res.out_dir / E.MANIFEST).write_text(json.dumps(man))
    rec = Recommender.from_export(res.out_dir)
    assert rec.item_emb.shape[0] == res.manifest["counts"]["items"]


def test_truncated_manifest_is_named(tmp_path):
    res, *_ = _export(tmp_path)
    p = res.out_dir / E.MANIFEST
    p.write_text(p.read_text()[:50])
    with pytest.raises(CorruptFileError, match="exp/manifest.json: unreadable manifest"):
        Recommender.from_export(res.out_dir)


def test_reexport_does_not_reuse_a_corrupt_previous_export(tmp_path, caplog):
    res, model, built, cfg = _export(tmp_path)
    p = res.out_dir / "item_embeddings.npy"
    good = np.load(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    _rewrite(p, bytes(data))
    with caplog.at_level(logging.WARNING, logger="hllm.serving.export"):
        again = E.export_model(model, built, cfg, res.out_dir, progress=False)
    assert "item_embeddings.npy: sha256 mismatch" in caplog.text
    assert again.items_reused == 0 and again.items_encoded == len(good)
    np.testing.assert_array_equal(Recommender.from_export(res.out_dir).item_emb, good)


def test_a_corrupt_export_is_not_staged_for_registration(tmp_path):
    from hllm.serving.pyfunc import stage_artifacts

    res, *_ = _export(tmp_path)
    assert stage_artifacts(tmp_path / "ok", res.out_dir, None) == {"export": str(tmp_path / "ok" / "export")}
    p = res.out_dir / "user_embeddings.npy"
    _rewrite(p, p.read_bytes()[:-4])
    with pytest.raises(CorruptFileError, match="exp/user_embeddings.npy: sha256 mismatch"):
        stage_artifacts(tmp_path / "work", res.out_dir, None)
    assert not (tmp_path / "work" / "export").exists()
