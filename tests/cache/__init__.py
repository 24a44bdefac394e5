"""Tests of the semantic cache (a package, so its conftest does not shadow tests/conftest.py)."""
