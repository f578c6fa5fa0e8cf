"""The Waymo Open Dataset v2 as a labelled dataset (the reader is ``hilda.datasets.waymo``):
the frames with TOP LiDAR segmentation labels of ``training`` / ``validation``, every LiDAR
and both returns as points (Pointcept's preparation keeps them all; points of the other
LiDARs carry no label), the 22 classes of ``segmentation.proto`` (0 = undefined, ignored),
intensity through ``tanh`` on a 0-1 scale, and the paper's 1% rule (supplementary D.2:
every 100th labelled training frame, in sorted segment and timestamp order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hilda.datasets import waymo
from hilda.datasets.io import DatasetError
from hilda.datasets.labelled.base import (
    IGNORE,
    LabelledFrame,
    LabelledSplit,
    SubsetRule,
    TableColumns,
)

TABLE = TableColumns("Waymo", False, (0.01,))  # Table 1: the 1% fine-tune


def label_lut() -> np.ndarray:
    """(23,) int64 Segmentation.Type -> 0..21 (``CLASSES``), TYPE_UNDEFINED -> IGNORE."""
    return np.concatenate([[IGNORE], np.arange(len(waymo.CLASSES))]).astype(np.int64)


@dataclass(frozen=True)
class WaymoLabelled:
    name: str = "waymo"
    label: str = "Waymo"
    default_splits: tuple[str | None, str, str] = (None, "training", "validation")
    table: TableColumns | None = TABLE
    classes: tuple[str, ...] = waymo.CLASSES
    intensity_range: float = 1.0  # tanh of the raw intensity
    default_subset: SubsetRule = "frames"
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)
    result_prefix: str = "waymo."
    has_cameras: bool = False  # its cameras are not read here

    def open_split(self, root: str, split: str, version: str | None) -> LabelledSplit:
        if split not in waymo.SPLITS:
            raise DatasetError(f"Waymo v2 has the splits {list(waymo.SPLITS)}, not {split!r}")
        frames = []
        names = waymo.segments(root, split)
        for name in names:
            seg = waymo.Segment(str(root), split, name)
            lidar = waymo.component_file(root, split, "lidar", name)
            labels = waymo.component_file(root, split, "lidar_segmentation", name)
            for stamp in seg.labelled():
                token = waymo.FrameId(name, stamp).token
                frames.append(LabelledFrame(token, str(lidar), str(labels), name, token))
        if not frames:
            raise DatasetError(f"Waymo {split} under {root} has no frame with LiDAR labels")
        return LabelledSplit(
            self.name, frames, self.classes, label_lut(), len(frames), self.intensity_range,
            tuple(names), str(root),
        )  # fmt: skip

    def read(self, split: LabelledSplit, frame: LabelledFrame) -> tuple[np.ndarray, np.ndarray]:
        fid = waymo.FrameId.parse(frame.token)
        split_name = _split_of(frame.lidar_file)
        scan = waymo.read_frame(waymo.Segment(split.root, split_name, fid.segment), fid.timestamp)
        labels = np.where(scan.labels >= 0, split.lut[np.maximum(scan.labels, 0)], IGNORE)
        return scan.points, labels.astype(np.int64)  # other LiDARs' points (-1): IGNORE

    def version_of(self, root: str) -> str | None:
        return None

    def class_notes(self) -> list[str]:
        return [
            "(Segmentation.Type 1..22 of segmentation.proto; TYPE_UNDEFINED and the points of "
            "the LiDARs other than TOP are ignored)"
        ]


def _split_of(component_path: str) -> str:
    """The split folder of ``ROOT/<split>/<component>/<segment>.parquet``."""
    return Path(component_path).parent.parent.name


WAYMO = WaymoLabelled()
