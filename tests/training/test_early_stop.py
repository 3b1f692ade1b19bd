"""Best checkpoint kept and early stopping with patience: a tiny SASRec run whose validation
metric is scripted (peak at epoch 2, then falling) so the expected best step is known."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import hllm.training.trainer
from hllm import testing as T
from hllm.models.loading import read_meta, step_dir_name
from hllm.training.trainer import TrainResult, Validation, train

SCRIPT = [0.10, 0.30, 0.20, 0.15, 0.12, 0.11, 0.10, 0.09]  # value of epoch 1, 2, ...; the peak is epoch 2


class ScriptedValidation:
    """Stands in for ``hllm.training.trainer.validate`` (the full-ranking evaluation is tested elsewhere):
    returns the next value of ``SCRIPT`` as the selection metric, higher is better."""

    def __init__(self, script: list[float] = SCRIPT):
        self.script = script
        self.calls = 0

    def __call__(self, model, built, cfg, info):
        value = self.script[self.calls]
        self.calls += 1
        return Validation({"ndcg@10": value, "recall@10": value}, "ndcg@10")


def _cfg(tmp_path, built_dir, **kw):
    sets = {
        "model.kind": "sasrec",
        "model.sasrec_dim": 8,
        "model.sasrec_layers": 1,
        "model.sasrec_heads": 1,
        "model.sasrec_dropout": 0.0,
        # one step per epoch (40 users -> 40 windows), so epoch k ends at step k
        "train.batch_size": 64,
        "train.max_steps": 0,
        "train.epochs": len(SCRIPT),
        "train.patience": 2,
        "train.checkpoint_every": 0,
        "train.keep_checkpoints": 2,
        "train.log_every": 100,
        "train.eval_every_epoch": True,
        "train.lr": 1e-2,
    }
    sets.update(kw)
    return T.tiny_config(tmp_path, tmp_path / "unused-item-model", built_dir, **sets)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_patience_stops_the_run_and_best_is_the_peak(tmp_path, built_dir, monkeypatch):
    val = ScriptedValidation()
    monkeypatch.setattr(hllm.training.trainer, "validate", val)
    cfg = _cfg(tmp_path, built_dir)
    res = train(cfg, progress=False)

    # peak at epoch 2, then two epochs without improvement (patience 2): stop after epoch 4 of 8
    assert val.calls == 4
    assert res.stopped_early and res.steps == 4
    assert res.best_step == 2 and res.best_value == pytest.approx(0.30) and res.select_metric == "ndcg@10"
    valid = [h for h in res.history if h.get("split") == "valid"]
    assert [h["value"] for h in valid] == pytest.approx(SCRIPT[:4])
    assert [h["improved"] for h in valid] == [True, True, False, False]

    # best/ is the step-2 checkpoint (weights and meta), not the last one
    best = res.run_dir / "best"
    assert res.best_checkpoint == best
    assert read_meta(best)["step"] == 2
    assert read_meta(best)["metrics"]["ndcg@10"] == pytest.approx(0.30)
    assert res.last_checkpoint.name == step_dir_name(4) and read_meta(res.last_checkpoint)["step"] == 4
    assert not _same(_weights(best), _weights(res.last_checkpoint))
    # keep_checkpoints=2 prunes old steps but never the best one
    ckpts = res.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == [step_dir_name(s) for s in (2, 3, 4)]
    assert _same(_weights(best), _weights(ckpts / step_dir_name(2)))

    # result.json says the same
    saved = TrainResult.load(res.run_dir)
    assert saved.stopped_early and saved.best_step == 2 and saved.steps == 4
    assert json.loads((res.run_dir / "history.json").read_text())[-1]["value"] == pytest.approx(SCRIPT[3])

    # resuming a run that stopped early trains no further and keeps the same best
    res2 = train(cfg, resume=True, progress=False)
    assert val.calls == 4
    assert res2.stopped_early and res2.steps == 4 and res2.best_step == 2
    assert _same(_weights(res2.best_checkpoint), _weights(ckpts / step_dir_name(2)))


def test_without_a_falling_metric_the_run_goes_to_the_end(tmp_path, built_dir, monkeypatch):
    """Control: patience larger than the fall never stops the run; best stays at the peak."""
    val = ScriptedValidation()
    monkeypatch.setattr(hllm.training.trainer, "validate", val)
    res = train(_cfg(tmp_path, built_dir, **{"train.patience": 10}), progress=False)
    assert val.calls == len(SCRIPT)
    assert not res.stopped_early and res.steps == len(SCRIPT)
    assert res.best_step == 2 and read_meta(res.run_dir / "best")["step"] == 2


class SlowScriptedValidation(ScriptedValidation):
    """The scripted values, each validation taking 0.25 s of wall clock: the budget below runs out
    after a few epochs whatever the machine's speed."""

    def __call__(self, model, built, cfg, info):
        import time

        time.sleep(0.25)
        return super().__call__(model, built, cfg, info)


def test_time_budget_stops_the_run_validates_and_keeps_the_best(tmp_path, built_dir, monkeypatch):
    planned = 400
    monkeypatch.setattr(hllm.training.trainer, "validate", SlowScriptedValidation([0.1, 0.3] + [0.2] * planned))
    cfg = _cfg(tmp_path, built_dir, **{"train.epochs": planned, "train.patience": planned,
                                        "train.time_budget_s": 1.5})  # fmt: skip
    res = train(cfg, progress=False)

    assert res.stopped_by_budget and not res.stopped_early
    assert 2 < res.steps < planned  # cut by the budget, after the peak
    valid = [h for h in res.history if h.get("split") == "valid"]
    assert valid[-1]["step"] == res.steps  # the step the budget cut at was validated...
    assert (res.run_dir / "checkpoints" / step_dir_name(res.steps) / "meta.json").is_file()  # ...and saved
    assert res.best_step == 2 and res.best_value == pytest.approx(0.30)
    assert res.best_checkpoint is not None and read_meta(res.best_checkpoint)["step"] == 2  # best/ is the peak
    saved = json.loads((res.run_dir / "result.json").read_text())
    assert saved["stopped_by_budget"] is True and TrainResult.load(res.run_dir).stopped_by_budget

    # no budget: the same run goes to its planned end
    cfg2 = _cfg(tmp_path / "b", built_dir, **{"train.epochs": 3, "train.patience": 10})
    monkeypatch.setattr(hllm.training.trainer, "validate", ScriptedValidation([0.1, 0.2, 0.3]))
    res2 = train(cfg2, progress=False)
    assert not res2.stopped_by_budget and res2.steps == 3
