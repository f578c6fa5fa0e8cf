"""SemanticKITTI as a labelled dataset (the reader is ``hilda.datasets.semantickitti``): the
official splits (train 00-07, 09, 10; val 08), the 19 classes of the learning map, remission
0-1, and SLidR's and ScaLR's frame rule for label fractions (``sorted(paths)[::100]`` for
1%)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hilda.datasets import semantickitti as kitti
from hilda.datasets.io import DatasetError
from hilda.datasets.labelled.base import LabelledFrame, LabelledSplit, SubsetRule, TableColumns

TABLE = TableColumns("SemanticKITTI", False, (0.01,))  # Table 1: the 1% fine-tune


@dataclass(frozen=True)
class SemanticKittiLabelled:
    name: str = "semantickitti"
    label: str = "SemanticKITTI"
    # The official splits of semantic-kitti.yaml (no versions; make-synthetic --format
    # semantickitti names its sequences so that they select the synthetic world's scenes).
    default_splits: tuple[str | None, str, str] = (None, "train", "val")
    table: TableColumns | None = TABLE
    classes: tuple[str, ...] = kitti.CLASSES
    intensity_range: float = kitti.INTENSITY_RANGE
    default_subset: SubsetRule = "frames"
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)
    result_prefix: str = "semantickitti."
    has_cameras: bool = False

    def open_split(self, root: str, split: str, version: str | None) -> LabelledSplit:
        scans = kitti.open_split(root, split)
        if any(s.label_file is None for s in scans):
            raise DatasetError(f"SemanticKITTI split {split!r} has no labels (test sequences)")
        frames = [
            LabelledFrame(s.token, s.scan_file, str(s.label_file), s.sequence, s.token)
            for s in scans
        ]
        scenes = tuple(dict.fromkeys(s.sequence for s in scans))
        return LabelledSplit(
            self.name, frames, self.classes, kitti.label_lut(), len(frames),
            self.intensity_range, scenes, str(root),
        )  # fmt: skip

    def read(self, split: LabelledSplit, frame: LabelledFrame) -> tuple[np.ndarray, np.ndarray]:
        points = kitti.read_scan(frame.lidar_file, frame.token)
        return points, kitti.read_labels(frame.labels_file, len(points), split.lut)

    def version_of(self, root: str) -> str | None:
        return None

    def class_notes(self) -> list[str]:
        return ["(raw ids mapped by the learning map of semantic-kitti.yaml; others ignored)"]


SEMANTICKITTI = SemanticKittiLabelled()
