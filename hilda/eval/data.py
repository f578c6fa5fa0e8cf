"""Labelled LiDAR frames for the downstream segmentation runs (the I/O edge of ``hilda.eval``).

Two layouts:
- nuScenes (or the synthetic world written in its format), read through nuscenes-devkit;
  lidarseg general categories map to the 16 evaluation classes by the devkit's
  ``LidarsegClassMapper``. Intensities are 0-255.
- SemanticKITTI (``hilda.datasets.semantickitti``): raw ids map to the 19 evaluation classes
  by the official learning map. Remission is 0-1.

Labels are class indices 0..K-1, ``IGNORE`` (-1) for what the benchmark leaves out. Each split
carries its classes and its intensity range, so the rest of ``hilda.eval`` is dataset-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from hilda.cache import evenly_spaced
from hilda.datasets import open_dataset
from hilda.datasets import semantickitti as kitti
from hilda.datasets.classes import COARSE_CLASSES
from hilda.datasets.io import DatasetError, read_lidarseg_labels, read_sweep
from hilda.errors import HildaError
from hilda.eval.config import NUSCENES_SPLITS, SegDataConfig
from hilda.train import augment
from hilda.train.config import AugmentConfig
from hilda.train.data import sample_seed

NUSCENES_CLASSES: tuple[str, ...] = COARSE_CLASSES[1:]  # the 16 evaluation classes, 0..15
IGNORE = -1
Layout = Literal["nuscenes", "semantickitti"]
# The intensity scale of each layout's files (the largest value a point can carry).
INTENSITY_RANGE: dict[str, float] = {"nuscenes": 255.0, "semantickitti": kitti.INTENSITY_RANGE}


@dataclass(frozen=True)
class LabelledFrame:
    token: str
    lidar_file: str
    labels_file: str


@dataclass(frozen=True)
class Split:
    layout: Layout
    frames: list[LabelledFrame]
    classes: tuple[str, ...]  # the evaluation classes, label k = classes[k]
    lut: np.ndarray  # (R,) int64 raw label id -> 0..K-1 or IGNORE (-2: unknown, KITTI)
    total: int  # labelled frames in the split before any subsetting
    intensity_range: float  # the files' intensity scale (255 nuScenes, 1 SemanticKITTI)


def subset(n: int, fraction: float) -> np.ndarray:
    """Indices of the ``fraction`` of n frames a run uses, in order: every k-th frame from the
    first when the fraction is 1/k (Sec. C.2: "1% subsets by sampling every 100th frame"),
    otherwise round(n * fraction) evenly spaced ones."""
    k = round(1.0 / fraction)
    if abs(k * fraction - 1.0) < 1e-9:
        return np.arange(0, n, k, dtype=np.int64)
    return evenly_spaced(n, fraction)


def nuscenes_version(root: str | Path) -> str:
    """The nuScenes version found under ``root``: v1.0-trainval, else v1.0-mini."""
    for version in NUSCENES_SPLITS:
        if (Path(root) / version).is_dir():
            return version
    raise DatasetError(f"{root} holds none of the nuScenes versions {sorted(NUSCENES_SPLITS)}")


def open_split(
    cfg: SegDataConfig, split: str, *, fraction: float = 1.0, max_frames: int | None = None
) -> Split:
    """The labelled frames of one split: a ``fraction`` of them (``subset``), at most
    ``max_frames`` (evenly spaced)."""
    if not cfg.root:
        raise HildaError("no dataset root: pass --root (or data.root in the config)")
    full = _kitti_split(cfg, split) if cfg.dataset == "semantickitti" else _nusc_split(cfg, split)
    if not full.frames:
        raise DatasetError(f"split {split!r} of {cfg.root} has no frames")
    keep = subset(len(full.frames), fraction)
    if max_frames is not None and max_frames < len(keep):
        keep = keep[evenly_spaced(len(keep), max_frames / len(keep))]
    return dataclasses.replace(full, frames=[full.frames[i] for i in keep])


def _nusc_split(cfg: SegDataConfig, split: str) -> Split:
    version = cfg.resolved()[0]
    reader = open_dataset("nuscenes", cfg.root, version=version, split=split)
    if not reader.has_labels:
        raise DatasetError(
            f"{cfg.root} ({version}) has no nuScenes-lidarseg annotations: segmentation needs "
            "the lidarseg tables and label files"
        )
    missing = [f.token for f in reader.frames if not f.labels_file]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(reader.frames)} frames of split {split!r} in {cfg.root} "
            f"have no lidarseg label file (first: frame {missing[0]})"
        )
    lut = reader.coarse_label_lut.astype(np.int64) - 1  # 0 (ignore) -> -1
    frames = [LabelledFrame(f.token, f.lidar_file, f.labels_file) for f in reader.frames]
    scale = INTENSITY_RANGE["nuscenes"]
    return Split("nuscenes", frames, NUSCENES_CLASSES, lut, len(frames), scale)


def _kitti_split(cfg: SegDataConfig, split: str) -> Split:
    scans = kitti.open_split(cfg.root, split)
    if any(s.label_file is None for s in scans):
        raise DatasetError(f"SemanticKITTI split {split!r} has no labels (test sequences)")
    frames = [LabelledFrame(s.token, s.scan_file, str(s.label_file)) for s in scans]
    return Split(
        "semantickitti",
        frames,
        kitti.CLASSES,
        kitti.label_lut(),
        len(frames),
        INTENSITY_RANGE["semantickitti"],
    )


def read_labelled(split: Split, frame: LabelledFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) float32 points (intensities on the files' scale) and (N,) int64 labels in
    0..K-1 / IGNORE of one frame of ``split``."""
    if split.layout == "semantickitti":
        points = kitti.read_scan(frame.lidar_file, frame.token)
        return points, kitti.read_labels(frame.labels_file, len(points), split.lut)
    points = read_sweep(frame.lidar_file, frame.token)
    raw = read_lidarseg_labels(frame.labels_file, len(points), frame.token)
    return points, split.lut[raw]


class SegDataset(Dataset):
    """Items are (index, epoch); a training item is augmented by one Table F3 draw seeded by
    (seed, epoch, index), so a run is reproducible whatever the worker count. Intensities are
    multiplied by ``intensity_factor``: the factor that puts the split's intensities on the
    scale the backbone was pre-trained on."""

    def __init__(
        self,
        split: Split,
        augment_cfg: AugmentConfig | None,
        seed: int = 0,
        intensity_factor: float = 1.0,
    ) -> None:
        self.split = split
        self.augment = augment_cfg if augment_cfg is not None and augment_cfg.enabled else None
        self.seed = seed
        self.intensity_factor = intensity_factor

    def __len__(self) -> int:
        return len(self.split.frames)

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        frame = self.split.frames[index]
        points, labels = read_labelled(self.split, frame)
        if self.intensity_factor != 1.0:
            points = points * np.array([1.0, 1.0, 1.0, self.intensity_factor], np.float32)
        if self.augment is not None:
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
            d = augment.draw(self.augment, rng)
            points = augment.apply_points(points, d, self.augment)
        return {"index": index, "points": points, "labels": labels}


@dataclass
class SegBatch:
    points: torch.Tensor  # (N, 4) float32, all frames of the batch
    batch: torch.Tensor  # (N,) int64 frame of each point, 0..B-1
    labels: torch.Tensor  # (N,) int64 0..K-1 / IGNORE
    index: torch.Tensor  # (B,) int64 frame index in the split

    def to(self, device: torch.device) -> SegBatch:
        return SegBatch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def collate_seg(samples: list[dict]) -> SegBatch:
    points = torch.from_numpy(np.concatenate([s["points"] for s in samples]))
    labels = torch.from_numpy(np.concatenate([s["labels"] for s in samples]))
    batch = torch.cat(
        [torch.full((len(s["points"]),), i, dtype=torch.int64) for i, s in enumerate(samples)]
    )
    index = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    return SegBatch(points, batch, labels, index)
