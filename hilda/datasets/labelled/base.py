"""What a labelled downstream dataset is, whatever its files: the ``LabelledDataset``
protocol (mirroring the pre-training side's ``FrameReader``) and the records it returns.

A dataset gives its splits and their frames (stable frame ids), the points of a frame (x, y,
z, intensity on the files' own scale, which it declares in ``intensity_range`` so that
evaluation puts it on the backbone's), the labels already mapped to the benchmark's classes
with one ignore index (``IGNORE``), its class names, its label-fraction rule and the row of
the paper's table it fills. Evaluation (``hilda.eval``) and the CLIs reach a dataset only
through this protocol and the registry table in ``hilda.datasets.labelled``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

IGNORE = -1  # the label of every point a benchmark leaves out
SubsetRule = Literal["scenes", "frames", "file"]


@dataclass(frozen=True)
class LabelledFrame:
    token: str  # the frame's id in error messages (sample token, "SS/NNNNNN", ...)
    lidar_file: str
    labels_file: str
    scene: str = ""  # its scene / sequence / segment
    # What a result records of the frames it trained on (``train_tokens``): the dataset's
    # stable id of the LiDAR frame (nuScenes' LIDAR_TOP sample_data token, KITTI's
    # "SS/NNNNNN", Waymo's "<segment>/<timestamp>").
    lidar_token: str = ""


@dataclass(frozen=True)
class LabelledSplit:
    dataset: str  # the registry name of the dataset that reads its frames
    frames: list[LabelledFrame]
    classes: tuple[str, ...]  # the evaluation classes, label k = classes[k]
    lut: np.ndarray  # (R,) int64 raw label id -> 0..K-1 or IGNORE (-2: an unknown id)
    total: int  # labelled frames in the split before any subsetting
    intensity_range: float  # the files' intensity scale (255 nuScenes, 1 SemanticKITTI)
    # The split's scenes in the dataset's own order (nuScenes' scene table, KITTI's
    # sequences, Waymo's sorted segments): the scene rule counts them.
    scenes: tuple[str, ...] = ()
    root: str = ""
    # How ``frames`` were chosen from the split (a result records it): {"rule": "all"} or
    # the subset rule with its parameters.
    subset: dict = dataclasses.field(default_factory=lambda: {"rule": "all"})


@dataclass(frozen=True)
class TableColumns:
    """The columns a dataset fills in Table 1: its label there, whether it has a linear
    probe column, and its fine-tune label fractions."""

    label: str
    linear: bool
    fractions: tuple[float, ...]


class LabelledDataset(Protocol):
    """One downstream segmentation dataset (see the module docstring)."""

    name: str  # the registry key, ``--dataset NAME``
    label: str  # how tables and reports name it ("SemanticKITTI")
    classes: tuple[str, ...]
    intensity_range: float
    default_subset: SubsetRule  # how a fraction 1/k picks its training frames by default
    # (default version or None, default train split, default val split)
    default_splits: tuple[str | None, str, str]
    # A version's own (train, val) splits, for datasets released in versions (nuScenes).
    versions: dict[str, tuple[str, str]]
    result_prefix: str  # result files are named "<prefix>finetune-1pct.json"
    has_cameras: bool  # its frames have camera images (the teacher probe needs them)
    table: TableColumns | None  # the Table 1 columns it fills (None: none)

    def open_split(self, root: str, split: str, version: str | None) -> LabelledSplit:
        """The labelled frames of one split, in the dataset's order."""
        ...

    def read(self, split: LabelledSplit, frame: LabelledFrame) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) float32 points (intensity on the files' scale) and (N,) int64 labels in
        0..K-1 / IGNORE of one frame of ``split``."""
        ...

    def version_of(self, root: str) -> str | None:
        """The version found under ``root`` (None for a dataset without versions)."""
        ...

    def class_notes(self) -> list[str]:
        """Lines ``hilda-eval classes`` prints after the classes (how raw ids map)."""
        ...
