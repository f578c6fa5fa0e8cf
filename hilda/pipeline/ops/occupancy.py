"""Future BEV occupancy targets: ego compensation, ground removal, rasterisation, bit packing.

The t+1 sweep is moved into the t0 LiDAR frame through both ego poses, so static structure
lines up with t0 and only moving objects shift. The ground is removed with a per-frame robust
plane fit (RANSAC then a least-squares refit on the inliers); the remaining points between
``min_height`` and ``max_height`` above the plane mark their BEV cell occupied. The grid is
centred on the t0 LiDAR origin, x along columns, y along rows. Pure numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hilda.geometry import ego_compensate
from hilda.store.codecs import pack


@dataclass(frozen=True)
class OccupancyConfig:
    grid: int = 512  # cells per side (paper: 512 at stride 8 of the 0.05 m voxel grid)
    cell: float = 0.4  # metres per cell (8 x 0.05 m)
    min_height: float = 0.25  # above the fitted ground plane, metres
    max_height: float = 4.0
    ransac_iters: int = 100
    ransac_threshold: float = 0.15  # metres
    fit_radius: float = 30.0  # ground fit uses points within this range of the sensor
    horizon: int = 1  # keyframes ahead (t+1)

    def __post_init__(self) -> None:
        if self.grid % 8:
            raise ValueError(f"grid must be a multiple of 8 for bit packing, got {self.grid}")

    @property
    def half_range(self) -> float:
        return self.grid * self.cell / 2

    def attrs(self) -> dict:
        return {
            "grid": [self.grid, self.grid],
            "cell": self.cell,
            "range": [-self.half_range, self.half_range],
            "ground_rule": {
                "method": "RANSAC plane fit + least-squares refit on inliers, per frame",
                "iterations": self.ransac_iters,
                "threshold_m": self.ransac_threshold,
                "fit_radius_m": self.fit_radius,
                "keep_height_m": [self.min_height, self.max_height],
            },
            "horizon": self.horizon,
            "frame": "t0 LiDAR frame; row = y, column = x, origin at the grid centre",
            **{"config": asdict(self)},
        }


def fit_ground(points: np.ndarray, cfg: OccupancyConfig, seed: int) -> np.ndarray:
    """(4,) plane (a, b, c, d), c > 0, |(a, b, c)| = 1, with a x + b y + c z + d = 0."""
    xyz = points[np.linalg.norm(points[:, :2], axis=1) < cfg.fit_radius, :3]
    # The ground is the lowest large surface: seed RANSAC from the lower half of heights.
    low = xyz[xyz[:, 2] <= np.quantile(xyz[:, 2], 0.5)] if len(xyz) >= 3 else xyz
    if len(low) < 3:
        raise ValueError(f"too few points ({len(xyz)}) within {cfg.fit_radius} m to fit the ground")
    rng = np.random.default_rng(seed)
    best, best_count = None, -1
    for _ in range(cfg.ransac_iters):
        p = low[rng.choice(len(low), 3, replace=False)]
        n = np.cross(p[1] - p[0], p[2] - p[0])
        norm = np.linalg.norm(n)
        if norm < 1e-9 or abs(n[2]) / norm < 0.8:  # degenerate or far from horizontal
            continue
        n = n / norm * np.sign(n[2])
        count = int((np.abs(xyz @ n - n @ p[0]) < cfg.ransac_threshold).sum())
        if count > best_count:
            best, best_count = np.append(n, -n @ p[0]), count
    if best is None:
        raise ValueError("no near-horizontal ground plane found")
    inliers = xyz[np.abs(xyz @ best[:3] + best[3]) < cfg.ransac_threshold]
    centroid = inliers.mean(axis=0)
    _, _, vt = np.linalg.svd(inliers - centroid, full_matrices=False)
    n = vt[2] * np.sign(vt[2, 2])
    return np.append(n, -n @ centroid)


def rasterise(points: np.ndarray, plane: np.ndarray, cfg: OccupancyConfig) -> np.ndarray:
    """(grid, grid) bool occupancy of the non-ground points."""
    height = points[:, :3] @ plane[:3] + plane[3]
    keep = (height > cfg.min_height) & (height <= cfg.max_height)
    col = np.floor((points[keep, 0] + cfg.half_range) / cfg.cell).astype(np.int64)
    row = np.floor((points[keep, 1] + cfg.half_range) / cfg.cell).astype(np.int64)
    inside = (col >= 0) & (col < cfg.grid) & (row >= 0) & (row < cfg.grid)
    grid = np.zeros((cfg.grid, cfg.grid), dtype=bool)
    grid[row[inside], col[inside]] = True
    return grid


def future_occupancy(
    future_points: np.ndarray,
    transforms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    cfg: OccupancyConfig,
    seed: int,
) -> np.ndarray:
    """(grid, grid/8) uint8 packed occupancy of the t+1 sweep in the t0 LiDAR frame.

    ``transforms`` = (lidar_to_ego t+1, ego_to_global t+1, lidar_to_ego t0, ego_to_global t0).
    The ground plane is fitted on the compensated t+1 points themselves.
    """
    pts = ego_compensate(future_points, *transforms)
    plane = fit_ground(pts, cfg, seed)
    return pack(rasterise(pts, plane, cfg))
