"""BEV pooling of sparse voxel features onto the occupancy grid (pure torch + torch-scatter).

A voxel at unshifted index v (metres = v x voxel_size) falls in BEV cell
floor(v / stride) + grid / 2 per axis, rows = y and columns = x: with stride x voxel_size equal
to the occupancy cell this is exactly ``hilda.pipeline.ops.occupancy.rasterise``'s cell
(floor((x + grid x cell / 2) / cell)), so features and targets share one grid.
"""

from __future__ import annotations

import torch

from hilda.models.scatter import scatter_mean


def bev_cells(
    voxel_coords: torch.Tensor, origin: torch.Tensor, grid: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, 4) shifted [b, x, y, z] voxels -> (row, col, inside) of their BEV cells."""
    b = voxel_coords[:, 0].long()
    v = voxel_coords[:, 1:3].long() + origin[b, :2]  # (M, 2) unshifted x, y voxel index
    cell = torch.div(v, stride, rounding_mode="floor") + grid // 2  # (M, 2)
    col, row = cell[:, 0], cell[:, 1]
    inside = (row >= 0) & (row < grid) & (col >= 0) & (col < grid)
    return row, col, inside


def bev_pool(
    voxel_feats: torch.Tensor,
    voxel_coords: torch.Tensor,
    origin: torch.Tensor,
    batch_size: int,
    grid: int = 512,
    stride: int = 8,
) -> torch.Tensor:
    """Mean of the voxel features (M, C) per BEV cell -> (B, C, grid, grid), zero where empty."""
    row, col, inside = bev_cells(voxel_coords, origin, grid, stride)
    b = voxel_coords[inside, 0].long()
    flat = (b * grid + row[inside]) * grid + col[inside]  # (M',)
    pooled = scatter_mean(voxel_feats[inside], flat, batch_size * grid * grid)  # (B*H*W, C)
    return pooled.view(batch_size, grid, grid, -1).permute(0, 3, 1, 2).contiguous()
