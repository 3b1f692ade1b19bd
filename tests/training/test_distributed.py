"""Two gloo processes == one process with the same global batch and negative pool.

The processes are spawned inside the test (``torch.multiprocessing.spawn`` with
a ``file://`` rendezvous), each calling the real ``hllm.training.trainer.train``: first
with DDP, then with FSDP2 (``fully_shard``). Tolerance: the final weights agree
within 1e-5 absolute (+1e-4 relative) and every logged step loss within 1e-5
relative: the only difference is the order of floating-point reductions.

The Item LLM here is the tiny Llama: a BERT's attention key biases have an
exactly-zero true gradient (softmax ignores a shift shared by all keys), so
they receive pure rounding noise that Adam rescales into full-size steps, and
those coordinates differ between any two reduction orders, by design of Adam.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hllm import testing as T

STEPS = 4
ATOL, RTOL = 1e-5, 1e-4


def _worker(rank: int, world: int, init_file: str, cfg_dict: dict) -> None:
    import torch.distributed as dist

    from hllm.config import config_from_dict
    from hllm.training.trainer import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = config_from_dict(cfg_dict)
        cfg.train.run_name = "ddp"
        train(cfg, progress=False)
        cfg.train.run_name, cfg.train.fsdp = "fsdp", True
        train(cfg, progress=False)
        # resuming a sharded run: full weights + optimizer state loaded into the shards
        cfg.train.max_steps = STEPS + 2
        train(cfg, resume=True, progress=False)
    finally:
        dist.destroy_process_group()


def _losses(run_dir: Path) -> list[float]:
    hist = json.loads((run_dir / "history.json").read_text())
    return [h["metrics"]["train/loss"] for h in hist if h["split"] == "train"]


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)


def _base_cfg(tmp_path, item_dir, built_dir, batch: int):
    return T.tiny_config(
        tmp_path,
        item_dir,
        built_dir,
        **{
            "model.item.prompt": "",
            "train.max_steps": STEPS,
            "train.batch_size": batch,
            "train.num_negatives": 16,
            "train.log_every": 1,
            "train.checkpoint_every": 0,
        },
    )


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, tiny_llama_dir, built_dir):
    from hllm.training.trainer import train

    single = train(_base_cfg(tmp_path, tiny_llama_dir, built_dir, batch=8), progress=False)
    # start from the same weights: every process seeds identically before building the model
    cfg2 = _base_cfg(tmp_path, tiny_llama_dir, built_dir, batch=4)
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "rdzv"), cfg2.to_dict()), nprocs=2, join=True)
    runs = tmp_path / "runs"
    for name in ("ddp", "fsdp"):
        meta = json.loads((runs / name / "checkpoints" / "step-000004" / "meta.json").read_text())
        assert meta["world_size"] == 2 and meta["fsdp"] == (name == "fsdp")
        assert _losses(runs / name)[:STEPS] == pytest.approx(_losses(single.run_dir), rel=1e-5)
        _assert_same_weights(single.last_checkpoint, runs / name / "checkpoints" / "step-000004")
    # each run also validated with the (sharded) evaluation and kept a best checkpoint
    assert (runs / "fsdp" / "best" / "model.safetensors").exists()
    resumed = json.loads((runs / "fsdp" / "checkpoints" / f"step-{STEPS + 2:06d}" / "meta.json").read_text())
    assert resumed["step"] == STEPS + 2 and resumed["fsdp"]
    history = json.loads((runs / "fsdp" / "history.json").read_text())
    assert [h["step"] for h in history if h["split"] == "train"][-2:] == [STEPS + 1, STEPS + 2]


@pytest.mark.slow
def test_cli_launches_torchrun_with_two_processes(tmp_path, tiny_bert_dir, built_dir):
    cfg = _base_cfg(tmp_path, tiny_bert_dir, built_dir, batch=4)
    cfg.train.max_steps = 2
    params = tmp_path / "params.yaml"
    from hllm.config import save_config

    save_config(cfg, params)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hllm = str(Path(sys.executable).parent / "hllm")
    proc = subprocess.run(
        [hllm, "train", "--params", str(params), "--nproc", "2", "--set", "train.run_name=cli2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run" in proc.stderr and "steps: 2" in proc.stdout
    meta = json.loads((tmp_path / "runs" / "cli2" / "checkpoints" / "step-000002" / "meta.json").read_text())
    assert meta["world_size"] == 2
