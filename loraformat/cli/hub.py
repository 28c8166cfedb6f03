"""CLI commands for hub (filled in by its issue)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
