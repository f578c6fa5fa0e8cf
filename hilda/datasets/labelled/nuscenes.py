"""nuScenes-lidarseg (and the synthetic world written in its format) as a labelled dataset:
read through nuscenes-devkit; lidarseg general categories map to the 16 evaluation classes
by the devkit's ``LidarsegClassMapper``; intensities 0-255; SLidR's scene rule for label
fractions (every k-th scene of the split in table order, with all its keyframes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hilda.datasets import open_dataset
from hilda.datasets.classes import COARSE_CLASSES, GENERAL_CATEGORIES
from hilda.datasets.io import DatasetError, read_lidarseg_labels, read_sweep
from hilda.datasets.labelled.base import (
    LabelledFrame,
    LabelledSplit,
    SubsetRule,
    TableColumns,
)

CLASSES: tuple[str, ...] = COARSE_CLASSES[1:]  # the 16 evaluation classes, 0..15
INTENSITY_RANGE = 255.0
# A version's own (train, val) splits in nuscenes-devkit, used when a config names the
# version but not the splits (data.version=v1.0-mini reads mini_train / mini_val).
VERSIONS: dict[str, tuple[str, str]] = {
    "v1.0-trainval": ("train", "val"),
    "v1.0-mini": ("mini_train", "mini_val"),
}
# Table 1's nuScenes columns: the linear probe and these fine-tunes.
TABLE = TableColumns("nuScenes", True, (0.01, 0.05, 0.1, 0.25, 1.0))


@dataclass(frozen=True)
class NuScenesLabelled:
    """nuScenes-lidarseg, or (``name="synthetic"``) the synthetic world in its format,
    written as v1.0-mini by ``hilda-prep make-synthetic``."""

    name: str = "nuscenes"
    label: str = "nuScenes"
    default_splits: tuple[str | None, str, str] = ("v1.0-trainval", "train", "val")
    table: TableColumns | None = TABLE
    classes: tuple[str, ...] = CLASSES
    intensity_range: float = INTENSITY_RANGE
    default_subset: SubsetRule = "scenes"
    versions: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(VERSIONS))
    result_prefix: str = ""
    has_cameras: bool = True

    def open_split(self, root: str, split: str, version: str | None) -> LabelledSplit:
        version = version or self.default_splits[0]
        reader = open_dataset("nuscenes", root, version=version, split=split)
        if not reader.has_labels:
            raise DatasetError(
                f"{root} ({version}) has no nuScenes-lidarseg annotations: segmentation "
                "needs the lidarseg tables and label files"
            )
        missing = [f.token for f in reader.frames if not f.labels_file]
        if missing:
            raise DatasetError(
                f"{len(missing)} of {len(reader.frames)} frames of split {split!r} in {root} "
                f"have no lidarseg label file (first: frame {missing[0]})"
            )
        lut = reader.coarse_label_lut.astype(np.int64) - 1  # 0 (ignore) -> -1
        frames = [
            LabelledFrame(
                f.token, f.lidar_file, f.labels_file, f.scene, f.extra["lidar_sample_data"]
            )
            for f in reader.frames
        ]
        in_split = {f.scene for f in frames}
        scenes = tuple(s["name"] for s in reader.nusc.scene if s["name"] in in_split)
        return LabelledSplit(
            self.name, frames, self.classes, lut, len(frames), self.intensity_range, scenes,
            str(root),
        )  # fmt: skip

    def read(self, split: LabelledSplit, frame: LabelledFrame) -> tuple[np.ndarray, np.ndarray]:
        points = read_sweep(frame.lidar_file, frame.token)
        raw = read_lidarseg_labels(frame.labels_file, len(points), frame.token)
        return points, split.lut[raw]

    def version_of(self, root: str) -> str | None:
        """v1.0-trainval when present under ``root``, else v1.0-mini."""
        for version in self.versions:
            if (Path(root) / version).is_dir():
                return version
        raise DatasetError(f"{root} holds none of the nuScenes versions {sorted(self.versions)}")

    def class_notes(self) -> list[str]:
        return [
            f"(the {len(GENERAL_CATEGORIES)} general categories of the label files map to "
            "these by the devkit's LidarsegClassMapper; its 'ignore' class is label -1)"
        ]


NUSCENES = NuScenesLabelled()
SYNTHETIC = NuScenesLabelled(
    name="synthetic",
    label="synthetic",
    default_splits=("v1.0-mini", "mini_train", "mini_val"),
    table=None,
)
