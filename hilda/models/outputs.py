"""What every student returns, whatever its architecture (``hilda.models.student``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Strides (in input voxels) of student layers L, L-1, L-2, L-3: the last four decoder stages
# of either student (MinkUNet34's block8/7/6/5, PTv3's dec0/1/2/3).
STAGE_STRIDES = (1, 2, 4, 8)


@dataclass
class StudentOutput:
    point_feats: list[torch.Tensor]  # [(N, C_L), (N, C_{L-1}), ...] for layers L, L-1, ...
    voxel_feats: torch.Tensor  # (M, C_L) final-layer features of the input voxels
    voxel_coords: torch.Tensor  # (M, 4) int64 [b, x, y, z] of ``voxel_feats`` (stride 1)
