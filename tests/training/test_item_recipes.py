"""Cheap item-tower recipes in the training loop: each trains and resumes bit-identically, the item table is
refreshed on its schedule, the frozen stage ends where ``train.frozen_share`` says, and two gloo processes
(DDP, FSDP2) equal one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hllm import testing as T
from hllm.models.hllm import HLLM
from hllm.models.loading import latest_checkpoint, load_model, read_meta
from hllm.training.trainer import train
from tests.helpers.trainkit import crash_at

RECIPES = {
    "frozen-full": {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
                    "train.hllm_loss": "full"},
    "top-bank": {"model.item.tune": "top", "model.item.tune_layers": 1, "train.hllm_loss": "bank",
                 "train.item_table_refresh": 2},
    "lora-full": {"model.item.tune": "lora", "model.item.lora_r": 2, "model.item.adaptor": "mlp",
                  "train.hllm_loss": "full", "train.item_table_refresh": 2},
    "staged-top": {"model.item.tune": "top", "train.frozen_share": 0.5, "train.hllm_loss": "bank",
                   "train.item_table_refresh": 2, "model.item.pooling": "mean", "model.item.adaptor": "linear"},
    "delta-cold": {"model.item.tune": "frozen", "model.item.pooling": "mean", "model.item.adaptor": "linear",
                   "train.hllm_loss": "full", "model.item.id_delta": True, "model.item.id_delta_dropout": 0.5,
                   "model.item.cold_delta": True, "model.repeat_score": True},
}  # fmt: skip


def cfg_for(tmp_path, item_dir, built_dir, recipe, **kw):
    sets = {"model.item.prompt": "", "train.max_steps": 8, "train.checkpoint_every": 3, "train.log_every": 1,
            "train.epochs": 3, "train.eval_every_epoch": False, **RECIPES[recipe], **kw}  # fmt: skip
    return T.tiny_config(tmp_path, item_dir, built_dir, **sets)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_and_resumes_bit_identically(tmp_path, tmp_path_factory, built_dir, recipe, monkeypatch):
    item_dir = T.tiny_bert(tmp_path_factory.mktemp("bert_dropout"), dropout=0.1)  # resume must restore RNG too
    refreshes: list[int] = []
    real = HLLM.refresh_table

    def spy(self, step, progress=False):
        refreshes.append(step)
        return real(self, step, progress)

    monkeypatch.setattr(HLLM, "refresh_table", spy)
    full = train(cfg_for(tmp_path, item_dir, built_dir, recipe, **{"train.run_name": "full"}), progress=False)
    planned = list(refreshes)
    cfg = cfg_for(tmp_path, item_dir, built_dir, recipe, **{"train.run_name": "killed"})
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        crash_at(m, 5)
        train(cfg, progress=False)
    assert read_meta(latest_checkpoint(tmp_path / "runs" / "killed"))["step"] == 3
    refreshes.clear()
    resumed = train(cfg, resume=True, progress=False)
    # the resumed run refreshes exactly where the uninterrupted one did after step 3 (the table is restored)
    assert refreshes == [s for s in planned if s > 3]
    assert resumed.steps == full.steps == 8
    a = load_file(str(full.last_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and "item_table" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the saved model rebuilds from the checkpoint alone, table and stage included
    model, _, built = load_model(resumed.last_checkpoint)
    assert isinstance(model, HLLM) and torch.equal(model.item_table, a["item_table"])
    assert model.item_frozen == (RECIPES[recipe]["model.item.tune"] == "frozen")
    assert ("cold_delta" in a) == bool(RECIPES[recipe].get("model.item.cold_delta"))
    with torch.no_grad():
        e = model.item_embeddings(torch.arange(built.n_items))
    assert torch.isfinite(e).all() and torch.all(e[0] == 0)


def test_item_table_refresh_schedule(tmp_path, tiny_bert_dir, built_dir, monkeypatch):
    refreshes: list[int] = []
    monkeypatch.setattr(HLLM, "refresh_table", lambda self, step, progress=False: refreshes.append(step) or
                        self.table_step.fill_(step))  # fmt: skip
    common = {"train.max_steps": 7, "train.checkpoint_every": 0}

    def run(name, recipe, **kw):
        refreshes.clear()
        sets = {**common, **kw, "train.run_name": name}
        return train(cfg_for(tmp_path, tiny_bert_dir, built_dir, recipe, **sets), progress=False)

    run("every2", "top-bank")
    assert refreshes == [0, 2, 4, 6]
    res = run("epoch", "top-bank", **{"train.item_table_refresh": 0, "train.batch_size": 16})
    spe = json.loads((res.run_dir / "history.json").read_text())[0]["metrics"]["train/epoch"]  # after step 1
    steps_per_epoch = round(1 / spe)
    assert steps_per_epoch > 1 and steps_per_epoch < 7 and refreshes == list(range(0, 7, steps_per_epoch))
    run("frozen", "frozen-full")
    assert refreshes == [0]  # a frozen Item LLM: encoded once
    run("staged", "staged-top", **{"train.max_steps": 8})
    assert refreshes == [0, 4, 6]  # frozen for steps 0-3 (0.5 x 8): no refresh until the Item LLM trains


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_for_the_table_recipes(tmp_path, tiny_llama_dir, built_dir):
    """Table rows, the bank's gathered ids, the full softmax, the staged switch (with unused parameters during the
    frozen stage) and the delta dropout (rank 0's draw on every rank) under DDP and FSDP2 equal one process with
    the doubled batch."""
    from tests.training.test_distributed import _assert_same_weights, _worker

    def base(batch):
        return T.tiny_config(tmp_path, tiny_llama_dir, built_dir, **{
            "model.item.prompt": "", "train.max_steps": 4, "train.batch_size": batch, "train.num_negatives": 16,
            "train.log_every": 1, "train.checkpoint_every": 0, "model.item.tune": "lora", "model.item.lora_r": 2,
            "train.hllm_loss": "bank", "train.frozen_share": 0.5, "model.item.adaptor": "linear",
            "train.item_table_refresh": 1, "model.item.id_delta": True, "model.item.id_delta_dropout": 0.5,
            "model.item.cold_delta": True})  # fmt: skip

    single = train(base(8), progress=False)
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "rdzv"), base(4).to_dict()), nprocs=2, join=True)
    for name in ("ddp", "fsdp"):
        _assert_same_weights(single.last_checkpoint, tmp_path / "runs" / name / "checkpoints" / "step-000004")
