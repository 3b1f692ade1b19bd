"""`hllm serve`: the A/B recommendation service (:mod:`hllm.abtest.service`) under uvicorn.

Loads ``models:/<registry.model_name>@champion`` (and ``@challenger``) from the configured MLflow store,
follows alias moves without a restart, and writes exposure/outcome logs under ``--log-dir``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hllm.cli.common import ParamsOpt, SetOpt, fail, load


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        params: ParamsOpt = Path("params.yaml"),
        sets: SetOpt = None,
        host: str = typer.Option("127.0.0.1", "--host", help="interface to bind"),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port)"),
        log_dir: str = typer.Option(
            "reports/ab/logs", "--log-dir", help="exposure/outcome logs: a folder or a URI (s3://bucket/prefix)"
        ),
        mode: str = typer.Option(
            "ab", "--mode", help="ab | shadow | interleave (team-draft: one slate merged from both arms)"
        ),
        poll_s: float = typer.Option(5.0, "--poll-s", min=0.1, help="seconds between registry polls"),
        flush_every: int = typer.Option(1000, "--flush-every", min=1, help="log records per part file"),
        flush_s: float = typer.Option(5.0, "--flush-s", min=0.1, help="max seconds between log flushes"),
        challenger_timeout_ms: float = typer.Option(
            500.0, "--challenger-timeout-ms", min=1.0, help="a slower challenger falls back to the champion"
        ),
        max_history: int = typer.Option(200, "--max-history", min=1, help="longest accepted history"),
        shadow_sample: float = typer.Option(
            1.0, "--shadow-sample", min=0.0, max=1.0, help="shadow mode: share of requests the challenger scores"
        ),
    ) -> None:
        """Serve champion and challenger over HTTP: POST /recommend, POST /feedback, /healthz, /readyz, /metrics."""
        import uvicorn

        from hllm.abtest.service import ServeOptions, create_app

        cfg = load(params, sets)
        try:
            opts = ServeOptions(
                log_dir=log_dir,
                mode=mode,
                poll_s=poll_s,
                flush_every=flush_every,
                flush_s=flush_s,
                challenger_timeout_s=challenger_timeout_ms / 1000.0,
                max_history=max_history,
                shadow_sample=shadow_sample,
            )
        except ValueError as e:
            fail(str(e), code=2)
        # one worker: the model pool and the log buffers live in this process
        # no per-request access log: the exposure log already records every request, and formatting the line
        # costs time on the request path
        uvicorn.run(create_app(cfg, opts), host=host, port=port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=30)  # fmt: skip
