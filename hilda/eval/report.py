"""Result files of hilda-eval runs and their side-by-side table (per-class IoU)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from hilda.datasets.labelled import DATASETS
from hilda.errors import HildaError


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
    name = str(result.get("dataset", ""))
    if name in DATASETS and DATASETS[name].result_prefix:  # the default dataset goes unnamed
        protocol = f"{DATASETS[name].label} {protocol}"
    return f"{protocol}\n{result.get('init', '?')} backbone"


def class_names(results: list[dict]) -> list[str]:
    """The classes of several results, in their order (nuScenes' 16, SemanticKITTI's 19, or
    several datasets', each once)."""
    names: dict[str, None] = {}
    for r in results:
        names.update(dict.fromkeys(r.get("classes") or r["iou"]))
    return list(names)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def result_table(results: list[dict]) -> Table:
    """mIoU and per-class IoU (%) of several runs, one column each; '-' where a class is
    neither labelled nor predicted in the validation frames (no IoU) or not in a run's
    dataset."""
    table = Table(title="semantic segmentation, validation frames (IoU %)")
    table.add_column("class")
    for r in results:
        table.add_column(run_label(r), justify="right")
    table.add_row("[bold]mIoU[/]", *(f"[bold]{_pct(r['miou'])}[/]" for r in results))
    for name in class_names(results):
        table.add_row(name, *(_pct(r["iou"].get(name)) for r in results))
    return table
