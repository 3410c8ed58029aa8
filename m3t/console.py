"""Terminal output shared by the command lines: one way to fail with a clean message."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Errors go to stderr, never wrapped (a path or a command in a message stays whole) and never
# read as markup (a message may hold brackets).
errors = Console(stderr=True, soft_wrap=True)


def fail(message: object, code: int = 1) -> NoReturn:
    errors.print(f"[red]error:[/] {escape(str(message))}")
    raise typer.Exit(code)
