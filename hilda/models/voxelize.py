"""Voxelisation of point batches for the sparse student, with the point-to-voxel inverse map.

Pure torch. Voxels are cells of ``voxel_size`` metres; a voxel's input feature is the mean of
its points' features (MinkowskiEngine's UNWEIGHTED_AVERAGE quantisation, which Pointcept uses).
Voxel coordinates are shifted per sample to start at 0 (both backends want non-negative
coordinates); the shift is kept so BEV pooling can place voxels back in the sensor frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hilda.errors import ConfigError
from hilda.models.scatter import scatter_mean, scatter_min

COORD_BITS = 16  # per spatial axis in the lookup keys: 65,536 voxels = 3.3 km at 0.05 m


@dataclass(frozen=True)
class VoxelConfig:
    voxel_size: float = 0.05  # metres (Table F3 grid size)
    intensity_scale: float = 1 / 255  # nuScenes intensities are 0..255; features in ~[0, 1]

    def __post_init__(self) -> None:
        for name in ("voxel_size", "intensity_scale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"voxel.{name} must be a finite number > 0, got {value!r}")


@dataclass
class Voxels:
    """A voxelised batch. M voxels, N points, B samples."""

    coords: torch.Tensor  # (M, 4) int32 [b, x, y, z], per-sample shifted to >= 0
    feats: torch.Tensor  # (M, 4) float: mean x, y, z (metres) and scaled intensity
    point_voxel: torch.Tensor  # (N,) int64 row of each point's voxel
    point_coords: torch.Tensor  # (N, 4) int64 [b, x, y, z] voxel of each point (shifted)
    origin: torch.Tensor  # (B, 3) int64: unshifted voxel index = coords[:, 1:] + origin[b]
    batch_size: int
    voxel_size: float


def point_features(points: torch.Tensor, cfg: VoxelConfig) -> torch.Tensor:
    """(N, >=4) x, y, z, intensity -> (N, 4) input features (Table F2: 4 channels)."""
    return torch.cat([points[:, :3], points[:, 3:4] * cfg.intensity_scale], dim=1)


def voxelize(points: torch.Tensor, batch: torch.Tensor, cfg: VoxelConfig) -> Voxels:
    """Voxelise (N, >=4) points of ``batch`` (N,) sample ids (0..B-1, every sample non-empty)."""
    if points.ndim != 2 or points.shape[1] < 4:
        raise ConfigError(f"points must be (N, >=4), got {tuple(points.shape)}")
    if not torch.isfinite(points[:, :4]).all():
        raise ConfigError("points contain non-finite values")
    batch = batch.long()
    batch_size = int(batch.max()) + 1 if len(batch) else 0
    grid = torch.floor(points[:, :3] / cfg.voxel_size).long()  # (N, 3)
    origin = scatter_min(grid, batch, batch_size)  # (B, 3)
    shifted = grid - origin[batch]  # (N, 3) >= 0
    if len(shifted) and int(shifted.max()) >= 1 << COORD_BITS:
        raise ConfigError(
            f"a sample spans more than {1 << COORD_BITS} voxels of {cfg.voxel_size} m; "
            "crop the points or use larger voxels"
        )
    point_coords = torch.cat([batch[:, None], shifted], dim=1)  # (N, 4)
    keys = encode(point_coords)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    coords = decode(unique_keys).int()  # (M, 4), sorted by (b, x, y, z)
    feats = scatter_mean(point_features(points, cfg), inverse, len(unique_keys))
    return Voxels(coords, feats, inverse, point_coords, origin, batch_size, cfg.voxel_size)


def encode(coords: torch.Tensor) -> torch.Tensor:
    """(M, 4) non-negative [b, x, y, z] -> (M,) int64 keys, ordered as the rows sort."""
    c = coords.long()
    return ((c[:, 0] << COORD_BITS | c[:, 1]) << COORD_BITS | c[:, 2]) << COORD_BITS | c[:, 3]


def decode(keys: torch.Tensor) -> torch.Tensor:
    mask = (1 << COORD_BITS) - 1
    return torch.stack(
        [
            keys >> (3 * COORD_BITS),
            (keys >> (2 * COORD_BITS)) & mask,
            (keys >> COORD_BITS) & mask,
            keys & mask,
        ],
        dim=1,
    )


def lookup(table: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row of each ``query`` (N, 4) coordinate in ``table`` (M, 4); -1 where absent."""
    q = encode(query)
    if len(table) == 0:
        return torch.full_like(q, -1)
    keys = encode(table)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    pos = torch.searchsorted(sorted_keys, q).clamp(max=len(keys) - 1)
    found = sorted_keys[pos] == q
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def points_at_stride(point_coords: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, 4) voxel coordinates -> their voxel's coordinates at a coarser ``stride``."""
    return torch.cat([point_coords[:, :1], point_coords[:, 1:] // stride], dim=1)
