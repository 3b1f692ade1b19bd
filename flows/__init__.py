"""Prefect flows: thin orchestration over the :mod:`hllm` library (see docs/operations.md)."""
