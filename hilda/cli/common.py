"""Shared CLI helpers: clean error reporting and option parsing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

from hilda.errors import HildaError

P = ParamSpec("P")
R = TypeVar("R")
err = Console(stderr=True)


def fail_cleanly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the project's input errors into one red line and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except HildaError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected WxH (e.g. 800x450), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise typer.BadParameter(f"size must be positive, got {text!r}")
    return w, h
