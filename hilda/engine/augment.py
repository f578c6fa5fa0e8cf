"""Table F3 augmentations, one draw per sample, for both sweeps and the BEV target. Pure numpy.

A draw is a 3x3 linear map A (rotation about z, isotropic scale, x / y flips) applied to every
point of the sample, plus per-point jitter. The future-occupancy grid lives in the same (t0
LiDAR) frame, so the same A moves it: each output cell takes the value of the input cell
containing A^-1 (cell centre) (nearest neighbour; cells mapped from outside the grid are
empty). Point-pixel pairs index points, so they stay valid whatever A is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Table F3, one draw per sample, applied to both sweeps and the BEV target."""

    enabled: bool = True
    # Radians, as Table F3 states (Pointcept's RandomRotate multiplies its range by pi).
    rotate: tuple[float, float] = (-1.0, 1.0)
    rotate_p: float = 0.5
    scale: tuple[float, float] = (0.9, 1.1)
    flip_p: float = 0.5  # x and y each flipped with this probability (Pointcept RandomFlip)
    jitter_sigma: float = 0.005
    jitter_clip: float = 0.02


@dataclass(frozen=True)
class Draw:
    linear: np.ndarray  # (3, 3) applied as x' = A x
    jitter_seed: int


def draw(cfg: AugmentConfig, rng: np.random.Generator) -> Draw:
    """One sample's transform. The order of random calls is fixed, so a sample's seed alone
    decides it (whichever worker or process draws it)."""
    rotate, angle = rng.random() < cfg.rotate_p, rng.uniform(*cfg.rotate)
    scale = rng.uniform(*cfg.scale)
    flip_x, flip_y = rng.random() < cfg.flip_p, rng.random() < cfg.flip_p
    jitter_seed = int(rng.integers(0, 2**31 - 1))
    if not cfg.enabled:
        return Draw(np.eye(3), jitter_seed)
    c, s = (np.cos(angle), np.sin(angle)) if rotate else (1.0, 0.0)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    return Draw(flip @ (scale * rot), jitter_seed)


def apply_points(points: np.ndarray, d: Draw, cfg: AugmentConfig, stream: int = 0) -> np.ndarray:
    """(N, >=3) points -> transformed copy (float32); ``stream`` separates the jitter of the
    sample's two sweeps."""
    out = np.array(points, dtype=np.float32, copy=True)
    out[:, :3] = (points[:, :3].astype(np.float64) @ d.linear.T).astype(np.float32)
    if cfg.enabled and cfg.jitter_sigma > 0:
        rng = np.random.default_rng([d.jitter_seed, stream])
        noise = rng.normal(0.0, cfg.jitter_sigma, size=(len(out), 3))
        out[:, :3] += np.clip(noise, -cfg.jitter_clip, cfg.jitter_clip).astype(np.float32)
    return out


def apply_grid(grid: np.ndarray, d: Draw, cell: float) -> np.ndarray:
    """(H, W) BEV grid (rows = y, cols = x, centred on the sensor, ``cell`` metres) moved by the
    draw's x / y part -> (H, W) of the same dtype."""
    h, w = grid.shape
    a = d.linear[:2, :2]
    if np.allclose(a, np.eye(2)):
        return grid.copy()
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    centres = np.stack([(cols + 0.5) * cell - w * cell / 2, (rows + 0.5) * cell - h * cell / 2])
    src = np.linalg.inv(a) @ centres.reshape(2, -1)  # (2, H*W) metres
    src_col = np.floor((src[0] + w * cell / 2) / cell).astype(np.int64)
    src_row = np.floor((src[1] + h * cell / 2) / cell).astype(np.int64)
    inside = (src_col >= 0) & (src_col < w) & (src_row >= 0) & (src_row < h)
    out = np.zeros(h * w, dtype=grid.dtype)
    out[inside] = grid[src_row[inside], src_col[inside]]
    return out.reshape(h, w)
