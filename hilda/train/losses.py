"""HilDA's losses (Eq. 1-4) and the teacher targets they need: the one implementation the
trainer calls (``hilda.train.model``) and the tests check against hand-computed values. Pure
torch.

Every loss reduces its per-image / per-sample values with ``reduce``: by default their mean
(``batch_mean``); the trainer passes ``hilda.engine.distributed.global_mean``, this process's
share of the mean over the global batch, so DDP with any process count trains like one process.

Teacher patch grids are sampled bilinearly at each point-pixel pair's uv, which equals
bilinearly up-sampling the grid to the image (align_corners=False) and reading the pixel: the
grid of h x w patches covers the W x H image, pixel centres at integer uv (the devkit's
convention), so u maps to the normalised coordinate (2u + 1) / W - 1; at the borders the
nearest patch row / column is repeated, as up-sampling does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hilda.errors import ConfigError
from hilda.models.grid import sample_grid
from hilda.models.scatter import scatter_max, scatter_mean

DISTILL_LOSSES = ("cosine", "l2", "kl")  # Table 9 / A13

Reduce = Callable[[torch.Tensor], torch.Tensor]  # (n,) -> scalar


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """(n,) -> their mean; an empty batch gives 0 still attached to the graph (so DDP's
    gradient buckets stay complete)."""
    return values.mean() if len(values) else values.sum() * 0.0


def pair_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """(Q, D) x 2 -> (Q,) per-pair distance."""
    if kind == "cosine":  # Eq. 1's 1 - cos
        return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=1, eps=1e-8)
    if kind == "l2":  # squared distance, feature magnitudes included
        return (student.float() - teacher.float()).square().mean(dim=1)
    if kind == "kl":  # KL(softmax(teacher) || softmax(student)) over channels
        return F.kl_div(
            F.log_softmax(student.float(), dim=1),
            F.log_softmax(teacher.float(), dim=1),
            log_target=True,
            reduction="none",
        ).sum(dim=1)
    raise ConfigError(f"distillation loss must be one of {DISTILL_LOSSES}, got {kind!r}")


def teacher_targets(
    grid: torch.Tensor,
    image: torch.Tensor,
    uv: torch.Tensor,
    image_size: torch.Tensor,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1's targets of one teacher block: ``sample_grid`` at the pairs, minus ``mean`` (D,)
    when the targets are centred (``loss.center_teacher``). Returns (Q, D)."""
    target = sample_grid(grid, image, uv, image_size)  # (Q, D)
    return target if mean is None else target - mean


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    image: torch.Tensor,
    num_images: int,
    kind: str = "cosine",
    reduce: Reduce = batch_mean,
) -> torch.Tensor:
    """One layer of Eq. 1: the distance averaged over each image's pairs (1 / |M_c|), then
    ``reduce`` over the images that have pairs. student / teacher (Q, D), image (Q,) in
    [0, num_images)."""
    d = pair_distance(student, teacher, kind)  # (Q,)
    per_image = scatter_mean(d, image, num_images)  # (I,)
    has_pairs = torch.bincount(image, minlength=num_images) > 0  # (I,)
    return reduce(per_image[has_pairs])


def multilayer_distill_loss(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 1's 1 / (K + 1) sum over the distilled layers of their per-image means."""
    return torch.stack(per_layer).mean()


def cls_loss(
    student_cls: torch.Tensor, teacher_cls: torch.Tensor, reduce: Reduce = batch_mean
) -> torch.Tensor:
    """Eq. 2: ``student_cls`` (B, D) against the teacher CLS max-pooled over cameras,
    ``teacher_cls`` (B, V, D); the squared error averaged over channels, then ``reduce`` over
    the B clouds."""
    target = teacher_cls.float().amax(dim=1)  # (B, D)
    return reduce((student_cls.float() - target).square().mean(dim=1))


def cls_loss_per_image(
    tokens: torch.Tensor,
    image: torch.Tensor,
    teacher_cls: torch.Tensor,
    reduce: Reduce = batch_mean,
) -> torch.Tensor:
    """Eq. 2's per-frustum variant (Table 9, "per-image"): the student's point tokens (Q, D)
    max-pooled over the pairs of each image ``image`` (Q,) against that image's CLS token,
    ``teacher_cls`` (B, V, D) with image = cloud * V + camera; images without pairs are left
    out."""
    images = teacher_cls.shape[0] * teacher_cls.shape[1]
    pooled = scatter_max(tokens, image, images)  # (I, D)
    has_pairs = torch.bincount(image, minlength=images) > 0  # (I,)
    target = teacher_cls.float().reshape(images, -1)  # (I, D)
    return reduce((pooled.float() - target).square().mean(dim=1)[has_pairs])


@dataclass
class DiffusionTerms:
    """Eq. 3 and its two parts, each already reduced over the batch."""

    total: torch.Tensor  # noise + lambda * x0
    noise: torch.Tensor
    x0: torch.Tensor


def diffusion_loss(
    eps: torch.Tensor,
    noise: torch.Tensor,
    x0_hat: torch.Tensor,
    x0: torch.Tensor,
    x0_weight: float,
    reduce: Reduce = batch_mean,
) -> DiffusionTerms:
    """Eq. 3, the hybrid DDPM loss on (B, 1, H, W) grids: ||eps_theta - eps||^2 +
    lambda ||x0_hat - x0||^2, each a mean over cells per sample, then ``reduce`` over samples.
    ``x0_hat`` is the x0 implied by ``eps`` (already clipped, ``Schedule.predict_x0``)."""
    noise_ps = (eps.float() - noise.float()).square().mean(dim=(1, 2, 3))  # (B,)
    x0_ps = (x0_hat.float() - x0.float()).square().mean(dim=(1, 2, 3))  # (B,)
    return DiffusionTerms(
        reduce(noise_ps + x0_weight * x0_ps), reduce(noise_ps).detach(), reduce(x0_ps).detach()
    )


@dataclass(frozen=True)
class LossWeights:
    distill: float = 1.0  # omega_ds
    cls: float = 0.05  # omega_gl
    aux: float = 1.0  # omega_df (diffusion or its Table 9 replacement)


def total_loss(terms: dict[str, torch.Tensor], w: LossWeights) -> torch.Tensor:
    """Eq. 4 over the terms present (``distill``, ``cls``, ``aux``)."""
    weights = {"distill": w.distill, "cls": w.cls, "aux": w.aux}
    unknown = set(terms) - set(weights)
    if unknown:
        raise ConfigError(f"unknown loss terms {sorted(unknown)}")
    return sum(weights[k] * v for k, v in terms.items())
