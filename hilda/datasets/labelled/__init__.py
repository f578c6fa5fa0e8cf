"""Labelled downstream datasets behind one protocol (``base.LabelledDataset``), and the one
table that maps ``--dataset NAME`` to an implementation. Adding a dataset is one module
here and one entry in ``DATASETS`` (docs/design.md, "Adding a downstream dataset");
evaluation, the table and the CLIs never compare dataset names."""

from __future__ import annotations

from hilda.datasets.labelled.base import (
    IGNORE,
    LabelledDataset,
    LabelledFrame,
    LabelledSplit,
    SubsetRule,
    TableColumns,
)
from hilda.datasets.labelled.nuscenes import NUSCENES, SYNTHETIC
from hilda.datasets.labelled.semantickitti import SEMANTICKITTI
from hilda.datasets.labelled.waymo import WAYMO
from hilda.errors import ConfigError

# The registry, in Table 1's column order.
DATASETS: dict[str, LabelledDataset] = {
    NUSCENES.name: NUSCENES,
    SYNTHETIC.name: SYNTHETIC,
    SEMANTICKITTI.name: SEMANTICKITTI,
    WAYMO.name: WAYMO,
}


def labelled_dataset(name: str) -> LabelledDataset:
    """The dataset registered as ``name``; a ConfigError listing the names otherwise."""
    if name not in DATASETS:
        raise ConfigError(f"data.dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def table_datasets() -> list[LabelledDataset]:
    """The datasets with Table 1 columns, in the table's order."""
    return [ds for ds in DATASETS.values() if ds.table is not None]


__all__ = [
    "DATASETS",
    "IGNORE",
    "NUSCENES",
    "SEMANTICKITTI",
    "SYNTHETIC",
    "WAYMO",
    "LabelledDataset",
    "LabelledFrame",
    "LabelledSplit",
    "SubsetRule",
    "TableColumns",
    "labelled_dataset",
    "table_datasets",
]
