"""`cmcr` commands of this group (see cmcr/cli.py). Work in progress."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
