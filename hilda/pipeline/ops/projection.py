"""LiDAR -> camera projection, the chain and mask of nuscenes-devkit's
``NuScenesExplorer.map_pointcloud_to_image``:

    lidar -> ego (LiDAR time) -> global -> ego (camera time) -> camera -> pixels,
    kept where depth > min_depth and border < u < W - border and border < v < H - border.

Pure numpy; ``uv`` is sub-pixel, in original-image pixels.
"""

from __future__ import annotations

import numpy as np

from hilda.geometry import invert


def lidar_to_camera(
    lidar_to_ego: np.ndarray,
    ego_to_global_lidar: np.ndarray,
    ego_to_global_cam: np.ndarray,
    cam_to_ego: np.ndarray,
) -> np.ndarray:
    """(4, 4) transform from the LiDAR frame at LiDAR time to the camera frame at camera time."""
    return invert(cam_to_ego) @ invert(ego_to_global_cam) @ ego_to_global_lidar @ lidar_to_ego


def project_points(
    points: np.ndarray,
    lidar_to_cam: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
    *,
    min_depth: float = 1.0,
    border: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project (N, >=3) LiDAR points into one camera.

    Returns ``index`` (M,) of the visible points, ``uv`` (M, 2) float pixel coordinates and
    ``depth`` (M,) camera-frame z, with the devkit's mask.
    """
    xyz = np.asarray(points[:, :3], dtype=np.float64)  # (N, 3)
    cam = xyz @ lidar_to_cam[:3, :3].T + lidar_to_cam[:3, 3]  # (N, 3)
    depth = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        pix = cam @ np.asarray(intrinsics, dtype=np.float64).T  # (N, 3)
        uv = pix[:, :2] / pix[:, 2:3]
    keep = depth > min_depth
    keep &= (uv[:, 0] > border) & (uv[:, 0] < width - border)
    keep &= (uv[:, 1] > border) & (uv[:, 1] < height - border)
    index = np.flatnonzero(keep)
    return index, uv[index], depth[index]
