"""The torchrun worker: ``python -m hllm.cli.worker --params P [--set k=v]... [--resume]``.

One process per rank. It sits above training because rank 0 attaches to the MLflow run the
launcher opened (``MLFLOW_RUN_ID``): training itself never imports MLflow."""

from __future__ import annotations

import logging

import torch

from hllm import lineage
from hllm.config import Config
from hllm.training.trainer import train

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """``python -m hllm.cli.worker --params P [--set k=v]... [--resume]`` (one process per rank)."""
    import argparse
    import os

    from hllm.config import load_config
    from hllm.logs import setup_logging

    ap = argparse.ArgumentParser(prog="python -m hllm.cli.worker", description=main.__doc__)
    ap.add_argument("--params", "-p", default="params.yaml")
    ap.add_argument("--set", "-s", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(os.environ.get("HLLM_LOG_LEVEL", "INFO"))
    cfg = load_config(args.params, args.sets)
    logger = None
    # Launched by `hllm train --nproc N`, a flow or a PyTorchJob that opened an MLflow run: rank 0
    # logs its metrics there, and the system info of the processes that actually train (the
    # launcher's tags describe the machine that launched them, e.g. a Prefect worker).
    if os.environ.get("MLFLOW_RUN_ID") and int(os.environ.get("RANK", "0")) == 0:
        from hllm.ops import tracking

        logger = tracking.attach(os.environ["MLFLOW_RUN_ID"], cfg)
        logger.set_tags(_process_info(cfg))
    train(cfg, resume=args.resume, logger=logger, progress=not args.no_progress)
    return 0


def _process_info(cfg: Config) -> dict[str, str]:
    """``sys.*`` tags of this rank-0 process under torchrun: world size, nodes, the device
    ``train.device`` resolves to here, torch/transformers/python versions, host."""
    import os
    import socket

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    want_cuda = torch.cuda.is_available() if cfg.train.device == "auto" else cfg.train.device == "cuda"
    info = lineage.system_info(world_size=world, device="cuda" if want_cuda else "cpu")
    info.update(
        {
            "sys.local_world_size": str(local),
            "sys.nodes": str(max(1, world // max(local, 1))),
            "sys.host": socket.gethostname(),
            "sys.fsdp": str(bool(cfg.train.fsdp)).lower(),
        }
    )
    return info


if __name__ == "__main__":
    raise SystemExit(main())
