"""A night killed while it trained: the next night finds its checkpoint, adopts it and trains on to
the same weights an uninterrupted run reaches; anything that differs (data, settings) starts over."""

from __future__ import annotations

import copy
import json
import shutil

import torch
from safetensors.torch import load_file

from hllm import testing
from hllm.models import loading
from hllm.training import resume
from hllm.training.trainer import train

DEAD = "nightly-20261201-020000-aaaaaaaa-hllm"
NEXT = "nightly-20261202-020000-bbbbbbbb-hllm"


def _crashed_run(tmp_path, tiny_bert_dir, built_dir):
    """A full 4-step run, then made to look killed after step 3: no result.json, newest checkpoint step 2."""
    cfg = testing.tiny_config(tmp_path, tiny_bert_dir, built_dir, **{
        "train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 5,
        "train.run_name": DEAD})  # fmt: skip
    full = train(cfg, progress=False)
    run = full.run_dir
    final = load_file(str(full.last_checkpoint / "model.safetensors"))
    (run / "result.json").unlink()
    shutil.rmtree(run / "checkpoints" / loading.step_dir_name(4))
    (run / "checkpoints" / "latest").write_text(loading.step_dir_name(2) + "\n")
    nxt = copy.deepcopy(cfg)
    nxt.train.run_name = NEXT
    return cfg, nxt, final


def test_the_next_night_trains_on_from_a_crashed_nights_checkpoint(tmp_path, tiny_bert_dir, built_dir):
    from hllm.data.versioning import content_hash

    _, cfg, final = _crashed_run(tmp_path, tiny_bert_dir, built_dir)
    h = content_hash(cfg.paths.built_dir)
    ckpt = resume.find_crashed(cfg, h)
    assert ckpt is not None and ckpt.name == loading.step_dir_name(2) and ckpt.parent.parent.name == DEAD
    run = resume.adopt(ckpt, cfg)
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    res = train(cfg, resume=True, progress=False)
    assert res.steps == 4
    resumed = load_file(str(res.last_checkpoint / "model.safetensors"))
    assert resumed.keys() == final.keys()
    for k in final:  # bit-identical to the run that was never interrupted
        assert torch.equal(resumed[k], final[k]), k
    # the crashed folder is left whole (retention removes it later); a finished night is never resumed
    assert (tmp_path / "runs" / DEAD / "checkpoints" / ckpt.name / "model.safetensors").exists()
    other = copy.deepcopy(cfg)
    other.train.run_name = "nightly-20261203-020000-cccccccc-hllm"
    found = resume.find_crashed(other, h)
    assert found is not None and found.parent.parent.name == DEAD  # NEXT finished: only DEAD is unfinished
    (tmp_path / "runs" / DEAD / "result.json").write_text(json.dumps({}))
    assert resume.find_crashed(other, h) is None


def test_other_data_or_settings_train_from_scratch(tmp_path, tiny_bert_dir, built_dir, caplog):
    from hllm.data.versioning import content_hash

    dead_cfg, cfg, _ = _crashed_run(tmp_path, tiny_bert_dir, built_dir)
    h = content_hash(cfg.paths.built_dir)
    meta = loading.read_meta(tmp_path / "runs" / DEAD / "checkpoints" / loading.step_dir_name(2))
    assert resume.mismatch(meta, cfg, h) is None
    assert "trained on data" in (resume.mismatch(meta, cfg, "0" * 16) or "")
    lr = copy.deepcopy(cfg)
    lr.train.lr = cfg.train.lr * 2
    assert resume.mismatch(meta, lr, h) == "different `train` settings (lr)"
    proto = copy.deepcopy(cfg)
    proto.eval.protocol.max_history += 1
    assert resume.mismatch(meta, proto, h) == "different `eval.protocol` settings (max_history)"
    with caplog.at_level("INFO", "hllm.training.resume"):
        assert resume.find_crashed(lr, h) is None
    assert f"not resuming {DEAD}: different `train` settings (lr)" in caplog.text
    sasrec = copy.deepcopy(cfg)
    sasrec.model.kind = "sasrec"
    sasrec.train.run_name = NEXT.replace("-hllm", "-sasrec")
    assert resume.find_crashed(sasrec, h) is None  # another model's folder is never looked at
