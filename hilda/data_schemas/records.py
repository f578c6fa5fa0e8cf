"""Typed records that flow between stages: one keyframe (``Frame``) and its cameras (``Camera``).

Both dataset readers return these, so nothing downstream knows which dataset it reads.
All transforms are float64 (4, 4) rigid matrices named ``a_to_b``; timestamps are integer
microseconds (nuScenes' unit; AV2 nanoseconds are divided by 1000 exactly, the sensors'
clocks being microsecond-aligned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hilda.errors import HildaError
from hilda.geometry import is_rigid


class RecordError(HildaError):
    """A record built from a dataset has invalid values; the message names the frame and file."""


def _check_transform(name: str, value: np.ndarray, where: str) -> None:
    arr = np.asarray(value)
    if arr.shape != (4, 4):
        raise RecordError(f"{where}: {name} must be 4x4, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise RecordError(f"{where}: {name} has non-finite values (NaN or inf):\n{arr}")
    if not is_rigid(arr):
        raise RecordError(f"{where}: {name} is not a rigid transform:\n{arr}")


# The last row of a pinhole K, within np.allclose's default tolerance (written out: every
# camera of every keyframe is checked, and allclose's overhead is most of the check).
_PINHOLE_ROW = np.array([0.0, 0.0, 1.0])
_PINHOLE_TOL = 1e-8 + 1e-5 * _PINHOLE_ROW


@dataclass(frozen=True)
class Camera:
    """One camera image of a keyframe, with the calibration needed to project into it."""

    name: str  # channel, e.g. "CAM_FRONT" or "ring_front_center"
    image_file: str  # absolute path of the JPEG
    width: int
    height: int
    intrinsics: np.ndarray  # (3, 3) pinhole K in original-image pixels
    cam_to_ego: np.ndarray  # (4, 4) camera -> ego, ego at the camera's timestamp
    ego_to_global: np.ndarray  # (4, 4) ego -> global at the camera's own timestamp
    timestamp: int  # microseconds

    def __post_init__(self) -> None:
        where = f"camera {self.name} ({self.image_file})"
        k = np.asarray(self.intrinsics)
        if k.shape != (3, 3) or not np.all(np.isfinite(k)):
            raise RecordError(f"{where}: intrinsics must be a finite 3x3 matrix, got\n{k}")
        if k[0, 0] <= 0 or k[1, 1] <= 0 or np.any(np.abs(k[2] - _PINHOLE_ROW) > _PINHOLE_TOL):
            raise RecordError(f"{where}: intrinsics are not a pinhole matrix:\n{k}")
        if self.width <= 0 or self.height <= 0:
            raise RecordError(f"{where}: image size {self.width}x{self.height} is not positive")
        _check_transform("cam_to_ego", self.cam_to_ego, where)
        _check_transform("ego_to_global", self.ego_to_global, where)


@dataclass(frozen=True)
class Frame:
    """One LiDAR keyframe with its cameras and its neighbours ~0.5 s away."""

    token: str  # nuScenes sample token / AV2 "<log_id>:<lidar timestamp ns>"
    scene: str  # scene name (nuScenes) or log id (AV2)
    timestamp: int  # microseconds, LiDAR time
    lidar_file: str  # absolute path of the sweep (.pcd.bin or .feather)
    lidar_to_ego: np.ndarray  # (4, 4)
    ego_to_global: np.ndarray  # (4, 4) at LiDAR time
    cameras: tuple[Camera, ...]
    prev: int | None  # index of the previous keyframe in the reader's frame list, or None
    next: int | None  # index of the next keyframe, or None
    labels_file: str | None = None  # per-point semantic labels (nuScenes-lidarseg), if any
    extra: dict[str, str] = field(default_factory=dict)  # dataset-specific provenance

    def __post_init__(self) -> None:
        where = f"frame {self.token} ({self.lidar_file})"
        _check_transform("lidar_to_ego", self.lidar_to_ego, where)
        _check_transform("ego_to_global", self.ego_to_global, where)
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise RecordError(f"{where}: duplicate camera names {names}")

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)
