"""Voxelisation: every point maps to a voxel that contains it; lookups and strides."""

from __future__ import annotations

import pytest
import torch

from hilda.errors import ConfigError
from hilda.models.voxelize import VoxelConfig, lookup, points_at_stride, voxelize
from tests.models_helpers import batch_of, random_scene


@pytest.mark.parametrize("voxel_size", [0.05, 0.2])
def test_round_trip_every_point_in_its_voxel(voxel_size: float) -> None:
    points, batch = batch_of(random_scene(3000, 0), random_scene(2000, 1) + 40.0)
    cfg = VoxelConfig(voxel_size=voxel_size)
    vox = voxelize(points, batch, cfg)
    v = vox.coords[vox.point_voxel].long()  # (N, 4)
    assert torch.equal(v[:, 0], batch)
    corner = (v[:, 1:] + vox.origin[batch]).double() * voxel_size  # (N, 3) metres
    p = points[:, :3].double()
    # floor(p / s) puts p in [corner, corner + s) up to the float32 rounding of p / s
    assert bool(((p >= corner - 1e-5) & (p < corner + voxel_size + 1e-5)).all())
    assert torch.equal(vox.point_coords, v)
    # unique voxels, non-negative shifted coordinates, mean features
    assert len(torch.unique(vox.coords, dim=0)) == len(vox.coords)
    assert int(vox.coords[:, 1:].min()) == 0
    sums = torch.zeros(len(vox.coords), 4).index_add_(0, vox.point_voxel, points)
    counts = torch.bincount(vox.point_voxel, minlength=len(vox.coords)).float()
    expect = sums / counts[:, None]
    expect[:, 3] *= cfg.intensity_scale
    torch.testing.assert_close(vox.feats, expect, rtol=1e-5, atol=1e-5)


def test_lookup_and_stride() -> None:
    table = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0], [0, 4, 4, 4]])
    query = torch.tensor([[0, 4, 4, 4], [1, 0, 0, 1], [0, 1, 2, 3], [1, 0, 0, 0]])
    assert lookup(table, query).tolist() == [2, -1, 0, 1]
    coords = torch.tensor([[1, 5, 6, 7]])
    assert points_at_stride(coords, 2).tolist() == [[1, 2, 3, 3]]


def test_bad_points_are_refused() -> None:
    points = random_scene(10, 0)
    points[3, 1] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        voxelize(points, torch.zeros(10, dtype=torch.long), VoxelConfig())
    far = random_scene(10, 0)
    far[0, 0] = 5000.0
    with pytest.raises(ConfigError, match="spans more than"):
        voxelize(far, torch.zeros(10, dtype=torch.long), VoxelConfig())
