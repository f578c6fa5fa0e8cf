"""Eq. 1 / 2 / 4 against hand-computed values; teacher sampling equals upsample-then-index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hilda.train.losses import (
    LossWeights,
    cls_loss,
    distill_loss,
    multilayer_distill_loss,
    sample_grid,
    total_loss,
)


def test_sampling_equals_bilinear_upsampling_then_indexing() -> None:
    torch.manual_seed(0)
    grid = torch.randn(2, 4, 6, 5)  # 2 images, 4 x 6 patches, D = 5
    size = torch.tensor([[84, 56], [84, 56]])  # W, H: 14 px patches
    up = F.interpolate(grid.permute(0, 3, 1, 2), size=(56, 84), mode="bilinear")  # (2,D,H,W)
    u = torch.randint(0, 84, (50,))
    v = torch.randint(0, 56, (50,))
    image = torch.randint(0, 2, (50,))
    uv = torch.stack([u, v], 1).float()
    got = sample_grid(grid, image, uv, size)
    expect = up[image, :, v, u]  # (50, D) pixel centres at integer uv
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_distill_loss_is_eq1() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    image = torch.tensor([0, 0, 0, 2])  # image 1 has no pairs and does not count
    # image 0: 1 - cos = 0, 1, 1 - 1/sqrt(2) -> mean; image 2: 1 - (-1) = 2
    img0 = (0 + 1 + (1 - 2**-0.5)) / 3
    expect = (img0 + 2.0) / 2
    torch.testing.assert_close(distill_loss(s, t, image, 3), torch.tensor(expect))
    layers = [distill_loss(s, t, image, 3), torch.tensor(0.5)]
    torch.testing.assert_close(multilayer_distill_loss(layers), (torch.tensor(expect) + 0.5) / 2)
    # l2 and KL variants: zero at equality, positive otherwise
    for kind in ("l2", "kl"):
        assert float(distill_loss(t, t, image, 3, kind)) == pytest.approx(0.0, abs=1e-7)
        assert float(distill_loss(s, t, image, 3, kind)) > 0


def test_cls_loss_is_eq2_with_camera_max_pool() -> None:
    teacher = torch.tensor([[[1.0, -2.0], [0.0, 3.0]]])  # (B=1, V=2, D=2) -> max [1, 3]
    student = torch.tensor([[2.0, 1.0]])
    torch.testing.assert_close(cls_loss(student, teacher), torch.tensor((1.0 + 4.0) / 2))


def test_total_loss_is_eq4() -> None:
    terms = {"distill": torch.tensor(2.0), "cls": torch.tensor(4.0), "aux": torch.tensor(1.0)}
    torch.testing.assert_close(total_loss(terms, LossWeights()), torch.tensor(2 + 0.2 + 1.0))
