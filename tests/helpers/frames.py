"""Comparing DataFrames in tests."""

from __future__ import annotations


def assert_same_rows(actual, expected, columns=None) -> None:
    """Compare two DataFrames (or a DataFrame and a list of tuples) ignoring row order."""
    cols = columns or actual.columns
    got = sorted(tuple(r[c] for c in cols) for r in actual.select(*cols).collect())
    if hasattr(expected, "collect"):
        exp = sorted(tuple(r[c] for c in cols) for r in expected.select(*cols).collect())
    else:
        exp = sorted(tuple(e) for e in expected)
    assert got == exp
