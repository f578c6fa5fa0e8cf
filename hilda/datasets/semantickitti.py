"""SemanticKITTI (Behley et al., ICCV 2019) in its release layout:

    ROOT/sequences/NN/velodyne/XXXXXX.bin   float32 (x, y, z, remission in [0, 1])
    ROOT/sequences/NN/labels/XXXXXX.label   uint32: semantic id (lower 16 bits), instance (upper)
    ROOT/sequences/NN/calib.txt             ``Tr:`` velodyne -> camera 0 (3 x 4), P0-P3
    ROOT/sequences/NN/poses.txt             camera-0 pose of every scan in the first scan's frame

Splits as in the official ``semantic-kitti.yaml``: train 00-07, 09, 10; val 08; test 11-21
(no labels). Labels map to the 19 evaluation classes by its ``learning_map`` (unlabelled,
outlier, other-structure and other-object are ignored; moving classes join their static
class). Pure readers: numpy arrays in, numpy arrays out, errors that name the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilda.datasets.io import DatasetError, require_file

IGNORE = -1
# Remission is in [0, 1]; nuScenes intensities are 0-255. A backbone trained on one sees the
# other's intensities rescaled by the ratio of the two (``intensity_to``).
INTENSITY_RANGE = 1.0

CLASSES = (
    "car",
    "bicycle",
    "motorcycle",
    "truck",
    "other-vehicle",
    "person",
    "bicyclist",
    "motorcyclist",
    "road",
    "parking",
    "sidewalk",
    "other-ground",
    "building",
    "fence",
    "vegetation",
    "trunk",
    "terrain",
    "pole",
    "traffic-sign",
)
# Raw label id -> learning id (0 = ignored, 1..19 = CLASSES[id - 1]): semantic-kitti.yaml.
LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8,
    40: 9, 44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17,
    80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip
SPLITS = {
    "train": ("00", "01", "02", "03", "04", "05", "06", "07", "09", "10"),
    "val": ("08",),
    "test": tuple(f"{i:02d}" for i in range(11, 22)),
}


def label_lut() -> np.ndarray:
    """(65536,) int64: raw semantic id -> 0..18 (``CLASSES``) or IGNORE; -2 marks ids that
    are not in the learning map."""
    lut = np.full(1 << 16, -2, dtype=np.int64)
    for raw, learn in LEARNING_MAP.items():
        lut[raw] = learn - 1 if learn else IGNORE
    return lut


def intensity_to(scale_range: float) -> float:
    """Factor that puts remission on a dataset's intensity scale (255 for nuScenes)."""
    return scale_range / INTENSITY_RANGE


def read_scan(path: str | os.PathLike, frame: str | None = None) -> np.ndarray:
    """(N, 4) float32 x, y, z, remission of one velodyne scan."""
    require_file(path, "SemanticKITTI scan", frame)
    raw = np.fromfile(path, dtype=np.float32)
    if raw.size == 0 or raw.size % 4:
        raise DatasetError(
            f"truncated or empty scan ({raw.size} floats, not a multiple of 4): {path}"
        )
    points = raw.reshape(-1, 4)
    if not np.isfinite(points).all():
        raise DatasetError(f"non-finite values in scan {path}")
    return points


def read_labels(path: str | os.PathLike, points: int, lut: np.ndarray | None = None) -> np.ndarray:
    """(N,) int64 evaluation class (0..18) or IGNORE of every point of a scan of ``points``
    points; the label file must hold one label per point and only known ids."""
    require_file(path, "SemanticKITTI label file", None)
    raw = np.fromfile(path, dtype=np.uint32)
    if len(raw) != points:
        raise DatasetError(f"{path} holds {len(raw)} labels for a scan of {points} points")
    lut = label_lut() if lut is None else lut
    out = lut[raw & 0xFFFF]
    if (out == -2).any():
        unknown = sorted({int(x) for x in np.unique(raw[out == -2] & 0xFFFF)})
        raise DatasetError(f"unknown SemanticKITTI label ids {unknown[:10]} in {path}")
    return out


def _numbers(text: str, path: str | os.PathLike, where: str) -> np.ndarray:
    try:
        return np.array(text.split(), dtype=np.float64)
    except ValueError:
        raise DatasetError(f"{path}, {where}: not numbers: {text.strip()[:80]!r}") from None


def read_calib(path: str | os.PathLike) -> np.ndarray:
    """(4, 4) velodyne -> camera 0 (``Tr``) of a sequence's calib.txt, an invertible rigid
    transform."""
    require_file(path, "calib.txt", None)
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        key, _, values = line.partition(":")
        if key.strip() == "Tr":
            numbers = _numbers(values, path, f"line {number} (Tr)")
            if numbers.size != 12 or not np.isfinite(numbers).all():
                raise DatasetError(f"{path}, line {number}: Tr must be 12 finite numbers")
            tr = np.vstack([numbers.reshape(3, 4), [0.0, 0.0, 0.0, 1.0]])
            if abs(np.linalg.det(tr[:3, :3])) < 1e-6:
                raise DatasetError(f"{path}, line {number}: Tr is singular (no rotation)")
            return tr
    raise DatasetError(f"{path} has no Tr line (velodyne -> camera)")


def read_poses(path: str | os.PathLike) -> np.ndarray:
    """(S, 4, 4) camera-0 poses of poses.txt (12 numbers a line)."""
    require_file(path, "poses.txt", None)
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        values = _numbers(line, path, f"line {number}")
        if values.size != 12 or not np.isfinite(values).all():
            raise DatasetError(
                f"{path}, line {number}: a pose is 12 finite numbers, got {values.size}"
            )
        rows.append(values)
    if not rows:
        raise DatasetError(f"{path} holds no pose")
    bottom = np.tile([0.0, 0.0, 0.0, 1.0], (len(rows), 1, 1))
    return np.concatenate([np.stack(rows).reshape(-1, 3, 4), bottom], axis=1)


@dataclass(frozen=True)
class KittiScan:
    sequence: str
    index: int  # scan number within the sequence
    scan_file: str
    label_file: str | None
    lidar_pose: np.ndarray  # (4, 4) velodyne pose in the sequence's first velodyne frame

    @property
    def token(self) -> str:
        return f"{self.sequence}/{self.index:06d}"


def open_split(
    root: str | os.PathLike, split: str, sequences: tuple[str, ...] | None = None
) -> list[KittiScan]:
    """Every scan of the split's sequences (or of ``sequences``, a subset of them), in
    sequence and scan order. A missing sequence folder is an error naming it."""
    if split not in SPLITS:
        raise DatasetError(f"SemanticKITTI splits are {sorted(SPLITS)}, got {split!r}")
    outside = sorted(set(sequences or ()) - set(SPLITS[split]))
    if outside:
        raise DatasetError(f"sequences {outside} are not in the SemanticKITTI {split} split")
    scans = []
    for seq in sequences or SPLITS[split]:
        scans += sequence_scans(Path(root) / "sequences" / seq, labels=split != "test")
    return scans


def sequence_scans(folder: Path, labels: bool = True) -> list[KittiScan]:
    """The scans of one sequence folder with their poses (in the first scan's velodyne frame)."""
    if not folder.is_dir():
        raise DatasetError(f"missing SemanticKITTI sequence folder {folder}")
    files = sorted((folder / "velodyne").glob("*.bin"))
    if not files:
        raise DatasetError(f"no scans in {folder / 'velodyne'}")
    tr = read_calib(folder / "calib.txt")
    poses = read_poses(folder / "poses.txt")
    if len(poses) != len(files):
        raise DatasetError(f"{folder / 'poses.txt'} has {len(poses)} poses for {len(files)} scans")
    lidar = np.linalg.inv(tr) @ poses @ tr  # camera poses -> velodyne poses
    out = []
    for i, f in enumerate(files):
        label = folder / "labels" / f"{f.stem}.label"
        if labels:
            require_file(label, "SemanticKITTI label file", f"{folder.name}/{f.stem}")
        out.append(
            KittiScan(folder.name, int(f.stem), str(f), str(label) if labels else None, lidar[i])
        )
    return out
