"""hilda-eval: what pre-training learned (linear probe, fine-tune, RankMe, figures)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Evaluate a pre-trained backbone: linear-probe and fine-tune mIoU, RankMe, figures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Evaluate a pre-trained backbone."""


@app.command("classes")
def classes_cmd() -> None:
    """Print the 16 nuScenes-lidarseg evaluation classes."""
    from hilda.datasets.classes import COARSE_CLASSES, GENERAL_CATEGORIES

    typer.echo("index  class")
    for i, name in enumerate(COARSE_CLASSES):
        typer.echo(f"{i:5d}  {name}")
    typer.echo(f"({len(GENERAL_CATEGORIES)} general categories in the label files)")
