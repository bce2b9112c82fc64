"""Pytest fixtures for the encode tests (registered in tests/conftest.py)."""

from __future__ import annotations
