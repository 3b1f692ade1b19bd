"""The training loop: loss falls, resume == uninterrupted, checkpoints, load_model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hllm import testing as T
from hllm.models import register
from hllm.models.base import LossOutput, SeqRecModel
from hllm.models.loading import latest_checkpoint, load_model, read_meta
from hllm.training.trainer import TrainResult, train
from tests.helpers.trainkit import crash_at


class Recorder:
    """A MetricLogger that keeps every row."""

    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def series(self, key):
        return [m[key] for _, m in self.rows if key in m]


def cfg_for(tmp_path, item_dir, built_dir, **kw):
    return T.tiny_config(tmp_path, item_dir, built_dir, **{"model.item.prompt": "", **kw})


@pytest.mark.slow
def test_training_loss_falls_on_the_embedded_synthetic_shop(tmp_path, tiny_bert_dir):
    """The default dataset (``hllm data synth``, scaled down) through the real build, tiny item model."""
    from hllm.data.build import build_dataset
    from hllm.data.synth import synthesize

    rec = Recorder()
    cfg = cfg_for(
        tmp_path,
        tiny_bert_dir,
        tmp_path / "built",
        **{
            "paths.raw_dir": str(tmp_path / "raw"),
            "synth.n_users": 150,
            "synth.n_items": 200,
            "model.item.max_text_len": 16,
            "train.max_steps": 40,
            "train.epochs": 10,
            "train.lr": 3e-3,
            "train.batch_size": 8,
            "train.num_negatives": 16,
            "train.log_every": 10,
            "train.checkpoint_every": 0,
            "train.eval_every_epoch": False,
        },
    )
    synthesize(cfg, cfg.paths.raw_dir)
    build_dataset(cfg, tokenize=False, require_validation=False)
    res = train(cfg, logger=rec, progress=False)
    losses = rec.series("train/loss")  # each the mean over 10 steps
    assert len(losses) == 4
    assert losses[-1] < 0.9 * losses[0], losses
    assert rec.series("train/top5_acc")[-1] > rec.series("train/top5_acc")[0]
    # per-step logs carry the objective's statistics and throughput
    keys = set(rec.rows[-1][1])
    assert {
        "train/loss",
        "train/scale",
        "train/negatives",
        "train/top1_acc",
        "train/top10_acc",
        "train/lr",
        "train/items_per_s",
        "train/item_tokens_per_s",
        "train/distinct_ratio",
    } <= keys
    assert res.steps == 40 and res.best_checkpoint == res.run_dir / "best"


@pytest.mark.slow
def test_killed_then_resumed_run_ends_with_the_same_weights(tmp_path, tmp_path_factory, built_dir, monkeypatch):
    # dropout on, so resuming must restore the RNG streams too
    item_dir = T.tiny_bert(tmp_path_factory.mktemp("bert_dropout"), dropout=0.1)
    common = {"train.max_steps": 8, "train.checkpoint_every": 3, "train.log_every": 1, "train.epochs": 3}
    full = train(cfg_for(tmp_path, item_dir, built_dir, **common, **{"train.run_name": "full"}), progress=False)

    cfg = cfg_for(tmp_path, item_dir, built_dir, **common, **{"train.run_name": "killed"})
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        crash_at(m, 5)
        train(cfg, logger=Recorder(), progress=False)
    run = tmp_path / "runs" / "killed"
    assert read_meta(latest_checkpoint(run))["step"] == 3
    # a save interrupted half-way leaves only a temp folder, which resume ignores
    (run / "checkpoints" / ".tmp-step-000006").mkdir()
    rec = Recorder()
    resumed = train(cfg, resume=True, logger=rec, progress=False)
    assert [s for s, m in rec.rows if "train/loss" in m][0] == 4  # continued, not restarted
    assert resumed.steps == full.steps == 8
    a = load_file(str(full.last_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_folder_is_never_overwritten_without_resume(tmp_path, tiny_bert_dir, built_dir):
    cfg = cfg_for(
        tmp_path,
        tiny_bert_dir,
        built_dir,
        **{"train.max_steps": 2, "train.checkpoint_every": 1, "train.keep_checkpoints": 1},
    )
    res = train(cfg, progress=False)
    ckpts = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000002"]  # older step checkpoints pruned
    before = (res.last_checkpoint / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, progress=False)
    # a bad selection metric fails before any training step
    bad = cfg_for(
        tmp_path, tiny_bert_dir, built_dir, **{"train.run_name": "bad", "eval.protocol.select_metric": "ndcg@7"}
    )
    with pytest.raises(ValueError, match="select_metric"):
        train(bad, progress=False)
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()
    assert (res.last_checkpoint / "model.safetensors").read_bytes() == before
    # checkpoint contents and the result file
    names = {p.name for p in res.last_checkpoint.iterdir()}
    assert {"model.safetensors", "meta.json", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng"} <= names
    meta = read_meta(res.last_checkpoint)
    assert meta["step"] == 2 and meta["kind"] == "hllm" and meta["config"]["train"]["max_steps"] == 2
    assert meta["content_hash"] and meta["world_size"] == 1
    # a checkpoint written before the vocabulary was unified (key "data_version") still loads
    old = tmp_path / "old-ckpt"
    old.mkdir()
    raw = json.loads((res.last_checkpoint / "meta.json").read_text())
    raw["data_version"] = raw.pop("content_hash")
    (old / "meta.json").write_text(json.dumps(raw))
    assert read_meta(old)["content_hash"] == meta["content_hash"] and "data_version" not in read_meta(old)
    loaded = TrainResult.load(res.run_dir)
    assert loaded.last_checkpoint == res.last_checkpoint and loaded.best_checkpoint == res.run_dir / "best"
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert hist[-1]["split"] == "valid" and hist[-1]["select_metric"] == "ndcg@10"


def test_load_model_rebuilds_the_trained_model_from_the_checkpoint_alone(tmp_path, tiny_bert_dir, built_dir):
    cfg = cfg_for(tmp_path, tiny_bert_dir, built_dir, **{"train.max_steps": 2})
    res = train(cfg, progress=False)
    model, cfg2, built = load_model(res.best_checkpoint)
    assert cfg2.model.item.from_scratch is False  # the saved config, not the rebuild trick
    weights = load_file(str(res.best_checkpoint / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with torch.no_grad():
        e = model.item_embeddings(torch.arange(built.n_items))
    assert e.shape == (built.n_items, 32) and torch.all(e[0] == 0) and torch.isfinite(e).all()
    assert not model.training


class _Constant(SeqRecModel):
    """A model with no trainable parameters (like popularity)."""

    def __init__(self, n_items):
        super().__init__()
        self.register_buffer("table", torch.randn(n_items, 4))

    def train_loss(self, windows, negatives):
        return LossOutput(loss=torch.zeros(()))

    def item_embeddings(self, idx):
        return self.table[idx]

    def user_embeddings(self, history_emb, mask):
        return history_emb[:, -1]


def test_model_without_parameters_skips_optimisation_and_saves_a_checkpoint(tmp_path, tiny_bert_dir, built_dir):
    register("constant-test", lambda cfg, built, tokens: _Constant(built.n_items))
    cfg = cfg_for(tmp_path, tiny_bert_dir, built_dir, **{"model.kind": "constant-test"})
    res = train(cfg, progress=False)
    assert res.steps == 0
    assert (res.last_checkpoint / "model.safetensors").exists()
    assert not (res.last_checkpoint / "optimizer.pt").exists()
    assert res.history and res.history[0]["split"] == "valid"
    model, _, _ = load_model(res.best_checkpoint)
    assert isinstance(model, _Constant)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_llama_dir, built_dir):
    """batch 4 x 2 micro-steps == batch 8: the same windows and the same negative pool per step
    (every micro-step re-encodes the step's pool), and the loss is normalised over the whole step."""
    common = {"train.max_steps": 3, "train.checkpoint_every": 0, "train.num_negatives": 16}
    big = train(
        cfg_for(tmp_path, tiny_llama_dir, built_dir, **common, **{"train.batch_size": 8, "train.run_name": "big"}),
        progress=False,
    )
    acc = train(
        cfg_for(
            tmp_path,
            tiny_llama_dir,
            built_dir,
            **common,
            **{"train.batch_size": 4, "train.grad_accum": 2, "train.run_name": "acc"},
        ),
        progress=False,
    )
    a = load_file(str(big.last_checkpoint / "model.safetensors"))
    b = load_file(str(acc.last_checkpoint / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_final_validation_leaves_the_item_table_for_evaluate_and_export(tmp_path, tiny_bert_dir, built_dir):
    """The last validation encoded every item with the weights it saved: `hllm evaluate` and
    `hllm export` of that checkpoint read the table instead of running the Item LLM again."""
    from hllm.evaluation.evaluate import evaluate_checkpoint
    from hllm.evaluation.item_cache import item_cache_dir
    from hllm.models.item_llm import ItemLLM
    from hllm.serving.export import export

    cfg = cfg_for(tmp_path, tiny_bert_dir, built_dir, **{"train.max_steps": 2, "train.checkpoint_every": 0})
    res = train(cfg, progress=False)
    assert len(list(item_cache_dir(cfg).glob("*.npy"))) == 1
    encoded = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: encoded.append(len(args[0])) if isinstance(mod, ItemLLM) else None
    )
    try:
        valid = evaluate_checkpoint(res.best_checkpoint, cfg, ("valid",), progress=False)["valid"]
        exp = export(res.best_checkpoint, tmp_path / "exp", cfg, progress=False)
    finally:
        handle.remove()
    assert encoded == [] and exp.items_encoded == 0
    assert valid.metrics[res.select_metric] == res.best_value  # the same table, the same numbers
