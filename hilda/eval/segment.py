"""The downstream segmentation network: a pre-trained (or freshly initialised) student and the
Sec. C.2 head, BatchNorm1d + Linear on the final point features. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from hilda.models.convert import backbone_student_config, backbone_voxel_config, load_backbone
from hilda.models.student import build_student
from hilda.models.voxelize import VoxelConfig, voxelize

Init = Literal["pretrained", "random"]


@dataclass
class Backbone:
    net: nn.Module  # a student (hilda.models.student): MinkUNet34 or PTv3
    voxel: VoxelConfig  # the voxelisation it was pre-trained with
    init: Init
    source: str  # the checkpoint it was loaded from (or shaped after, for "random")


def build_backbone(
    path: str,
    init: Init = "pretrained",
    *,
    seed: int = 0,
    backend: str | None = None,
    voxel_size: float | None = None,
) -> Backbone:
    """The checkpoint's student, or (``init="random"``) a student of the same architecture and
    voxelisation initialised afresh from ``seed``: the baseline pre-training must beat.
    ``voxel_size``: for a checkpoint that records none (refused without it)."""
    voxel = backbone_voxel_config(path, voxel_size)
    if init == "pretrained":
        net = load_backbone(path, backend=backend)
    elif init == "random":
        cfg, _ = backbone_student_config(path, backend)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_student(cfg)
    else:
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    return Backbone(net, voxel, init, str(path))


def point_features(
    net: nn.Module,
    voxel: VoxelConfig,
    points: torch.Tensor,
    batch: torch.Tensor,
    layers: tuple[int, ...] = (0,),
) -> list[torch.Tensor]:
    """Per-point features of student layers ``layers`` (0 = F_L, 1 = F_{L-1}, ...) of (N, 4)
    points in frames ``batch`` (N,) -> [(N, C_l)]."""
    out = net(voxelize(points, batch, voxel))
    return [out.point_feats[k] for k in layers]


def frame_features(
    backbone: Backbone, points: np.ndarray, layers: tuple[int, ...] = (0,)
) -> list[torch.Tensor]:
    """One frame's (N, 4) points through the backbone in eval mode, without a graph ->
    [(N, C_l)] for student layers ``layers``."""
    with torch.no_grad():
        pts = torch.from_numpy(points)
        batch = torch.zeros(len(pts), dtype=torch.long)
        return point_features(backbone.net.eval(), backbone.voxel, pts, batch, layers)


class SegmentationHead(nn.Module):
    """HilDA Sec. C.2: BatchNorm1d then a linear map to the classes."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(feats))  # (N, C) -> (N, K)


class Segmenter(nn.Module):
    """Backbone + head. ``frozen`` (linear probing): the backbone stays in eval mode (running
    BatchNorm statistics), builds no graph and gets no gradient; only the head trains."""

    def __init__(self, backbone: Backbone, num_classes: int, frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone.net
        self.voxel = backbone.voxel
        self.frozen = frozen
        self.head = SegmentationHead(backbone.net.cfg.stage_channels[0], num_classes)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, points: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """(N, 4) points -> (N, C) final-layer point features."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return point_features(self.backbone, self.voxel, points, batch)[0]

    def forward(self, points: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(points, batch))  # (N, K)
