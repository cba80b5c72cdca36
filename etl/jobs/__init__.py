"""Thin job entry points: each module has ``main(argv=None)`` and runs under spark-submit."""
