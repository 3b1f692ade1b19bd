"""Full-ranking evaluation speed and memory: 10 k users over 100 k and 1 M items.

Runs the evaluator's own chunked scorer (``hllm.evaluation.ranking.rank_items``: exact
target ranks + running top-K, history masking) on random normalised
embeddings, one catalogue size per fresh subprocess so each peak RSS is clean,
and compares the achieved GFLOP/s (2 * users * items * dim / seconds) with
this machine's measured float32 matmul peak.

    python benchmarks/eval_speed.py                       # the README table
    python benchmarks/eval_speed.py --items 100000 --users 2000   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n x n float32 matmul."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def chunk_gemm_rate(dim: int, user_chunk: int, item_chunk: int, repeats: int = 5) -> float:
    """GFLOP/s of the scorer's own GEMM shape [user_chunk, dim] x [dim, item_chunk]."""
    import torch

    u, v = torch.randn(user_chunk, dim), torch.randn(item_chunk, dim)
    u @ v.T
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        u @ v.T
        best = min(best, time.perf_counter() - t)
    return 2 * user_chunk * item_chunk * dim / best / 1e9


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak() -> None:
    """Reset this process's peak RSS (Linux: VmHWM) so later peaks measure only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; never reset


def one(n_items: int, args) -> dict:
    """One measurement (run in a fresh process)."""
    import numpy as np
    import torch

    from hllm.data.dataset import Sequences
    from hllm.evaluation.ranking import rank_items

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = rss_mb()
    items = torch.randn(n_items, args.dim)
    items /= items.norm(dim=1, keepdim=True)  # in place: no second catalogue-sized copy
    items[0] = 0  # padding row
    users = torch.randn(args.users, args.dim)
    users /= users.norm(dim=1, keepdim=True)
    targets = rng.integers(1, n_items, size=args.users)
    seen = Sequences.from_lists(rng.integers(1, n_items, size=(args.users, args.history)).tolist())
    inputs = rss_mb()
    reset_peak()  # the peak below is the scorer's own, not the input generation's
    t = time.perf_counter()
    r = rank_items(
        users,
        items,
        targets=targets,
        exclude=seen,
        k=args.k,
        user_chunk=args.user_chunk,
        item_chunk=args.item_chunk,
        progress=False,
    )
    secs = time.perf_counter() - t
    assert r.ranks is not None and (args.k == 0 or r.topk_idx.shape == (args.users, args.k))
    peak = peak_rss_mb()
    return {
        "items": n_items,
        "users": args.users,
        "dim": args.dim,
        "k": args.k,
        "seconds": secs,
        "users_per_s": args.users / secs,
        "gflops": 2 * args.users * n_items * args.dim / secs / 1e9,
        "inputs_mb": inputs - base,
        "peak_rss_mb": peak,
        "working_mb": peak - inputs,
        "score_chunk_mb": args.user_chunk * min(args.item_chunk, n_items) * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384, help="embedding size (MiniLM / default HLLM: 384)")
    ap.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[0, 200],
        help="running top-K widths to time: 0 = exact ranks only (what `evaluate` does), "
        "200 = ranks + top-200 lists (batch recommendations)",
    )
    ap.add_argument("--history", type=int, default=10, help="masked history items per user")
    ap.add_argument("--user-chunk", type=int, default=256)
    ap.add_argument("--item-chunk", type=int, default=65_536)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.k = args.k[0]
        print(json.dumps(one(args.one, args)))
        return

    import torch

    peak = matmul_peak()
    gemm = chunk_gemm_rate(args.dim, args.user_chunk, min(args.item_chunk, max(args.items)))
    rows = []
    for n in args.items:
        for k in args.k:
            cmd = [sys.executable, __file__, "--one", str(n), "--k", str(k)] + [
                f"--users={args.users}",
                f"--dim={args.dim}",
                f"--history={args.history}",
                f"--user-chunk={args.user_chunk}",
                f"--item-chunk={args.item_chunk}",
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"float32 matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s; scorer GEMM shape "
        f"[{args.user_chunk}x{args.dim}]x[{args.dim}x{min(args.item_chunk, max(args.items))}]: {gemm:.1f} GFLOP/s"
    )
    print(
        f"full ranking: {args.users} users, dim {args.dim}, exact target rank (+ running top-K), "
        f"{args.history} masked items/user, user_chunk {args.user_chunk}, item_chunk {args.item_chunk}\n"
    )
    print(
        "| items | top-K | time (s) | users/s | GFLOP/s | % of matmul peak | peak RSS (MB) | embeddings (MB) | scorer's own memory (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['items']:,} | {r['k'] or '-'} | {r['seconds']:.1f} | {r['users_per_s']:.0f} | {r['gflops']:.1f} | "
            f"{100 * r['gflops'] / peak:.0f}% | {r['peak_rss_mb']:.0f} | {r['inputs_mb']:.0f} | {r['working_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
