"""Errors of the data layer. Every message names the file and, where it can,
the row (1-based line number as an editor shows it) or the field."""

from __future__ import annotations


class DataError(ValueError):
    """Input data cannot be used; the message says where and why."""
