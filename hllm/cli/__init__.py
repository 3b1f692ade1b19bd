"""The ``hllm`` command. Sub-commands live one module per concern and import
their heavy libraries inside the command body, so ``hllm --help`` is instant."""

from __future__ import annotations

import typer

from hllm.logs import setup_logging

app = typer.Typer(
    help="Train, evaluate and ship HLLM sequential recommenders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    setup_logging("DEBUG" if verbose else "INFO")


def _register() -> None:
    from hllm.cli import ab, data, evaluate, flows, registry, serve, train

    app.add_typer(data.app, name="data", help="Import, generate, validate, build and version datasets.")
    train.register(app)
    evaluate.register(app)
    serve.register(app)
    app.add_typer(registry.app, name="registry", help="MLflow model registry: list, promote, roll back.")
    app.add_typer(ab.app, name="ab", help="A/B tests: analyse and decide from the service logs, replay users.")
    app.add_typer(flows.app, name="flows", help="Prefect flows: run the nightly retraining, serve its schedule.")


_register()
