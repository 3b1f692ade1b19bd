"""Shared test setup: an offline, telemetry-free environment before any library import, and the fixtures
several suites share: tiny offline HF models and built data, a Prefect test API, a raw snapshot, moto's S3
server behind a fault injector. Helpers (not fixtures) live in the ``tests.helpers`` package."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.helpers import offline  # noqa: E402  (before any library import reads the environment)

offline.apply(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")


@pytest.fixture(scope="session", autouse=True)
def _default_mlflow_store_outside_the_repo(tmp_path_factory):
    """`hllm train` logs to MLflow by default, and without tracking.tracking_uri or
    $MLFLOW_TRACKING_URI the store is ./mlflow/mlflow.db: a test running the CLI from the repository
    would write into the repository's store. Tests that check a store set their own URI."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow-default') / 'mlflow.db'}"
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


# --------------------------------------------------------------------------- tiny models and data


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from hllm import testing as T

    return T.tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from hllm import testing as T

    return T.tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def built_dir(tmp_path_factory):
    from hllm import testing as T

    items, seqs = T.synthetic_lists(n_users=40, n_items=60, duplicate_text=True)
    return T.write_built(tmp_path_factory.mktemp("built"), items, seqs)


# --------------------------------------------------------------------------- flows: Prefect, snapshots, S3


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API (SQLite) for every flow run of the session (starting one takes ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def keep_root_logging():
    """The CLI's callback installs a handler on CliRunner's stderr, closed once `invoke` returns:
    take it out again, or every later log record fails to write."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def bert(tiny_bert_dir) -> Path:
    """The tiny BERT under the name the flow tests use (one model per session, not two)."""
    return Path(tiny_bert_dir)


@pytest.fixture(scope="session")
def raw_snapshot(tmp_path_factory, bert) -> Path:
    """A snapshot folder in the canonical raw layout: the tiny synthetic shop of flowkit's params.

    Duplicate (user, item, timestamp) rows are dropped: on a catalogue this small the generator
    can repeat one, which validation rightly rejects (the default-size shop has none)."""
    from hllm.config import config_from_dict
    from hllm.data.ingest import drop_duplicate_interactions
    from hllm.data.raw import write_raw
    from hllm.data.synth import generate
    from tests.helpers.flowkit import tiny_params

    root = tmp_path_factory.mktemp("snapshot")
    cfg = config_from_dict(tiny_params(root, bert))
    tables = generate(cfg.synth)
    tables.interactions, _ = drop_duplicate_interactions(tables.interactions)
    return write_raw(tables, root / "2026-11-23")


class FaultyS3:
    """WSGI middleware in front of moto's S3 app.

    ``fail`` = N answers the next N requests with 503 SlowDown (what S3 says under load);
    clearing ``gate`` holds every request until it is set again.
    """

    def __init__(self, app):
        self.app = app
        self.fail = 0
        self.failed = 0
        self.requests = 0
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        self.gate.wait(timeout=120)
        with self._lock:
            self.requests += 1
            inject = self.fail > 0
            if inject:
                self.fail -= 1
                self.failed += 1
        if inject:
            body = b"<Error><Code>SlowDown</Code><Message>injected by the test</Message></Error>"
            start_response("503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server (a real HTTP endpoint) on 127.0.0.1, behind :class:`FaultyS3`."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    faulty = FaultyS3(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, faulty, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    faulty.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield faulty
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """boto3 pointed at the moto server, with botocore's own retries off so that every injected
    error reaches the flow's task retries."""
    for k, v in {
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "legacy",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3_server.fail, s3_server.failed = 0, 0
    s3_server.gate.set()
    yield s3_server
    s3_server.fail = 0
    s3_server.gate.set()
