"""Checkpoint integrity: hashes in meta.json, corrupt files refused by name, a full disk leaves the
previous checkpoint and ``latest`` intact, ``latest_checkpoint`` skips a corrupt newest checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from hllm import testing as T
from hllm.data.dataset import CorruptFileError, file_digest
from hllm.models.loading import LATEST, latest_checkpoint, load_model, read_meta, verify_checkpoint
from hllm.training import checkpoint as C
from hllm.training.trainer import train

RUN = "integrity"


def _cfg(tmp_path: Path, item_dir: Path, built_dir: Path, max_steps: int = 2):
    return T.tiny_config(
        tmp_path,
        item_dir,
        built_dir,
        **{
            "model.item.prompt": "",
            "train.run_name": RUN,
            "train.max_steps": max_steps,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 5,
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir, built_dir) -> Path:
    """One real 2-step run (step-000001, step-000002, latest, best); each test works on a copy."""
    root = tmp_path_factory.mktemp("ckpt_integrity")
    train(_cfg(root, tiny_bert_dir, built_dir), progress=False)
    return root


@pytest.fixture
def run(tmp_path, trained) -> Path:
    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path / "runs" / RUN


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def test_meta_records_sha256_and_size_of_every_file(run):
    ck = run / "checkpoints" / "step-000002"
    files = read_meta(ck)["files"]
    assert set(files) == {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng/rank-00000.pt",
    }
    for name, want in files.items():
        assert file_digest(ck / name) == want, name
    verify_checkpoint(ck)
    verify_checkpoint(run / "best", ["model.safetensors"])


@pytest.mark.parametrize(
    "damage,what", [(_truncate, "truncated or corrupted"), (_flip, "corrupted: the size is right")]
)
def test_corrupt_weights_are_refused_naming_the_file(run, damage, what):
    ck = run / "checkpoints" / "step-000002"
    damage(ck / "model.safetensors")
    with pytest.raises(CorruptFileError, match="step-000002/model.safetensors: sha256 mismatch") as e:
        load_model(ck)
    assert what in str(e.value)


def test_corrupt_optimizer_state_is_refused_on_resume_load(run):
    ck = run / "checkpoints" / "step-000002"
    model = load_model(ck)[0]
    opt = torch.optim.AdamW(model.parameters())
    _flip(ck / "optimizer.pt")
    with pytest.raises(CorruptFileError, match="step-000002/optimizer.pt: sha256 mismatch"):
        C.load_training_state(ck, model=model, optimizer=opt, scheduler=None, rank=0)
    (ck / "optimizer.pt").unlink()  # a recorded file that vanished is refused too
    with pytest.raises(CorruptFileError, match="optimizer.pt: missing"):
        C.load_training_state(ck, model=model, optimizer=opt, scheduler=None, rank=0)


def test_latest_checkpoint_skips_a_corrupt_newest_checkpoint_and_resume_works(
    run, tmp_path, tiny_bert_dir, built_dir, caplog
):
    ckroot = run / "checkpoints"
    assert (ckroot / LATEST).read_text().strip() == "step-000002"
    _truncate(ckroot / "step-000002" / "optimizer.pt")  # e.g. a crash mid-copy
    with caplog.at_level(logging.WARNING, logger="hllm.models.loading"):
        assert latest_checkpoint(run) == ckroot / "step-000001"
    assert "step-000002/optimizer.pt" in caplog.text
    assert latest_checkpoint(run, verify=False) == ckroot / "step-000002"
    res = train(_cfg(tmp_path, tiny_bert_dir, built_dir, max_steps=3), resume=True, progress=False)
    assert res.steps == 3 and read_meta(latest_checkpoint(run))["step"] == 3
    # every step checkpoint corrupt: refused, naming a file
    for p in ckroot.glob("step-*"):
        _flip(p / "model.safetensors")
    with pytest.raises(CorruptFileError, match="no valid checkpoint.*model.safetensors: sha256 mismatch"):
        latest_checkpoint(run)


def test_checkpoint_without_hashes_still_loads(run):
    ck = run / "checkpoints" / "step-000002"
    meta = json.loads((ck / "meta.json").read_text())
    del meta["files"]
    (ck / "meta.json").unlink()  # best/meta.json may be a hard link to it: do not write through
    (ck / "meta.json").write_text(json.dumps(meta))
    assert latest_checkpoint(run) == ck
    load_model(ck)


def test_truncated_meta_json_is_named(run):
    ck = run / "checkpoints" / "step-000002"
    text = (ck / "meta.json").read_text()
    (ck / "meta.json").unlink()
    (ck / "meta.json").write_text(text[:100])
    with pytest.raises(CorruptFileError, match="step-000002/meta.json: unreadable"):
        read_meta(ck)
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000001"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _intact(run: Path) -> None:
    ckroot = run / "checkpoints"
    assert not list(ckroot.glob(".tmp-*")) and not list(run.glob(".tmp-*"))
    assert (ckroot / LATEST).read_text().strip() == "step-000002"
    assert not (ckroot / "step-000003").exists()
    assert latest_checkpoint(run) == ckroot / "step-000002"
    verify_checkpoint(ckroot / "step-000002")
    load_model(ckroot / "step-000002")
    load_model(run / "best")


def test_disk_full_writing_weights_fails_clearly_and_keeps_the_previous_checkpoint(
    run, tmp_path, tiny_bert_dir, built_dir, monkeypatch
):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    with pytest.raises(C.CheckpointWriteError, match="step-000003: checkpoint not written.*No space left") as e:
        train(_cfg(tmp_path, tiny_bert_dir, built_dir, max_steps=3), resume=True, progress=False)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _intact(run)


def test_disk_full_writing_the_optimizer_state(run, tmp_path, tiny_bert_dir, built_dir, monkeypatch):
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"half")  # a partial file, then the disk is full
            _enospc()
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(C.CheckpointWriteError, match="step-000003: checkpoint not written"):
        train(_cfg(tmp_path, tiny_bert_dir, built_dir, max_steps=3), resume=True, progress=False)
    monkeypatch.undo()
    _intact(run)


def test_disk_full_publishing_best_keeps_the_old_best(run, monkeypatch):
    best = run / "best"
    before = (best / "model.safetensors").read_bytes()
    monkeypatch.setattr(C.os, "link", _enospc)
    monkeypatch.setattr(C.shutil, "copy2", _enospc)
    with pytest.raises(C.CheckpointWriteError, match="best: checkpoint not written"):
        C.publish_copy(run / "checkpoints" / "step-000001", best)
    monkeypatch.undo()
    assert not (run / ".tmp-best").exists() and not (run / ".old-best").exists()
    assert (best / "model.safetensors").read_bytes() == before
    load_model(best)


def test_disk_full_writing_the_pointer_keeps_it(run, monkeypatch):
    ckroot = run / "checkpoints"
    monkeypatch.setattr(C.os, "replace", _enospc)
    with pytest.raises(C.CheckpointWriteError, match="latest: pointer to step-000001 not written"):
        C.write_pointer(ckroot, ckroot / "step-000001")
    monkeypatch.undo()
    assert (ckroot / LATEST).read_text().strip() == "step-000002"
    assert not (ckroot / f".{LATEST}.tmp").exists()
