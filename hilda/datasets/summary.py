"""What ``hilda-prep frames`` reports of a dataset split read back through its devkit: per
scene its keyframes, points per sweep and cameras; the neighbour counts; the lidarseg class
shares on the 16-class mapping."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from hilda.data_schemas.records import Frame
from hilda.datasets import neighbour_stats
from hilda.datasets.classes import COARSE_CLASSES
from hilda.datasets.io import read_lidarseg_labels, read_sweep


@dataclass(frozen=True)
class SceneSummary:
    scene: str
    keyframes: int
    mean_points: int | None  # None: sweeps not read
    cameras: int


@dataclass(frozen=True)
class FramesSummary:
    scenes: list[SceneSummary]
    neighbours: dict[str, int]
    cameras: str  # the first frame's cameras and sizes
    class_shares: dict[str, float]  # lidarseg class -> share of points (empty: no labels)


def summarise_frames(
    frames: list[Frame], coarse_lut: np.ndarray | None, load: bool
) -> FramesSummary:
    """The summary of ``frames``; with ``load`` every sweep (and label file, mapped by
    ``coarse_lut``) is read, which is also the check that they all read."""
    per_scene: dict[str, list[int]] = {}
    labels: Counter[int] = Counter()
    for f in frames:
        n = -1
        if load:
            n = len(read_sweep(f.lidar_file, f.token))
            if f.labels_file and coarse_lut is not None:
                lab = coarse_lut[read_lidarseg_labels(f.labels_file, n, f.token)]
                labels.update({int(c): int(k) for c, k in enumerate(np.bincount(lab)) if k})
        per_scene.setdefault(f.scene, []).append(n)
    cams = {f.scene: len(f.cameras) for f in frames}
    scenes = [
        SceneSummary(s, len(n), int(np.mean(n)) if load else None, cams[s])
        for s, n in per_scene.items()
    ]
    first = ", ".join(f"{c.name} {c.width}x{c.height}" for c in frames[0].cameras) if frames else ""
    total = sum(labels.values())
    shares = {COARSE_CLASSES[c]: k / total for c, k in sorted(labels.items())}
    return FramesSummary(scenes, neighbour_stats(frames), first, shares)
