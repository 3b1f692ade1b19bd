"""The MLflow store fixtures (tests/helpers/mlstore.py)."""

from tests.helpers.mlstore import cfg, store, tiny  # noqa: F401  (fixtures)
