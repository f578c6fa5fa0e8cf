"""LiDAR -> camera projection, the chain and mask of nuscenes-devkit's
``NuScenesExplorer.map_pointcloud_to_image``:

    lidar -> ego (LiDAR time) -> global -> ego (camera time) -> camera -> pixels,
    kept where depth > min_depth and border < u < W - border and border < v < H - border.

Pure numpy; ``uv`` is sub-pixel, in original-image pixels.
"""

from __future__ import annotations

from collections.abc import Callable

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


def frame_pairs(
    points: np.ndarray,
    lidar_to_ego: np.ndarray,
    ego_to_global: np.ndarray,
    intrinsics: np.ndarray,
    cam_to_ego: np.ndarray,
    cam_ego_to_global: np.ndarray,
    image_size: np.ndarray,
    visible: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
    min_depth: float = 1.0,
    border: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Point-pixel pairs of one frame over its V cameras (calibration arrays (V, ...)).

    Returns ``point`` (Q,) int32, ``cam`` (Q,) uint8, ``uv`` (Q, 2) float32 and ``depth`` (Q,)
    float16, camera by camera; ``visible(uv, depth, width)`` filters occluded pairs. Cameras
    with a zero image size (absent in this frame) are skipped.
    """
    out: list[tuple[np.ndarray, ...]] = []
    for v in range(len(intrinsics)):
        width, height = (int(x) for x in image_size[v])
        if width == 0 or height == 0:
            continue
        to_cam = lidar_to_camera(lidar_to_ego, ego_to_global, cam_ego_to_global[v], cam_to_ego[v])
        idx, uv, depth = project_points(
            points, to_cam, intrinsics[v], width, height, min_depth=min_depth, border=border
        )
        if visible is not None:
            keep = visible(uv, depth, width)
            idx, uv, depth = idx[keep], uv[keep], depth[keep]
        out.append(
            (
                idx.astype(np.int32),
                np.full(len(idx), v, np.uint8),
                uv.astype(np.float32),
                depth.astype(np.float16),
            )
        )
    if not out:
        return (
            np.zeros(0, np.int32),
            np.zeros(0, np.uint8),
            np.zeros((0, 2), np.float32),
            np.zeros(0, np.float16),
        )
    return tuple(np.concatenate(cols) for cols in zip(*out, strict=True))  # type: ignore[return-value]
