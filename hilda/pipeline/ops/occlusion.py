"""Occlusion test for point-pixel pairs: a z-buffer on a coarse pixel grid.

The LiDAR sits 0.3-1.8 m from each camera, so it sees surfaces the camera cannot (behind a
parked car, around a pole). Projected naively, those points pair with the pixels of the
occluder and teach the student wrong features. Rule: bin the projected points of one camera
into cells of ``cell_px`` x ``cell_px`` pixels; a point is occluded when its depth exceeds the
nearest depth in its cell by more than ``abs_tol + rel_tol * nearest``. Pure numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OcclusionRule:
    cell_px: float = 8.0  # z-buffer cell size, in original-image pixels
    abs_tol: float = 0.5  # metres
    rel_tol: float = 0.05  # fraction of the nearest depth

    def describe(self) -> dict:
        return {
            "rule": "coarse z-buffer: drop a point whose depth > min depth in its cell "
            "* (1 + rel_tol) + abs_tol",
            **asdict(self),
        }


def visible_mask(uv: np.ndarray, depth: np.ndarray, width: int, rule: OcclusionRule) -> np.ndarray:
    """(M,) bool: which of one camera's projected points (uv (M, 2), depth (M,)) are visible."""
    if len(depth) == 0:
        return np.zeros(0, dtype=bool)
    cols = int(np.ceil(width / rule.cell_px))
    cell = (uv[:, 1] // rule.cell_px).astype(np.int64) * cols + (uv[:, 0] // rule.cell_px).astype(
        np.int64
    )
    nearest = np.full(cell.max() + 1, np.inf)
    np.minimum.at(nearest, cell, depth)
    limit = nearest[cell] * (1.0 + rule.rel_tol) + rule.abs_tol
    return depth <= limit
