"""Shared test helpers: row builders, literal images, tiny models, the tiny pipeline run.

Test modules import from here, never from another test module or from conftest.py.
"""
