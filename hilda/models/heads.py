"""Projection heads from student layers to teacher dimensions, and the CLS head.

``depth=3`` is HilDA / CleverDistiller's head (Linear-LN-GELU x2, then Linear, hidden 2048); a
linear (``depth=1``) and a 2-layer head are the ablations of CleverDistiller Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hilda.errors import ConfigError
from hilda.models.scatter import scatter_max, scatter_mean, scatter_softmax, scatter_sum

POOLINGS = ("max", "mean", "attention")


@dataclass(frozen=True)
class HeadConfig:
    depth: int = 3  # 1 = linear, 2, 3 (paper)
    hidden: int = 2048

    def __post_init__(self) -> None:
        if self.depth not in (1, 2, 3):
            raise ConfigError(f"head depth must be 1, 2 or 3, got {self.depth}")


class ProjectionHead(nn.Module):
    """(N, C_in) -> (N, D): MLP with LayerNorm and GELU between its linear layers."""

    def __init__(self, cin: int, cout: int, cfg: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cin
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(width, cfg.hidden), nn.LayerNorm(cfg.hidden), nn.GELU()]
            width = cfg.hidden
        layers.append(nn.Linear(width, cout))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ClsHead(nn.Module):
    """Scene "CLS token" of a LiDAR sample: head on every point, then pooled per sample.

    ``max`` is HilDA's global max-pool (Eq. 2); ``mean`` and ``attention`` (a learnable query
    scoring each point, softmax over the sample's points) are Table 9's pooling ablations.
    """

    def __init__(
        self, cin: int, cout: int, cfg: HeadConfig = HeadConfig(), pooling: str = "max"
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"CLS pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.head = ProjectionHead(cin, cout, cfg)
        self.score = nn.Linear(cout, 1) if pooling == "attention" else None

    def forward(self, feats: torch.Tensor, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """feats (N, C_in), batch (N,) sample ids -> (B, D)."""
        tokens = self.head(feats)  # (N, D)
        return pool_points(tokens, batch, batch_size, self.pooling, self.score)


def pool_points(
    tokens: torch.Tensor,
    batch: torch.Tensor,
    batch_size: int,
    pooling: str = "max",
    score: nn.Module | None = None,
) -> torch.Tensor:
    """(N, D) point tokens -> (B, D) per-sample pooled tokens."""
    if pooling == "max":
        return scatter_max(tokens, batch, batch_size)
    if pooling == "mean":
        return scatter_mean(tokens, batch, batch_size)
    if pooling == "attention":
        if score is None:
            raise ConfigError("attention pooling needs a scoring layer")
        weights = scatter_softmax(score(tokens).squeeze(1), batch)  # (N,)
        return scatter_sum(tokens * weights[:, None], batch, batch_size)
    raise ConfigError(f"unknown pooling {pooling!r}")
