"""Labelled LiDAR frames for the downstream segmentation runs (the I/O edge of ``hilda.eval``).

Frames come from nuScenes (or the synthetic world written in its format) through
nuscenes-devkit; labels are nuScenes-lidarseg general categories mapped to the 16 evaluation
classes by the devkit's ``LidarsegClassMapper``. Training labels are 0..15, ``IGNORE`` (-1) for
noise and the classes the benchmark leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from hilda.cache import evenly_spaced
from hilda.datasets import open_dataset
from hilda.datasets.classes import COARSE_CLASSES
from hilda.datasets.io import DatasetError, read_lidarseg_labels, read_sweep
from hilda.errors import HildaError
from hilda.eval.config import SegDataConfig
from hilda.train import augment
from hilda.train.config import AugmentConfig
from hilda.train.data import sample_seed

CLASSES: tuple[str, ...] = COARSE_CLASSES[1:]  # the 16 evaluation classes, index 0..15
IGNORE = -1


@dataclass(frozen=True)
class LabelledFrame:
    token: str
    lidar_file: str
    labels_file: str


@dataclass(frozen=True)
class Split:
    frames: list[LabelledFrame]
    lut: np.ndarray  # (256,) int64 general label -> 0..15 or IGNORE
    total: int  # labelled frames in the split before any subsetting


def open_split(
    cfg: SegDataConfig, split: str, *, fraction: float = 1.0, max_frames: int | None = None
) -> Split:
    """The labelled frames of one split: an evenly spaced ``fraction`` of them, at most
    ``max_frames`` (also evenly spaced)."""
    if not cfg.root:
        raise HildaError("no dataset root: pass --root (or data.root in the config)")
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
    if not reader.frames:
        raise DatasetError(f"split {split!r} of {cfg.root} ({version}) has no frames")
    lut = reader.coarse_label_lut.astype(np.int64) - 1  # 0 (ignore) -> -1
    frames = [LabelledFrame(f.token, f.lidar_file, f.labels_file) for f in reader.frames]
    keep = evenly_spaced(len(frames), fraction)
    if max_frames is not None and max_frames < len(keep):
        keep = keep[evenly_spaced(len(keep), max_frames / len(keep))]
    return Split([frames[i] for i in keep], lut, len(frames))


def read_labelled(frame: LabelledFrame, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) float32 points and (N,) int64 labels in 0..15 / IGNORE."""
    points = read_sweep(frame.lidar_file, frame.token)
    raw = read_lidarseg_labels(frame.labels_file, len(points), frame.token)
    return points, lut[raw]


class SegDataset(Dataset):
    """Items are (index, epoch); a training item is augmented by one Table F3 draw seeded by
    (seed, epoch, index), so a run is reproducible whatever the worker count."""

    def __init__(self, split: Split, augment_cfg: AugmentConfig | None, seed: int = 0) -> None:
        self.split = split
        self.augment = augment_cfg if augment_cfg is not None and augment_cfg.enabled else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split.frames)

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        frame = self.split.frames[index]
        points, labels = read_labelled(frame, self.split.lut)
        if self.augment is not None:
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
            d = augment.draw(self.augment, rng)
            points = augment.apply_points(points, d, self.augment)
        return {"index": index, "points": points, "labels": labels}


@dataclass
class SegBatch:
    points: torch.Tensor  # (N, 4) float32, all frames of the batch
    batch: torch.Tensor  # (N,) int64 frame of each point, 0..B-1
    labels: torch.Tensor  # (N,) int64 0..15 / IGNORE
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
