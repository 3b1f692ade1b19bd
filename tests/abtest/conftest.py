"""The MLflow store fixtures (tests/helpers/mlstore.py) for the service tests."""

from tests.helpers.mlstore import store, tiny  # noqa: F401  (fixtures)
