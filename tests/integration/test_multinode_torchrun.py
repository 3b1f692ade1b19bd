"""infra/README.md's two-machine `torchrun` command, run as two agents on loopback (gloo on CPU).

Two torchrun processes with `--nnodes 2 --node-rank 0/1` rendezvous through the master's address
and port exactly as two machines would; the job must train as one world of two ranks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[list[str]]:
    """The `torchrun ...` commands of infra/README.md's "Training across machines" block."""
    text = (REPO / "infra" / "README.md").read_text()
    section = text[text.index("## Training across machines") :]
    block = section[section.index("```bash") + 7 : section.index("```", section.index("```bash") + 7)]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line.split("#")[0]) for line in joined.splitlines() if line.startswith("torchrun ")]


def test_two_machine_torchrun_from_the_readme_trains_one_world(tmp_path):
    from hllm.testing import synthetic_lists, tiny_bert, tiny_config, write_built

    commands = readme_commands()
    assert len(commands) == 2
    items, seqs = synthetic_lists(n_users=40, n_items=50, seed=3)
    built = write_built(tmp_path / "built", items, seqs)
    cfg = tiny_config(
        tmp_path,
        tiny_bert(tmp_path / "bert"),
        built,
        **{
            "train.max_steps": 2,
            "train.checkpoint_every": 0,
            "train.eval_every_epoch": False,
            "train.run_name": "two-machines",
        },
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])

    # The README's machines, on loopback: master address, port and GPU count are the only changes.
    swap = {"10.0.0.1": "127.0.0.1", "29500": port, "8": "1", "params.yaml": str(params)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    procs = []
    for cmd in commands:
        args = [swap.get(a, a) for a in cmd[1:]]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:  # e.g. a rendezvous waiting for a node that never comes
            p.kill()
        outs = [p.communicate()[0] for p in procs]
        pytest.fail("torchrun agents did not finish in 300 s:\n" + "\n---\n".join(o[-3000:] for o in outs))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]

    result = json.loads((tmp_path / "runs" / "two-machines" / "result.json").read_text())
    assert result["steps"] == 2
    meta = json.loads((Path(result["last_checkpoint"]) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2
