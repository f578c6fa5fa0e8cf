"""Result files of hilda-eval runs and their side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from hilda.errors import HildaError
from hilda.eval.data import CLASSES


def read_result(path: str | Path) -> dict:
    """A result JSON written by ``run_segmentation``."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise HildaError(f"result file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HildaError(f"result file {path} is not JSON: {exc}") from None
    if not isinstance(result, dict) or "miou" not in result or "iou" not in result:
        raise HildaError(f"{path} is not a hilda-eval segmentation result (no miou / iou)")
    result.setdefault("path", str(path))
    return result


def run_label(result: dict) -> str:
    protocol = result.get("protocol", "?")
    if protocol == "finetune":
        protocol += f" {100 * result.get('fraction', 1.0):g}%"
    return f"{protocol}\n{result.get('init', '?')} backbone"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def result_table(results: list[dict]) -> Table:
    """mIoU and per-class IoU (%) of several runs, one column each; '-' where a class is
    neither labelled nor predicted in the validation frames (no IoU)."""
    table = Table(title="semantic segmentation, validation frames (IoU %)")
    table.add_column("class")
    for r in results:
        table.add_column(run_label(r), justify="right")
    table.add_row("[bold]mIoU[/]", *(f"[bold]{_pct(r['miou'])}[/]" for r in results))
    for name in CLASSES:
        table.add_row(name, *(_pct(r["iou"].get(name)) for r in results))
    return table
