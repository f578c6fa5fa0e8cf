"""Temporal occupancy diffusion (HilDA Sec. 3.4, C.1): history fusion, a lightweight 2D UNet
denoiser, a cosine-schedule DDPM with the hybrid loss of Eq. 3, and reverse sampling.

x_occ in {0, 1}^(H x W) is noised as x_tau = sqrt(abar) x_occ + sqrt(1 - abar) eps; the UNet
sees [x_tau, C_history] and predicts eps; x0 is recovered by inverting the forward process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hilda.errors import ConfigError

MASKS = ("none", "condition", "input")  # Table A10


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    x0_weight: float = 0.5  # lambda of Eq. 3
    history_channels: int = 32  # C_history (192 -> 32 in the paper)
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4)
    blocks_per_level: int = 1
    time_dim: int = 16  # sinusoidal embedding size (paper: 16)
    groups: int = 8  # GroupNorm groups
    mask: str = "none"  # Table A10: "condition" masks C_history, "input" masks x_tau
    mask_rate: float = 0.5
    mask_patch: int = 1  # masking granularity in BEV cells
    # The x0 estimate divides by sqrt(abar_tau), ~3e-5 at tau = T: bounding it to a band
    # around the data range keeps the Eq. 3 reconstruction term from exploding at high tau.
    x0_clip: tuple[float, float] = (-1.0, 2.0)

    def __post_init__(self) -> None:
        if self.mask not in MASKS:
            raise ConfigError(f"diffusion mask must be one of {MASKS}, got {self.mask!r}")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate must be in [0, 1), got {self.mask_rate}")
        if self.history_channels % self.groups or self.base_channels % self.groups:
            raise ConfigError("history and base channels must be multiples of the norm groups")


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """(T,) float64 betas of the cosine schedule (Nichol & Dhariwal 2021)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class Schedule(nn.Module):
    """DDPM forward process and posterior, tau indexed 0 .. T-1 (tau = 0 is step 1)."""

    def __init__(self, betas: torch.Tensor) -> None:
        super().__init__()
        betas = betas.double()
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        buffers = {
            "betas": betas,
            "abar": abar,
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "post_var": betas * (1 - abar_prev) / (1 - abar),
            "post_c0": betas * abar_prev.sqrt() / (1 - abar),
            "post_ct": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    def _at(self, name: str, tau: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[tau].view(-1, 1, 1, 1)  # (B, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, tau: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_tau (B, 1, H, W) from x0 at steps tau (B,)."""
        return self._at("sqrt_abar", tau) * x0 + self._at("sqrt_one_minus_abar", tau) * noise

    def predict_x0(self, x_t: torch.Tensor, tau: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process with a noise estimate."""
        return (x_t - self._at("sqrt_one_minus_abar", tau) * eps) / self._at("sqrt_abar", tau)

    def posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{tau-1} | x_tau, x0)."""
        mean = self._at("post_c0", tau) * x0 + self._at("post_ct", tau) * x_t
        return mean, self._at("post_var", tau)

    def respaced(self, steps: int) -> tuple[Schedule, torch.Tensor]:
        """A schedule over ``steps`` evenly spaced original steps (same abar at each kept step),
        for sampling in fewer steps; returns it with the kept original indices."""
        kept = torch.linspace(0, self.timesteps - 1, steps).round().long().unique()
        abar = self.abar.double()[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return Schedule(1 - abar / prev), kept


def timestep_embedding(tau: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) steps -> (B, dim) sinusoidal embedding (as in DDPM / transformers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=tau.device) / half)
    args = tau.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with the time embedding added in between; 1x1 skip if needed."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet2D(nn.Module):
    """Lightweight denoiser: input [x_tau, C_history] (B, 1 + C, H, W) -> eps (B, 1, H, W).

    H and W must be divisible by 2^(len(channel_mults) - 1).
    """

    def __init__(self, cfg: DiffusionConfig, in_channels: int, out_channels: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        emb_dim = 4 * cfg.time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width, skips = widths[0], []
        for i, w in enumerate(widths):
            level = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                level.append(ResBlock(width, w, emb_dim, cfg.groups))
                width = w
            self.down_blocks.append(level)
            skips.append(width)
            last = i == len(widths) - 1
            self.downsamples.append(
                nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1)
            )
        self.mid = ResBlock(width, width, emb_dim, cfg.groups)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up_blocks.append(ResBlock(width + skips[i], w, emb_dim, cfg.groups))
            width = w
            first = i == 0
            self.upsamples.append(
                nn.Identity()
                if first
                else nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(width, width, 3, padding=1),
                )
            )
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.groups, width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.cfg.channel_mults) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ConfigError(f"UNet input sides must be multiples of {factor}, got {x.shape}")
        emb = self.time_mlp(timestep_embedding(tau, self.cfg.time_dim))  # (B, E)
        h = self.stem(x)
        skips = []
        for blocks, down in zip(self.down_blocks, self.downsamples, strict=True):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, up in zip(self.up_blocks, self.upsamples, strict=True):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)
        return self.out(h)


class HistoryFusion(nn.Module):
    """[BEV_{t-1}, BEV_t0] (B, 2C, H, W) -> C_history (B, 32, H, W): 1x1 conv, GroupNorm, SiLU."""

    def __init__(self, bev_channels: int, out_channels: int = 32, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(2 * bev_channels, out_channels, 1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
        )

    def forward(self, bev_prev: torch.Tensor, bev_now: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([bev_prev, bev_now], dim=1))


def random_mask(
    shape: tuple[int, ...], rate: float, patch: int, device, generator=None
) -> torch.Tensor:
    """(B, 1, H, W) float keep-mask: patches of ``patch`` cells dropped with probability rate."""
    b, _, h, w = shape
    coarse = (h + patch - 1) // patch, (w + patch - 1) // patch
    keep = torch.rand((b, 1, *coarse), device=device, generator=generator) >= rate
    keep = keep.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return keep[:, :, :h, :w].float()


@dataclass
class DiffusionPrediction:
    """What Eq. 3 compares (``hilda.train.losses.diffusion_loss``), all (B, 1, H, W)."""

    eps: torch.Tensor  # the denoiser's noise estimate
    noise: torch.Tensor  # the noise drawn
    x0_hat: torch.Tensor  # the x0 implied by eps, clipped to x0_clip
    x0: torch.Tensor  # the target occupancy


@dataclass
class DiffusionDraws:
    """The random parts of one Eq. 3 evaluation, drawn outside so that they can be a function
    of each sample alone (``draw_per_sample``)."""

    tau: torch.Tensor  # (B,) int64 steps in [0, T)
    noise: torch.Tensor  # (B, 1, H, W)
    keep: torch.Tensor | None = None  # (B, 1, H, W) Table A10 keep-mask


def draw_per_sample(
    seeds: list[int], size: tuple[int, int], cfg: DiffusionConfig, device: torch.device | str
) -> DiffusionDraws:
    """tau, noise and mask of each sample from its own seed (CPU generators, then moved), so
    a sample gets the same draw in any batch, process layout or resumed run."""
    taus, noises, keeps = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        taus.append(torch.randint(0, cfg.timesteps, (1,), generator=g))
        noises.append(torch.randn((1, 1, *size), generator=g))
        if cfg.mask != "none":
            keeps.append(random_mask((1, 1, *size), cfg.mask_rate, cfg.mask_patch, "cpu", g))
    keep = torch.cat(keeps).to(device) if keeps else None
    return DiffusionDraws(torch.cat(taus).to(device), torch.cat(noises).to(device), keep)


class DiffusionHead(nn.Module):
    """Eq. 3 on future BEV occupancy, conditioned on the fused t-1 / t0 BEV features."""

    def __init__(self, bev_channels: int, cfg: DiffusionConfig = DiffusionConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.history = HistoryFusion(bev_channels, cfg.history_channels, cfg.groups)
        self.denoiser = UNet2D(cfg, in_channels=1 + cfg.history_channels)
        self.schedule = Schedule(cosine_betas(cfg.timesteps))

    def forward(
        self,
        bev_prev: torch.Tensor,
        bev_now: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
        draws: DiffusionDraws | None = None,
    ) -> DiffusionPrediction:
        """bev_* (B, C, H, W) pooled student features; target (B, H, W) occupancy in {0, 1}.
        ``draws`` fixes tau / noise / mask; otherwise they come from ``generator``. Returns
        the denoiser's prediction at a noised target, which Eq. 3 scores."""
        cond = self.history(bev_prev, bev_now)  # (B, 32, H, W)
        x0 = target.float()[:, None]  # (B, 1, H, W)
        b, dev = x0.shape[0], x0.device
        cfg = self.cfg
        if draws is None:
            tau = torch.randint(0, self.schedule.timesteps, (b,), device=dev, generator=generator)
            noise = torch.randn(x0.shape, device=dev, generator=generator, dtype=x0.dtype)
            keep = None
            if cfg.mask != "none":
                keep = random_mask(x0.shape, cfg.mask_rate, cfg.mask_patch, dev, generator)
            draws = DiffusionDraws(tau, noise, keep)
        tau, noise = draws.tau, draws.noise
        x_t = self.schedule.q_sample(x0, tau, noise)
        if cfg.mask != "none" and self.training and draws.keep is not None:
            if cfg.mask == "condition":
                cond = cond * draws.keep
            else:
                x_t = x_t * draws.keep
        eps = self.denoiser(torch.cat([x_t, cond], dim=1), tau).float()  # (B, 1, H, W)
        x0_hat = self.schedule.predict_x0(x_t, tau, eps).clamp(*cfg.x0_clip)
        return DiffusionPrediction(eps, noise, x0_hat, x0)

    @torch.no_grad()
    def sample(
        self,
        bev_prev: torch.Tensor,
        bev_now: torch.Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reverse process from pure noise -> (B, H, W) occupancy estimate in [0, 1].

        ``steps`` < T samples on an evenly respaced sub-schedule (same abar at kept steps).
        """
        cond = self.history(bev_prev, bev_now)
        schedule, kept = self.schedule, torch.arange(self.schedule.timesteps)
        if steps is not None and steps < schedule.timesteps:
            schedule, kept = schedule.respaced(steps)
            schedule = schedule.to(cond.device)
        b, _, h, w = cond.shape
        x = torch.randn((b, 1, h, w), device=cond.device, generator=generator)
        for i in reversed(range(len(kept))):
            idx = torch.full((b,), i, device=cond.device, dtype=torch.long)
            tau = kept.to(cond.device)[idx]  # the denoiser is conditioned on original steps
            eps = self.denoiser(torch.cat([x, cond], dim=1), tau).float()
            x0 = schedule.predict_x0(x, idx, eps).clamp(0.0, 1.0)
            mean, var = schedule.posterior(x0, x, idx)
            if i > 0:
                noise = torch.randn(x.shape, device=x.device, generator=generator)
                x = mean + var.sqrt() * noise
            else:
                x = mean
        return x[:, 0].clamp(0.0, 1.0)
