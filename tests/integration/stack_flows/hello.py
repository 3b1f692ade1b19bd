"""A tiny flow deployed to the stack's process work pool by the integration tests.

It records which process ran it, so the test can tell that the worker (not the test) executed it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, task


@task
def square(x: int) -> int:
    return x * x


@flow(name="stack-hello")
def hello(out: str, n: int = 3) -> int:
    total = sum(square(i) for i in range(n))
    Path(out).write_text(json.dumps({"total": total, "pid": os.getpid(), "ppid": os.getppid()}))
    return total
