"""Pytest fixtures for the connect tests (registered in tests/conftest.py)."""

from __future__ import annotations
