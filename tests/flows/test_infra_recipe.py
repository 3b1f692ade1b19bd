"""infra/README.md's Docker recipe, step 5 (the nightly deployment), run as written against Prefect's
test API: only the repository URL is swapped for a local bare git repository holding this checkout's
flows. What it registers must be what the compose worker can run: the git clone pull step, the
working_dir on the worker's volume, the cron, and the concurrency limit of prefect.yaml."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers.flowkit import sh

REPO = Path(__file__).resolve().parents[2]
README = REPO / "infra" / "README.md"
URL = "https://git.example.com/team/hllm.git"


def step5() -> str:
    text = README.read_text()
    section = text[text.index("## From nothing to a nightly run (Docker)") : text.index("## Without Docker")]
    return re.search(r"python - <<'EOF'[^\n]*\n(.*?)\nEOF\n", section, re.S).group(1)


@pytest.mark.usefixtures("prefect_api")
def test_the_readme_deployment_runs_and_matches_the_compose_worker(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.exceptions import ObjectAlreadyExists

    code = step5()
    assert URL in code
    src = tmp_path / "src"
    shutil.copytree(REPO / "flows", src / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    sh("git", "init", "-q", cwd=src)
    sh("git", "add", "flows", cwd=src)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "flows", cwd=src)
    bare = tmp_path / "hllm.git"
    sh("git", "clone", "-q", "--bare", str(src), str(bare), cwd=tmp_path)

    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    worker = compose["services"]["prefect-worker"]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass

    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace(URL, str(bare)), "infra/README.md step 5", "exec"), {})

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("nightly-retrain/nightly")
    assert dep.work_pool_name == pool == "hllm-process"
    assert dep.entrypoint == "flows/nightly.py:nightly_retrain"
    [clone_step] = [s for s in dep.pull_steps if "prefect.deployments.steps.git_clone" in s]
    assert clone_step["prefect.deployments.steps.git_clone"]["repository"] == str(bare)
    # the flow runs in a clone under working_dir, which must be the worker's volume, not a temp dir
    working_dir = dep.job_variables["working_dir"]
    assert any(v.split(":")[1] == working_dir for v in worker["volumes"]), worker["volumes"]
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()  # the image creates it, owned by the worker's user
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    made = re.search(r"mkdir -p ([^\\\n]+)", dockerfile).group(1).split()
    assert working_dir in {f"{workdir}/{d}" for d in made}, (working_dir, workdir, made)
    # the same guard as prefect.yaml and `hllm flows serve`: one run at a time, the next one waits
    assert dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    nightly = next(d for d in prefect_yaml["deployments"] if d["entrypoint"] == dep.entrypoint)
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert [s.schedule.cron for s in dep.schedules] == [nightly["schedules"][0]["cron"]]
