"""hilda-train: the lean trainer on the Zarr cache."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Pre-train the student on a hilda-prep cache (Eq. 1-4 of the HilDA paper).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Pre-train the student on a hilda-prep cache."""


@app.command("presets")
def presets_cmd() -> None:
    """List the YAML presets shipped under configs/."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = (
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
        if root.is_dir()
        else []
    )
    typer.echo("\n".join(files) if files else f"no presets under {root} yet")
