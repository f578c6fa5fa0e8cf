"""DDPM schedule, denoiser UNet, history fusion, masking, sampling, and a short training run
(through the trainer's Eq. 3, ``hilda.train.losses.diffusion_loss``)."""

from __future__ import annotations

import pytest
import torch

from hilda.errors import ConfigError
from hilda.models.diffusion import (
    DiffusionConfig,
    DiffusionHead,
    HistoryFusion,
    Schedule,
    UNet2D,
    cosine_betas,
    random_mask,
    timestep_embedding,
)
from hilda.train.losses import diffusion_loss

TINY = DiffusionConfig(base_channels=8, channel_mults=(1, 2), history_channels=8, groups=4)


def test_cosine_schedule_properties() -> None:
    sched = Schedule(cosine_betas(1000))
    abar = sched.abar.double()
    assert len(abar) == 1000
    assert float(abar[0]) > 0.9999 and float(abar[-1]) < 1e-6
    assert bool((abar[1:] < abar[:-1]).all())
    assert bool((sched.betas > 0).all()) and float(sched.betas.max()) <= 0.999 + 1e-6
    # halfway through, the cosine schedule has destroyed about half the signal
    assert 0.4 < float(abar[499]) < 0.6


def test_x0_recovered_from_the_true_noise() -> None:
    sched = Schedule(cosine_betas(1000))
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand((6, 1, 8, 8), generator=g) > 0.5).float()
    noise = torch.randn((6, 1, 8, 8), generator=g)
    tau = torch.tensor([0, 10, 250, 500, 750, 950])
    x_t = sched.q_sample(x0, tau, noise)
    torch.testing.assert_close(sched.predict_x0(x_t, tau, noise), x0, rtol=0, atol=1e-4)
    # the posterior at tau = 0 is x0 itself, deterministically
    mean, var = sched.posterior(x0, x_t, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=0, atol=1e-5)
    assert float(var.abs().max()) == 0.0


def test_respaced_schedule_keeps_abar() -> None:
    sched = Schedule(cosine_betas(1000))
    short, kept = sched.respaced(50)
    assert len(kept) == 50 and int(kept[0]) == 0 and int(kept[-1]) == 999
    torch.testing.assert_close(short.abar, sched.abar[kept], rtol=1e-5, atol=1e-7)


def test_unet_and_fusion_shapes_and_gradients() -> None:
    fusion = HistoryFusion(96, 32)  # paper: 2 x 96 = 192 -> 32 channels
    bev = torch.randn(2, 96, 16, 16, requires_grad=True)
    cond = fusion(bev, bev * 0.5)
    assert cond.shape == (2, 32, 16, 16)
    unet = UNet2D(DiffusionConfig(), in_channels=33)
    x = torch.randn(2, 1, 16, 16)
    eps = unet(torch.cat([x, cond], 1), torch.tensor([3, 900]))
    assert eps.shape == (2, 1, 16, 16)
    eps.square().mean().backward()
    assert bev.grad is not None and float(bev.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in unet.parameters())
    with pytest.raises(ConfigError, match="multiples of 4"):
        unet(torch.randn(1, 33, 10, 10), torch.tensor([1]))
    emb = timestep_embedding(torch.tensor([0, 999]), 16)
    assert emb.shape == (2, 16) and torch.equal(emb[0, :8], torch.ones(8))


def test_masks() -> None:
    g = torch.Generator().manual_seed(0)
    keep = random_mask((4, 1, 64, 64), 0.5, 8, "cpu", g)
    assert 0.4 < float(keep.mean()) < 0.6
    blocks = keep.view(4, 1, 8, 8, 8, 8)
    assert torch.equal(blocks.amax(dim=(3, 5)), blocks.amin(dim=(3, 5)))  # whole 8x8 patches
    with pytest.raises(ConfigError):
        DiffusionConfig(mask="everything")


@pytest.mark.parametrize("mask", ["none", "condition", "input"])
def test_head_loss_terms(mask: str) -> None:
    torch.manual_seed(0)
    cfg = DiffusionConfig(**{**TINY.__dict__, "mask": mask})
    head = DiffusionHead(bev_channels=6, cfg=cfg)
    bev = torch.randn(2, 6, 16, 16, requires_grad=True)
    target = torch.rand(2, 16, 16) > 0.7
    pred = head(bev, bev, target)
    assert pred.eps.shape == pred.noise.shape == pred.x0_hat.shape == (2, 1, 16, 16)
    torch.testing.assert_close(pred.x0, target.float()[:, None])
    assert float(pred.x0_hat.min()) >= cfg.x0_clip[0] and float(pred.x0_hat.max()) <= cfg.x0_clip[1]
    loss = diffusion_loss(pred.eps, pred.noise, pred.x0_hat, pred.x0, cfg.x0_weight)
    torch.testing.assert_close(loss.total, loss.noise + 0.5 * loss.x0)
    loss.total.backward()
    assert float(bev.grad.abs().sum()) > 0


def test_denoiser_learns_a_fixed_target_and_samples_it() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(bev_channels=4, cfg=TINY)
    g = torch.Generator().manual_seed(1)
    bev = torch.randn(2, 4, 16, 16, generator=g)
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 6:10] = 1  # a "car"
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        pred = head(bev, bev, target, generator=g)
        loss = diffusion_loss(pred.eps, pred.noise, pred.x0_hat, pred.x0, TINY.x0_weight)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(float(loss.total.detach()))
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.5 * first, (first, last)
    head.eval()
    sample = head.sample(bev, bev, steps=50, generator=torch.Generator().manual_seed(2))
    assert sample.shape == (2, 16, 16)
    assert float(sample.min()) >= 0 and float(sample.max()) <= 1
    # the reverse process reproduces the learned occupancy better than chance
    iou = ((sample > 0.5) & (target > 0)).sum() / ((sample > 0.5) | (target > 0)).sum()
    assert float(iou) > 0.5, float(iou)
