"""Rigid-transform helpers shared by the readers, the synthetic world and the pipeline.

Pure numpy. Transforms are 4x4 homogeneous matrices named ``a_to_b`` (they map points
expressed in frame ``a`` into frame ``b``), as in the store layout of docs/design.md.
Quaternions follow the nuScenes / AV2 convention: (w, x, y, z).
"""

from __future__ import annotations

import math

import numpy as np
from pyquaternion import Quaternion


def make_transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4x4 transform from a (3, 3) rotation and a (3,) translation."""
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = translation
    return out


def quat_to_matrix(q_wxyz: np.ndarray | list[float]) -> np.ndarray:
    """(3, 3) rotation matrix of a quaternion (w, x, y, z), normalised first, as pyquaternion
    (which the devkits use) computes it, by the closed form on Python floats: a reader
    converts 14 poses a nuScenes keyframe, and pyquaternion's object costs 5x more."""
    w, x, y, z = (float(v) for v in np.asarray(q_wxyz, dtype=np.float64).ravel())
    n = math.sqrt(w * w + x * x + y * y + z * z)
    if n == 0.0:
        return np.zeros((3, 3))  # no rotation: the records' rigidity check names the frame
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) with w >= 0 of a (3, 3) rotation matrix.

    The matrix is first projected onto the nearest rotation (SVD), so matrices stored in
    float32 (as dataset exports often are) convert without pyquaternion's orthogonality error.
    """
    u, _, vt = np.linalg.svd(np.asarray(rotation, dtype=np.float64))
    nearest = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    q = Quaternion(matrix=nearest, atol=1e-9, rtol=1e-9)
    arr = np.array(q.elements, dtype=np.float64)
    return arr if arr[0] >= 0 else -arr


def pose_to_transform(
    q_wxyz: np.ndarray | list[float], t_xyz: np.ndarray | list[float]
) -> np.ndarray:
    """4x4 transform from a quaternion (w, x, y, z) and a translation."""
    return make_transform(quat_to_matrix(q_wxyz), np.asarray(t_xyz, dtype=np.float64))


def invert(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (no general matrix inverse: R^T, -R^T t)."""
    rot = transform[:3, :3]
    out = np.eye(4)
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ transform[:3, 3]
    return out


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to (N, 3) points; returns (N, 3) in float64."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ transform[:3, :3].T + transform[:3, 3]


def yaw_matrix(yaw: float) -> np.ndarray:
    """(3, 3) rotation about +z by ``yaw`` radians."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def is_rigid(transform: np.ndarray, atol: float = 1e-5) -> bool:
    """True when ``transform`` is a finite 4x4 rigid transform (orthonormal, det +1)."""
    t = np.asarray(transform)
    if t.shape != (4, 4):
        return False
    # On Python floats, not numpy: this runs for every pose of every keyframe a reader
    # builds (14 a nuScenes keyframe), where numpy's per-call overhead is most of the cost.
    m = t.tolist()
    if not all(math.isfinite(x) for row in m for x in row):
        return False
    r = [row[:3] for row in m[:3]]
    for i in range(3):
        for j in range(3):
            dot = r[i][0] * r[j][0] + r[i][1] * r[j][1] + r[i][2] * r[j][2]
            if abs(dot - (i == j)) > atol:
                return False
    det = (
        r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0])
    )
    bottom = max(abs(x - y) for x, y in zip(m[3], (0.0, 0.0, 0.0, 1.0), strict=True))
    return abs(det - 1.0) < atol and bottom <= atol


def ego_compensate(
    points: np.ndarray,
    lidar_to_ego_src: np.ndarray,
    ego_to_global_src: np.ndarray,
    lidar_to_ego_dst: np.ndarray,
    ego_to_global_dst: np.ndarray,
) -> np.ndarray:
    """(N, 3) points of the source sweep expressed in the destination LiDAR frame, through
    both ego poses (the occupancy target and the trainer's aligned history share it)."""
    src_to_dst = (
        invert(lidar_to_ego_dst) @ invert(ego_to_global_dst) @ ego_to_global_src @ lidar_to_ego_src
    )
    return apply(src_to_dst, points[:, :3])
