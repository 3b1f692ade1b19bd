"""Speed and peak memory of `hllm data build` on a generated dataset of ~10 M interactions.

    .venv/bin/python benchmarks/data_build.py                      # 10 M interactions (about 2-3 min)
    .venv/bin/python benchmarks/data_build.py --interactions 1e6   # quicker

1. generates raw data with the synthetic generator (`hllm.data.synth`, the
   default dataset's generator scaled up: ~18 interactions per user) in a child
   process;
2. optionally (--validate) runs the GX validation in a fresh child process;
3. builds it in a fresh child process (k-core, ids, stable sort, sequences,
   stats; no validation gate and, unless --tokenize, no tokenisation, which is a
   per-item cost measured separately) and reports that process's own wall time
   and peak RSS (``getrusage`` ru_maxrss), so the generator's memory is not
   counted.

Prints one JSON line per phase plus a summary line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from hllm.config import load_config
    phase, work, n_users, n_items, tokenize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    cfg = load_config(None, [f"paths.raw_dir={work}/raw", f"paths.built_dir={work}/built",
                             f"paths.reports_dir={work}/reports", f"synth.n_users={n_users}",
                             f"synth.n_items={n_items}"])
    t = time.perf_counter()
    if phase == "synth":
        from hllm.data.synth import synthesize
        import pyarrow.parquet as pq
        synthesize(cfg)
        rows = pq.ParquetFile(f"{work}/raw/interactions.parquet").metadata.num_rows
    elif phase == "validate":
        from hllm.data.validate import validate_raw
        rep = validate_raw(cfg, data_docs=False)
        assert rep.passed, rep.summary()
        rows = rep.tables["interactions"]["rows"]
    else:
        from hllm.data.build import build_dataset, load_stats
        build_dataset(cfg, tokenize=tokenize, require_validation=False)
        rows = load_stats(cfg)["raw"]["interactions"]
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"phase": phase, "rows": rows, "seconds": round(dt, 2), "rows_per_s": round(rows / dt),
                      "peak_rss_mib": round(peak)}))
    """
)


def run(phase: str, work: Path, n_users: int, n_items: int, tokenize: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, phase, str(work), str(n_users), str(n_items), "1" if tokenize else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    line = out.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=float, default=10e6, help="target number of raw interactions")
    ap.add_argument("--items", type=int, default=200_000, help="catalogue size")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    ap.add_argument("--tokenize", action="store_true", help="include pre-tokenising item text (MiniLM)")
    ap.add_argument("--validate", action="store_true", help="also time GX validation (no Data Docs)")
    args = ap.parse_args()
    n_users = int(args.interactions / 18)  # synth default lengths 6..30: 18 per user on average
    with tempfile.TemporaryDirectory(prefix="hllm-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        gen = run("synth", work, n_users, args.items, False)
        if args.validate:
            run("validate", work, n_users, args.items, False)
        b = run("build", work, n_users, args.items, args.tokenize)
        stats = json.loads((work / "built" / "stats.json").read_text())
        print(
            f"build: {b['rows']:,} interactions ({n_users:,} users, {args.items:,} items) in {b['seconds']} s "
            f"= {b['rows_per_s']:,} rows/s, peak RSS {b['peak_rss_mib']:,} MiB; kept {stats['interactions']:,} "
            f"after {stats['k_core']['mode']} k-core; generation {gen['seconds']} s"
        )


if __name__ == "__main__":
    main()
