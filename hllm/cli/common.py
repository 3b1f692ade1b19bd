"""Options and helpers shared by every CLI command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to load")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config value, e.g. --set train.lr=3e-4 (repeatable)"),
]


def load(params: Path, sets: list[str] | None):
    """Load the typed config or exit 2 with the offending key named."""
    from hllm.config import ConfigError, load_config

    try:
        return load_config(params, sets or [])
    except ConfigError as e:
        fail(str(e), code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
