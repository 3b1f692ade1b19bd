"""Prefect flows: thin orchestration over the :mod:`hllm` library (see README, "Nightly flow")."""
