"""Deterministic occupancy decoders, the Table 9 alternatives to the diffusion head.

- ``SimpleOccupancyDecoder``: the fused t-1 / t0 BEV history through a small conv stack to
  future-occupancy logits, binary cross-entropy against the same t+1 target.
- ``AlsoHead``: ALSO-style query-point occupancy (Boulch et al. 2023; CleverDistiller Sec. 3.4).
  For a surface point p seen along the unit ray d from the sensor, q_front = p - delta d is
  empty, q_behind = p + delta d is occupied and q_sight, uniform on the segment sensor..p, is
  empty. An MLP on [feature(p), q - p] predicts each query's occupancy (BCE) and, for the
  occupied query, the point's intensity (MSE); L = L_occ + lambda L_int.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hilda.models.diffusion import HistoryFusion


@dataclass
class OccupancyLoss:
    total: torch.Tensor
    occupancy: torch.Tensor
    intensity: torch.Tensor | None = None


class SimpleOccupancyDecoder(nn.Module):
    def __init__(self, bev_channels: int, hidden: int = 32, groups: int = 8) -> None:
        super().__init__()
        self.history = HistoryFusion(bev_channels, hidden, groups)
        self.decoder = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def logits(self, bev_prev: torch.Tensor, bev_now: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x 2 -> (B, H, W) occupancy logits."""
        return self.decoder(self.history(bev_prev, bev_now))[:, 0]

    def forward(
        self, bev_prev: torch.Tensor, bev_now: torch.Tensor, target: torch.Tensor
    ) -> OccupancyLoss:
        loss = F.binary_cross_entropy_with_logits(
            self.logits(bev_prev, bev_now).float(), target.float()
        )
        return OccupancyLoss(loss, loss)


@dataclass(frozen=True)
class AlsoConfig:
    delta: float = 0.1  # metres in front of / behind the surface
    hidden: int = 128
    max_points: int = 8192  # surface points sampled per batch
    intensity_weight: float = 1.0  # lambda


class AlsoHead(nn.Module):
    def __init__(self, feat_channels: int, cfg: AlsoConfig = AlsoConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.mlp = nn.Sequential(
            nn.Linear(feat_channels + 3, cfg.hidden),
            nn.LayerNorm(cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.LayerNorm(cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, 2),  # occupancy logit, intensity
        )

    def queries(
        self, xyz: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) surface points (sensor at the origin) -> (N, 3, 3) queries, (N, 3) labels."""
        dist = xyz.norm(dim=1, keepdim=True).clamp(min=1e-6)
        ray = xyz / dist  # (N, 3)
        front = xyz - self.cfg.delta * ray
        behind = xyz + self.cfg.delta * ray
        u = torch.rand((len(xyz), 1), device=xyz.device, generator=generator)
        sight = u * (dist - self.cfg.delta).clamp(min=0) * ray
        q = torch.stack([front, behind, sight], dim=1)  # (N, 3, 3)
        labels = torch.tensor([0.0, 1.0, 0.0], device=xyz.device).expand(len(xyz), 3)
        return q, labels

    def forward(
        self,
        feats: torch.Tensor,
        xyz: torch.Tensor,
        intensity: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> OccupancyLoss:
        """feats (N, C) point features, xyz (N, 3) in the sensor frame, intensity (N,) scaled."""
        if len(xyz) > self.cfg.max_points:
            pick = torch.randperm(len(xyz), device=xyz.device, generator=generator)
            pick = pick[: self.cfg.max_points]
            feats, xyz, intensity = feats[pick], xyz[pick], intensity[pick]
        q, labels = self.queries(xyz, generator)  # (N, 3, 3), (N, 3)
        rel = q - xyz[:, None]  # (N, 3, 3)
        x = torch.cat([feats[:, None].expand(-1, 3, -1), rel], dim=2)  # (N, 3, C + 3)
        out = self.mlp(x).float()  # (N, 3, 2)
        occ = F.binary_cross_entropy_with_logits(out[..., 0], labels)
        inten = F.mse_loss(out[:, 1, 1], intensity.float())
        return OccupancyLoss(occ + self.cfg.intensity_weight * inten, occ, inten)
