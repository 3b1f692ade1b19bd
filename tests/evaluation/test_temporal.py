"""The temporal protocol through evaluation: exact ranks and slices on hand-made data (an ID model gets
nothing for an item first seen after the cutoff, a content model scores it), the protocol block and
split info in metrics.json, and a real build -> train -> evaluate run under the split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hllm.config import ConfigError, ProtocolConfig, protocol_hash
from hllm.evaluation import metrics as M
from hllm.evaluation.evaluate import check_same_training_part, evaluate
from hllm.evaluation.results import EvalResult
from tests.data.test_temporal_split import SEQS, TIMES
from tests.helpers.evalkit import TableModel, make_built, small_cfg


def _temporal_cfg():
    cfg = small_cfg(ks=(1, 2))
    p = cfg.eval.protocol
    p.split, p.cutoff_unit, p.valid_cutoff, p.test_cutoff = "temporal", "timestamp", 30.0, 40.0
    p.mask_history = False
    cfg.eval.slices.head_share, cfg.eval.slices.short_history = 1 / 3, 2
    return cfg


@pytest.mark.parametrize("id_model", [False, True])
def test_temporal_ranks_and_slices_by_hand(tmp_path, id_model):
    """Test users 0, 1, 5 with targets 5 (new: first seen after the cutoff), 1 (tail), 2 (head); the user
    embedding is the last history item's row: 4, 3, 4. Item 5 is item 4's twin, so a content model ranks
    it right behind 4 (pessimistic tie: rank 1). Candidates of an ID model are the items seen in training
    (1, 2, 3), its new-item target is a miss."""
    table = np.eye(9, dtype=np.float32)
    table[5] = table[4]
    built = make_built(tmp_path / "b", SEQS, 9, timestamps=TIMES)
    cfg = _temporal_cfg()
    res = evaluate(TableModel(table, id_model=id_model), built, cfg, "test", progress=False)
    assert res.users.tolist() == [0, 1, 5]
    if id_model:
        # u1: 3 scores 1, 1 and 2 score 0 -> 2 candidates at or above -> rank 2; u5 the same (4 is no candidate)
        assert res.per_user["rank"].tolist() == [M.MASKED, 2, 2]
    else:
        # u1: target 1 scores 0 like 6 other items, 3 scores 1 -> rank 7; u5: 4 and 5 score 1, 2 ties 5 more
        assert res.per_user["rank"].tolist() == [1, 7, 7]
    new = res.slices["new_items"]
    assert new == {"n": 1.0, "recall@1": 0.0, "recall@2": 0.0 if id_model else 1.0,
                   "ndcg@1": 0.0, "ndcg@2": 0.0 if id_model else pytest.approx(1 / np.log2(3))}  # fmt: skip
    assert res.slices["head_items"]["n"] == 1.0 and res.slices["tail_items"]["n"] == 1.0
    assert res.slices["short_history"]["n"] == 2.0 and res.slices["long_history"]["n"] == 1.0
    assert res.metrics["recall@2"] == pytest.approx(0.0 if id_model else 1 / 3)
    # what metrics.json says: the temporal protocol, its hash, the resolved cutoffs and who was left out
    saved = json.loads((res.save(tmp_path / "out") / "metrics.json").read_text())
    assert saved["protocol"]["split"] == "temporal" and saved["protocol"]["test_cutoff"] == 40.0
    assert saved["protocol_hash"] == protocol_hash(cfg.eval.protocol) != protocol_hash(ProtocolConfig())
    assert saved["split_info"] == {"split": "temporal", "valid_cutoff_time": 30.0, "test_cutoff_time": 40.0,
                                   "train_interactions": 7, "valid_users_without_history": 0,
                                   "test_users_without_history": 2}  # fmt: skip
    back = EvalResult.load(tmp_path / "out")
    assert back.slices == res.slices and back.split_info == res.split_info
    va = evaluate(TableModel(table, id_model=id_model), built, cfg, "valid", progress=False)
    assert va.users.tolist() == [0, 1, 5] and va.slices["new_items"]["n"] == 2.0  # targets 4, 3, 4


def test_evaluating_under_another_training_part_is_refused():
    loo, t = ProtocolConfig(), ProtocolConfig(split="temporal")
    check_same_training_part(loo, ProtocolConfig(ks=[1, 2], select_metric="ndcg@2"), "ckpt")  # same split: fine
    check_same_training_part(t, ProtocolConfig(split="temporal", test_cutoff=0.95), "ckpt")  # same training part
    with pytest.raises(ConfigError, match="trained with eval.protocol.split=leave_one_out, evaluated with split="
                       "temporal"):  # fmt: skip
        check_same_training_part(loo, t, "ckpt")
    with pytest.raises(ConfigError, match="valid_cutoff=0.8 quantile.*valid_cutoff=0.7 quantile"):
        check_same_training_part(t, ProtocolConfig(split="temporal", valid_cutoff=0.7), "ckpt")


def test_build_train_evaluate_under_the_temporal_split(tmp_path):
    """The tiny synthetic shop built, trained (SASRec for a few steps, popularity) and evaluated under
    the temporal split: training windows come from the training part only, the ID model gets nothing
    for new items, popularity counts only the past, and metrics.json carries the split."""
    from hllm.data.build import build_dataset
    from hllm.data.dataset import eval_split, load_built, train_sequences, training_windows
    from hllm.data.synth import synthesize
    from hllm.evaluation.evaluate import evaluate_checkpoint
    from hllm.training.setup import build_setup
    from hllm.training.trainer import train
    from tests.helpers.datakit import make_cfg

    sets = ["synth.n_users=200", "synth.n_items=150", "synth.min_seq_len=6", "synth.max_seq_len=12",
            "synth.new_item_share=0.2", "build.require_validation=false", "build.tokenize=false",
            "build.max_seq_len=4", "eval.protocol.max_history=4", "eval.protocol.split=temporal",
            "eval.protocol.valid_cutoff=0.5", "eval.protocol.test_cutoff=0.7",
            f"paths.runs_dir={tmp_path / 'runs'}", "tracking.enabled=false", "train.device=cpu",
            "train.max_steps=3", "train.batch_size=8", "train.num_negatives=8", "train.checkpoint_every=0",
            "train.time_budget_s=0", "model.sasrec_dim=8", "model.sasrec_heads=1", "model.sasrec_layers=1"]  # fmt: skip
    cfg = make_cfg(tmp_path, *sets)
    synthesize(cfg)
    build_dataset(cfg)
    built = load_built(cfg.paths.built_dir)
    ts = built.timestamps
    assert ts is not None
    plan = built.split_plan(cfg.eval.protocol)
    tv, tt = np.quantile(ts, 0.5), np.quantile(ts, 0.7)
    assert (plan.info["valid_cutoff_time"], plan.info["test_cutoff_time"]) == (tv, tt)
    assert plan.info["train_interactions"] == int((ts <= tv).sum())
    part = train_sequences(built.sequences, plan)
    assert built.stats["split"]["train_windows"] == len(training_windows(part, 4, cfg.build.window_mode))
    # what training trains on is that part: every window item is an interaction at or before the cutoff
    from hllm.distributed import DistInfo

    cfg.model.kind = "sasrec"
    setup = build_setup(cfg, DistInfo())
    seen_before = np.zeros(built.n_items, dtype=bool)
    seen_before[built.sequences.items[ts <= tv]] = True
    assert np.array_equal(np.asarray(setup.windows), training_windows(part, 4, cfg.build.window_mode))
    counts_all = np.bincount(part.items, minlength=built.n_items)
    te = eval_split(built.sequences, "test", 4, plan)
    new = counts_all[te.targets] == 0
    assert new.any() and not seen_before[te.targets[new]].any()  # new items: first interaction after tv
    results = {}
    for kind in ("sasrec", "pop"):
        cfg.model.kind, cfg.train.run_name = kind, kind
        r = train(cfg, progress=False)
        results[kind] = evaluate_checkpoint(r.best_checkpoint or r.last_checkpoint, cfg, ("test",), progress=False)
        res = results[kind]["test"]
        assert res.protocol["split"] == "temporal" and res.split_info == plan.info
        assert res.users.tolist() == te.users.tolist()
        assert res.slices["new_items"]["n"] == float(new.sum())
        assert res.slices["new_items"]["recall@10"] == 0.0  # ID model: by rule; popularity: count 0, ranked last
    from hllm.models.loading import load_model

    pop_model, _, _ = load_model(results["pop"]["test"].checkpoint)
    assert pop_model.counts.numpy().astype(int).tolist() == [0, *counts_all[1:].tolist()]
    # `hllm evaluate` says where the cutoffs fell and how the cold-start slice did
    from typer.testing import CliRunner

    from hllm.cli import app
    from hllm.config import save_config

    save_config(cfg, tmp_path / "params.yaml")
    ckpt = results["pop"]["test"].checkpoint
    out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--split", "test",
                                   "--params", str(tmp_path / "params.yaml")])  # fmt: skip
    assert out.exit_code == 0, out.output
    info = plan.info
    assert (
        f"temporal split: cutoffs valid {info['valid_cutoff_time']:.0f} / test {info['test_cutoff_time']:.0f} "
        f"(epoch s); {info['train_interactions']:,} training interactions" in out.stdout
    )
    assert f"test: {int(new.sum())} new-item targets (never in training), recall@10 0.00%" in out.stdout
    # and a checkpoint trained leave-one-out is refused under the temporal split, naming both
    cfg.eval.protocol.split = "leave_one_out"
    save_config(cfg, tmp_path / "loo.yaml")
    out = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--params", str(tmp_path / "loo.yaml")])
    assert out.exit_code != 0 and "trained with eval.protocol.split=temporal" in out.output
