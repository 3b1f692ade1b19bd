"""The crash-safety fault matrix (issue 12): the real nightly flow (``hllm flows run nightly``, the
embedded default, tiny settings) is SIGKILLed at each failpoint of ``tests/helpers/faultkit.py``
(every stage boundary, and inside publish, dvc add, dvc push, export, registration and promotion),
then run again; the rerun must take the slot within the stated bound and complete, and nothing may
be half-written: no RUNNING run, registry versions and aliases as they should be and consistent
with the audit log, ``data/raw`` == ``data.dvc`` == the DVC remote, nothing left behind.

The cases run in order in one project (nights follow each other: later kills meet a champion and
a changed data version), three kills chained per rerun to fit the CI budget (``FAULT_GROUP``); a failing case
still lets the others run, and the test fails listing every case that did not recover.
``benchmarks/faults.py`` runs the same matrix and prints its table (docs/results.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import faultkit as fk

pytestmark = [pytest.mark.slow, pytest.mark.faults]  # make test-faults, not make test

GROUP = int(os.environ.get("FAULT_GROUP", "3"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, bert) -> fk.Lab:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return fk.Lab(tmp_path_factory.mktemp("faults"), Path(bert))


GROUPS = [fk.CASES[i : i + GROUP] for i in range(0, len(fk.CASES), GROUP)]


@pytest.mark.parametrize("cases", GROUPS, ids=[" + ".join(c.point for c in g) for g in GROUPS])
def test_a_killed_night_is_recovered_by_the_next(lab: fk.Lab, cases: list[fk.Case]) -> None:
    o = lab.case(cases)
    print(f"\n{' + '.join(o.points)}: recover {o.recover_s} s, rerun {o.rerun_s} s, left: {o.left or 'nothing'}")
    for line in o.recovery:
        print(f"  recovery: {line}")
    assert o.fired, o.problems
    assert o.recovered, "\n".join(o.problems)
    assert o.left == [], o.left
