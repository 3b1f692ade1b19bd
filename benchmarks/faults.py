"""The crash-safety fault matrix (issue 12): kill the real nightly flow at each failpoint, rerun, check.

    PYTHONPATH=. .venv/bin/python benchmarks/faults.py                       # the matrix (~20 min, 2 cores)
    PYTHONPATH=. .venv/bin/python benchmarks/faults.py --only dvc-push:files-uploaded --only promote:alias-set
    PYTHONPATH=. .venv/bin/python benchmarks/faults.py --all                 # also every stage's ":end"
    PYTHONPATH=. .venv/bin/python benchmarks/faults.py --group 1             # one kill per rerun (~35 min)

Each case SIGKILLs one ``hllm flows run nightly`` at a failpoint (``HLLM_FAILPOINTS``, see
``hllm/faults.py``), runs the flow again and checks what ``tests/helpers/faultkit.py`` lists (slot,
zombie runs, registry vs audit log, data/raw vs data.dvc vs the DVC remote, leftovers). Prints a
markdown table: fault, where, recovered, time to recover (the rerun's wait for the slot + its
recovery stage), the rerun's wall time, what was left behind; then the problems, if any, and the
total wall time. Exits 1 when a fault was not recovered. ``--keep DIR`` keeps the project there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import offline  # noqa: E402  (the Makefile's offline, telemetry-free defaults)

offline.apply(OMP_NUM_THREADS="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")


def main() -> int:
    from hllm import testing
    from tests.helpers import faultkit as fk

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="a failpoint (repeatable)")
    ap.add_argument("--all", action="store_true", help="also every stage's ':end' point")
    ap.add_argument("--group", type=int, default=3, help="kills chained before each plain rerun (default 3)")
    ap.add_argument("--keep", type=Path, help="keep the project in this folder")
    a = ap.parse_args()
    cases = [fk.case(n) for n in a.only] if a.only else (fk.ALL_CASES if a.all else fk.CASES)
    root = a.keep or Path(tempfile.mkdtemp(prefix="hllm-faults-"))
    if a.keep:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def progress(o, seconds):
        state = "recovered" if o.recovered else "NOT RECOVERED"
        print(f"[{time.monotonic() - t0:6.0f} s] {' + '.join(o.points)}: {state} ({seconds:.0f} s: killed runs "
              f"{o.kill_s} s, rerun {o.rerun_s} s, checks {o.check_s} s)", flush=True)  # fmt: skip
        for line in o.recovery:
            print(f"    recovery: {line}", flush=True)

    try:
        item_model = testing.tiny_bert(root / "tiny-bert")
        outcomes = fk.run_matrix(root / "lab", Path(item_model), cases, group=a.group, progress=progress)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(fk.table(outcomes))
    bad = [o for o in outcomes if not o.recovered]
    for o in bad:
        print(f"\n{' + '.join(o.points)}:")
        for p in o.problems:
            print(f"  - {p[:3000]}")
    total = time.monotonic() - t0
    print(
        f"\n{len(outcomes) - len(bad)}/{len(outcomes)} recovered; wall time {total / 60:.1f} min ({len(cases)} kills)"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
