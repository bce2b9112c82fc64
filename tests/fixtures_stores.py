"""Pytest fixtures for the stores tests (registered in tests/conftest.py)."""

from __future__ import annotations
