"""Test helpers shared by several suites (plain functions and classes; the fixtures are in conftest.py)."""
