"""Training-step throughput of the Item + User LLM, with and without item deduplication.

For each configuration ("default" = params.yaml as given, "large" = a bigger
batch and negative pool) and each mode ("dedup": every distinct item of a step
encoded once, as ``hllm.training.trainer`` does; "every-slot": each history/target slot and
each negative encoded separately, the reference code's behaviour), a fresh
process builds the model, runs ``--warmup`` untimed and ``--steps`` timed
optimizer steps on real training windows and prints:

    item-tokens/s   real (text + [ITEM]) tokens through the Item LLM per second
    steps/s         optimizer steps per second
    distinct        distinct items / item slots of a step (history + targets + negatives)
    padding         padding tokens / tokens run through the Item LLM (length bucketing keeps it small)
    cpu-s/step      process CPU seconds per step (less sensitive than wall time to other load)
    speed-up        every-slot step time / dedup step time (wall; CPU-time ratio in the JSON)
    peak mem        peak RSS of the process on CPU, peak CUDA allocation on GPU

Usage (needs the built dataset, e.g. ``hllm data synth && hllm data validate && hllm data build``)::

    python benchmarks/train_throughput.py [--params params.yaml] [--set k=v]... [--steps 3] [--configs default,large]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LARGE = ["train.batch_size=32", "train.num_negatives=512"]


def one(params: str, sets: list[str], dedup: bool, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch

    from hllm.config import load_config
    from hllm.data.dataset import load_built
    from hllm.data.text import ensure_tokens
    from hllm.models import build_model
    from hllm.training.batching import GlobalBatches, negatives_per_rank, sample_negatives
    from hllm.training.setup import param_groups, seed_everything
    from hllm.training.trainer import _training_windows

    cfg = load_config(params, sets + [f"train.dedup_items={str(dedup).lower()}"])
    t = cfg.train
    dev = torch.device("cuda" if torch.cuda.is_available() and t.device != "cpu" else "cpu")
    if dev.type == "cuda":
        from hllm.distributed import configure_cuda_kernels

        configure_cuda_kernels()  # as hllm.training.trainer does
    seed_everything(t.seed)
    built = load_built(cfg.paths.built_dir)
    model = build_model(cfg, built, ensure_tokens(cfg, built.dir)).to(dev).train()
    if t.gradient_checkpointing:
        from hllm.training.setup import _enable_gradient_checkpointing

        _enable_gradient_checkpointing(model)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
    windows = _training_windows(cfg, built)
    batches = GlobalBatches(len(windows), t.batch_size, 1, 1, t.seed)
    k = negatives_per_rank(t.num_negatives, 1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu, stats = [], [], []
    for step in range(warmup + steps):
        w = torch.from_numpy(windows[batches.micro_indices(step, 0, 0)]).long().to(dev)
        neg = torch.from_numpy(sample_negatives(t.seed, step, built.n_items, k, 1, 0)).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            out = model.train_loss(w, neg)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            stats.append(out.stats)
    mean = lambda key: float(np.mean([s[key] for s in stats]))  # noqa: E731
    sec = float(np.mean(times))
    peak = (
        torch.cuda.max_memory_allocated()
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": t.batch_size,
        "num_negatives": t.num_negatives,
        "seconds_per_step": sec,
        "steps_per_s": 1 / sec,
        "cpu_seconds_per_step": float(np.mean(cpu)),
        "load_avg": os.getloadavg()[0],
        "item_tokens_per_s": mean("item_tokens") / sec,
        "items_encoded": mean("items"),
        "slots": mean("slots"),
        "distinct_ratio": mean("items") / mean("slots"),
        "padding_waste": 1 - mean("item_tokens") / mean("padded_tokens"),
        "peak_mem_gb": peak / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--configs", default="default,large")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--one", choices=["dedup", "every-slot"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.params, args.sets, args.one == "dedup", args.steps, args.warmup)))
        return
    rows = []
    for name in args.configs.split(","):
        extra = LARGE if name == "large" else []
        res = {}
        for mode in ("dedup", "every-slot"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                mode,
                "--params",
                args.params,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            for s in args.sets + extra:
                cmd += ["--set", s]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                sys.exit(f"{name}/{mode} failed:\n{proc.stderr[-3000:]}")
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"config": name, "mode": mode, **res[mode]})
        rows[-2]["speedup"] = res["every-slot"]["seconds_per_step"] / res["dedup"]["seconds_per_step"]
        rows[-2]["speedup_cpu"] = res["every-slot"]["cpu_seconds_per_step"] / res["dedup"]["cpu_seconds_per_step"]
    print(
        f"{'config':8} {'mode':10} {'batch':>5} {'negs':>5} {'item-tok/s':>10} {'steps/s':>8} {'cpu-s/step':>10} "
        f"{'distinct':>8} {'padding':>7} {'speed-up':>8} {'peak mem':>9}  device (load average)"
    )
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(
            f"{r['config']:8} {r['mode']:10} {r['batch_size']:5d} {r['num_negatives']:5d} {r['item_tokens_per_s']:10.0f} "
            f"{r['steps_per_s']:8.3f} {r['cpu_seconds_per_step']:10.1f} {r['distinct_ratio']:8.2f} "
            f"{r['padding_waste']:7.1%} {sp:>8} "
            f"{r['peak_mem_gb']:7.2f}GB  {r['device']}, {r['threads']} threads ({r['load_avg']:.1f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
