"""The students: MinkUNet34 (Choy et al. 2019; Pointcept's ``MinkUNet34C``, the default) and
Point Transformer V3 (``arch: ptv3``, ``hilda.models.ptv3``), each on either sparse backend.

One architecture definition, two op sets (``hilda.models.sparse``): the module names, shapes and
forward pass are Pointcept's, so a MinkowskiEngine state dict of this model loads into
Pointcept's ``MinkUNet34C(in_channels=4, out_channels=96)`` unchanged.

Besides the final per-point features the forward returns the earlier decoder stages ("student
layers", HilDA footnote 5): L = final (96 ch, stride 1), L-1 = block7 (96, stride 2), L-2 =
block6 (128, stride 4), L-3 = block5 (256, stride 8), each gathered back to the points through
the voxel containing the point at that stride, so student stage L-k can be paired with teacher
block L-k. The final voxel features are returned too, for BEV pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hilda.errors import ConfigError
from hilda.models.outputs import STAGE_STRIDES, StudentOutput
from hilda.models.ptv3 import PointTransformerV3, PTv3Config
from hilda.models.sparse import SparseOps, load_ops
from hilda.models.voxelize import Voxels, lookup, points_at_stride

__all__ = ["STAGE_STRIDES", "MinkUNet", "StudentConfig", "StudentOutput", "build_student"]


@dataclass(frozen=True)
class StudentConfig:
    arch: Literal["minkunet34", "ptv3"] = "minkunet34"
    backend: str = "minkowski"  # "minkowski" | "spconv": the sparse convolutions of either arch
    in_channels: int = 4
    # MinkUNet34 (arch minkunet34)
    out_channels: int = 96
    init_dim: int = 32
    planes: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    layers: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)
    bn_momentum: float = 0.1
    # Point Transformer V3 (arch ptv3)
    ptv3: PTv3Config = field(default_factory=PTv3Config)

    def __post_init__(self) -> None:
        if len(self.planes) != 8 or len(self.layers) != 8:
            raise ConfigError("MinkUNet needs 8 planes and 8 layer counts (4 down, 4 up)")

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of student layers L, L-1, L-2, L-3."""
        if self.arch == "ptv3":
            return self.ptv3.stage_channels
        return (self.out_channels, self.planes[6], self.planes[5], self.planes[4])


class BasicBlock(nn.Module):
    """ResNet basic block (two 3^3 convolutions) with an optional 1^3 projection shortcut."""

    def __init__(self, ops: SparseOps, cin: int, cout: int, level: int, momentum: float) -> None:
        super().__init__()
        self.ops: SparseOps = ops
        self.conv1 = ops.conv(cin, cout, 3, 1, level)
        self.norm1 = ops.batch_norm(cout, momentum)
        self.conv2 = ops.conv(cout, cout, 3, 1, level)
        self.norm2 = ops.batch_norm(cout, momentum)
        self.relu = ops.relu()
        self.downsample = None
        if cin != cout:
            # Pointcept builds this batch norm with the library default momentum (0.1).
            self.downsample = nn.Sequential(
                ops.conv(cin, cout, 1, 1, level), ops.batch_norm(cout, 0.1)
            )

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.ops.add(out, residual))


class MinkUNet(nn.Module):
    """Sparse residual U-Net: 4 stride-2 encoder stages, 4 transposed-conv decoder stages."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops: SparseOps = load_ops(cfg.backend)
        ops = self.ops
        p, n, m = cfg.planes, cfg.layers, cfg.bn_momentum
        self.conv0p1s1 = ops.conv(cfg.in_channels, cfg.init_dim, 5, 1, 1)
        self.bn0 = ops.batch_norm(cfg.init_dim, 0.1)
        self.relu = ops.relu()
        inplanes = cfg.init_dim
        # Encoder: (down conv, bn, blocks) per level; names as in Pointcept.
        downs = [("conv1p1s2", "bn1", "block1"), ("conv2p2s2", "bn2", "block2")]
        downs += [("conv3p4s2", "bn3", "block3"), ("conv4p8s2", "bn4", "block4")]
        for i, (conv, bn, block) in enumerate(downs):
            level = 2**i  # tensor stride of the down conv's input
            setattr(self, conv, ops.conv(inplanes, inplanes, 2, 2, level))
            setattr(self, bn, ops.batch_norm(inplanes, 0.1))
            setattr(self, block, self._blocks(inplanes, p[i], n[i], 2 * level, m))
            inplanes = p[i]
        # Decoder: transposed conv back to level s, concat the encoder skip, blocks.
        ups = [("convtr4p16s2", "bntr4", "block5"), ("convtr5p8s2", "bntr5", "block6")]
        ups += [("convtr6p4s2", "bntr6", "block7"), ("convtr7p2s2", "bntr7", "block8")]
        skips = (p[2], p[1], p[0], cfg.init_dim)
        for j, (conv, bn, block) in enumerate(ups):
            level = 2 ** (3 - j)  # stride the up conv returns to
            setattr(self, conv, ops.conv_transpose(inplanes, p[4 + j], level))
            setattr(self, bn, ops.batch_norm(p[4 + j], 0.1))
            setattr(self, block, self._blocks(p[4 + j] + skips[j], p[4 + j], n[4 + j], level, m))
            inplanes = p[4 + j]
        self.final = ops.conv(p[7], cfg.out_channels, 1, 1, 1, bias=True)
        self._init_weights()

    def _blocks(self, cin: int, cout: int, count: int, level: int, momentum: float):
        blocks = [BasicBlock(self.ops, cin, cout, level, momentum)]
        blocks += [BasicBlock(self.ops, cout, cout, level, momentum) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # Kaiming normal, fan_out, as Pointcept (ME.utils.kaiming_normal_) does; the same
        # statistics for both layouts: fan_out = out_channels x kernel volume.
        spconv_layout = self.ops.name == "spconv"
        for name, param in self.named_parameters():
            if name.endswith(("kernel", "weight")) and ".bn." not in name and param.ndim >= 2:
                if spconv_layout:  # (out, K, K, K, in)
                    cout, volume = param.shape[0], param[0, ..., 0].numel()
                else:  # (K^3, in, out), or (in, out) for K = 1
                    cout, volume = param.shape[-1], param.shape[0] if param.ndim == 3 else 1
                fan_out = cout * volume
                with torch.no_grad():
                    param.normal_(0.0, (2.0 / fan_out) ** 0.5)
            elif name.endswith(".bn.weight"):
                nn.init.ones_(param)
            elif name.endswith(".bn.bias"):
                nn.init.zeros_(param)

    def forward(self, voxels: Voxels) -> StudentOutput:
        ops = self.ops
        x = ops.make_input(voxels.feats, voxels.coords, voxels.batch_size)
        ops.check_training(x, self)
        out_p1 = self.relu(self.bn0(self.conv0p1s1(x)))
        out_b1p2 = self.block1(self.relu(self.bn1(self.conv1p1s2(out_p1))))
        out_b2p4 = self.block2(self.relu(self.bn2(self.conv2p2s2(out_b1p2))))
        out_b3p8 = self.block3(self.relu(self.bn3(self.conv3p4s2(out_b2p4))))
        out = self.block4(self.relu(self.bn4(self.conv4p8s2(out_b3p8))))  # stride 16
        out = self.relu(self.bntr4(self.convtr4p16s2(out)))
        out_b5p8 = self.block5(ops.cat(out, out_b3p8))  # stride 8
        out = self.relu(self.bntr5(self.convtr5p8s2(out_b5p8)))
        out_b6p4 = self.block6(ops.cat(out, out_b2p4))  # stride 4
        out = self.relu(self.bntr6(self.convtr6p4s2(out_b6p4)))
        out_b7p2 = self.block7(ops.cat(out, out_b1p2))  # stride 2
        out = self.relu(self.bntr7(self.convtr7p2s2(out_b7p2)))
        out = self.final(self.block8(ops.cat(out, out_p1)))  # stride 1
        stages = (out, out_b7p2, out_b6p4, out_b5p8)
        point_feats = [
            self._to_points(stage, voxels, stride)
            for stage, stride in zip(stages, STAGE_STRIDES, strict=True)
        ]
        final_coords = ops.coordinates(out)  # (M, 4)
        return StudentOutput(point_feats, ops.features(out), final_coords)

    def _to_points(self, stage, voxels: Voxels, stride: int) -> torch.Tensor:
        """(N, C) features of the stage's voxel containing each point."""
        rows = lookup(self.ops.coordinates(stage), points_at_stride(voxels.point_coords, stride))
        if bool((rows < 0).any()):  # cannot happen for a U-Net over the points' own voxels
            raise RuntimeError(f"{int((rows < 0).sum())} points have no voxel at stride {stride}")
        return self.ops.features(stage)[rows]


def build_student(cfg: StudentConfig | None = None) -> nn.Module:
    """The student ``cfg.arch`` on ``cfg.backend``: MinkUNet34 as in HilDA Table F2 (the
    defaults), or PTv3 with Pointcept's outdoor settings."""
    cfg = cfg or StudentConfig()
    if cfg.arch == "ptv3":
        return PointTransformerV3(cfg)
    return MinkUNet(cfg)
