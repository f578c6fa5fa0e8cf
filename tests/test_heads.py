"""Projection / CLS heads, BEV pooling (aligned with the occupancy target grid), and the
deterministic occupancy decoders of Table 9."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hilda.models.bev import bev_pool
from hilda.models.heads import ClsHead, HeadConfig, ProjectionHead
from hilda.models.occupancy_heads import AlsoHead, SimpleOccupancyDecoder
from hilda.models.voxelize import VoxelConfig, voxelize
from hilda.pipeline.ops.occupancy import OccupancyConfig, rasterise
from tests.models_helpers import random_scene


@pytest.mark.parametrize("depth, linears", [(1, 1), (2, 2), (3, 3)])
def test_projection_head_forms(depth: int, linears: int) -> None:
    head = ProjectionHead(96, 384, HeadConfig(depth=depth, hidden=64))
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds.count("Linear") == linears
    assert kinds.count("LayerNorm") == kinds.count("GELU") == linears - 1
    x = torch.randn(10, 96, requires_grad=True)
    head(x).sum().backward()
    assert head(x).shape == (10, 384) and x.grad is not None


def test_paper_head_sizes() -> None:
    head = ProjectionHead(96, 768)
    shapes = [tuple(m.weight.shape) for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert shapes == [(2048, 96), (2048, 2048), (768, 2048)]


@pytest.mark.parametrize("pooling", ["max", "mean", "attention"])
def test_cls_head_pools_per_sample(pooling: str) -> None:
    torch.manual_seed(0)
    head = ClsHead(8, 5, HeadConfig(depth=2, hidden=16), pooling=pooling)
    feats = torch.randn(7, 8, requires_grad=True)
    batch = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    out = head(feats, batch, 3)
    assert out.shape == (3, 5)
    tokens = head.head(feats)
    for b in range(3):
        sel = tokens[batch == b]
        if pooling == "max":
            torch.testing.assert_close(out[b], sel.max(0).values)
        elif pooling == "mean":
            torch.testing.assert_close(out[b], sel.mean(0))
        else:  # a convex combination of the sample's tokens
            w = torch.softmax(head.score(sel).squeeze(1), 0)
            torch.testing.assert_close(out[b], (w[:, None] * sel).sum(0))
    out.sum().backward()
    assert feats.grad is not None


def test_bev_pool_means_and_zeros() -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 7, 7, 3], [0, 8, 0, 0], [1, 0, 0, 0]])
    origin = torch.tensor([[-16, -16, 0], [0, 0, 0]])
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    bev = bev_pool(feats, coords, origin, batch_size=2, grid=8, stride=8)
    assert bev.shape == (2, 2, 8, 8)
    # sample 0: voxels 0 and 1 share cell floor(-16 / 8) + 4 = 2 (row and col); voxel 2 is
    # one column over; sample 1's voxel is at the grid centre
    torch.testing.assert_close(bev[0, :, 2, 2], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(bev[0, :, 2, 3], torch.tensor([5.0, 6.0]))
    torch.testing.assert_close(bev[1, :, 4, 4], torch.tensor([7.0, 8.0]))
    assert int((bev.abs().sum(1) > 0).sum()) == 3


def test_bev_cells_match_the_occupancy_grid() -> None:
    """Pooled features land in the same cells as the rasterised occupancy of the same points."""
    points = random_scene(4000, 0, extent=40.0)
    occ_cfg = OccupancyConfig(grid=64, cell=0.4 * 4)
    vox = voxelize(points, torch.zeros(len(points), dtype=torch.long), VoxelConfig(0.4))
    bev = bev_pool(torch.ones(len(vox.coords), 1), vox.coords, vox.origin, 1, grid=64, stride=4)
    plane = np.array([0.0, 0.0, 1.0, 2.0])  # z in [-1.7, 0.5] -> 0.3..2.5 m above "ground"
    occ = rasterise(points.numpy().astype(np.float64), plane, occ_cfg)
    assert np.array_equal(bev[0, 0].numpy() > 0, occ)


def test_simple_decoder_and_also_head() -> None:
    torch.manual_seed(0)
    dec = SimpleOccupancyDecoder(bev_channels=6, hidden=8, groups=4)
    bev = torch.randn(2, 6, 16, 16, requires_grad=True)
    target = torch.rand(2, 16, 16) > 0.5
    assert dec.logits(bev, bev).shape == (2, 16, 16)
    dec(bev, bev, target).total.backward()
    assert bev.grad is not None

    also = AlsoHead(feat_channels=16)
    xyz = random_scene(500, 1)[:, :3]
    q, labels = also.queries(xyz)
    assert q.shape == (500, 3, 3) and labels[0].tolist() == [0.0, 1.0, 0.0]
    r = xyz.norm(dim=1)
    torch.testing.assert_close(q[:, 0].norm(dim=1), r - 0.1)  # in front, on the ray
    torch.testing.assert_close(q[:, 1].norm(dim=1), r + 0.1)  # behind
    assert bool((q[:, 2].norm(dim=1) <= r - 0.1 + 1e-5).all())  # in the line of sight
    feats = torch.randn(500, 16, requires_grad=True)
    loss = also(feats, xyz, torch.rand(500))
    torch.testing.assert_close(loss.total, loss.occupancy + loss.intensity)
    loss.total.backward()
    assert feats.grad is not None
