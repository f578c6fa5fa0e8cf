"""Small inputs for the model tests."""

from __future__ import annotations

import pytest
import torch

from hilda.models.sparse import BACKENDS, backend_installed


def backend_params():
    """Parametrise over both backends; one not installed is reported as a skip."""
    return [
        pytest.param(
            b, marks=pytest.mark.skipif(not backend_installed(b), reason=f"{b} not installed")
        )
        for b in BACKENDS
    ]


def random_scene(n: int, seed: int, extent: float = 6.0) -> torch.Tensor:
    """(n, 4) points on a few surfaces (ground, walls, a box) in a small scene, intensities."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 3, (n,), generator=g)
    xy = (torch.rand((n, 2), generator=g) * 2 - 1) * extent
    z = torch.where(kind == 0, torch.zeros(n) - 1.7, torch.rand(n, generator=g) * 2 - 1.5)
    xy[kind == 1, 0] = extent * 0.8  # a wall
    box = kind == 2
    xy[box] = xy[box] * 0.2 + torch.tensor([2.0, -1.0])
    pts = torch.cat([xy, z[:, None], torch.rand((n, 1), generator=g) * 255], dim=1)
    return pts.float()


def batch_of(*clouds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.cat(clouds)
    batch = torch.cat([torch.full((len(c),), i) for i, c in enumerate(clouds)])
    return points, batch


def check_gradient(loss, param, index, h: float, rtol: float, atol: float) -> None:
    """``param.grad[index]`` (from a backward of ``loss()`` already run) against the central
    finite difference of ``loss()`` in that entry."""
    with torch.no_grad():
        param[index] += h
        up = float(loss())
        param[index] -= 2 * h
        down = float(loss())
        param[index] += h
    numeric = (up - down) / (2 * h)
    assert abs(float(param.grad[index]) - numeric) <= rtol * abs(numeric) + atol
