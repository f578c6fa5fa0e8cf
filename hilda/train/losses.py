"""HilDA losses (Eq. 1, 2, 4) and the teacher-target sampling they need. Pure torch.

Teacher patch grids are sampled bilinearly at each point-pixel pair's uv, which equals
bilinearly up-sampling the grid to the image (align_corners=False) and reading the pixel: the
grid of h x w patches covers the W x H image, pixel centres at integer uv (the devkit's
convention), so u maps to the normalised coordinate (2u + 1) / W - 1; at the borders the
nearest patch row / column is repeated, as up-sampling does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch_scatter import scatter_mean

from hilda.errors import ConfigError

DISTILL_LOSSES = ("cosine", "l2", "kl")  # Table 9 / A13


def sample_grid(
    grid: torch.Tensor, image: torch.Tensor, uv: torch.Tensor, image_size: torch.Tensor
) -> torch.Tensor:
    """Bilinear teacher features at pairs.

    grid (I, h, w, D) patch features of I images; image (Q,) which image each pair sees;
    uv (Q, 2) pixel coordinates in the original image; image_size (I, 2) its (W, H).
    Returns (Q, D).
    """
    if len(uv) == 0:
        return grid.new_zeros((0, grid.shape[-1]))
    size = image_size[image].to(uv.dtype)  # (Q, 2)
    norm = (2 * uv + 1) / size - 1  # (Q, 2) in [-1, 1]
    feats = grid.permute(0, 3, 1, 2).float()  # (I, D, h, w)
    # One image at a time keeps the sampling grid small: (1, 1, Q_i, 2) per image.
    out = grid.new_empty((len(uv), grid.shape[-1]), dtype=torch.float32)
    for i in torch.unique(image).tolist():
        sel = image == i
        g = norm[sel].view(1, 1, -1, 2).float()
        sampled = F.grid_sample(
            feats[i : i + 1], g, mode="bilinear", padding_mode="border", align_corners=False
        )
        out[sel] = sampled[0, :, 0].t()  # (Q_i, D)
    return out


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


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    image: torch.Tensor,
    num_images: int,
    kind: str = "cosine",
) -> torch.Tensor:
    """One layer of Eq. 1: the distance averaged over each image's pairs (1 / |M_c|), then
    over the images that have pairs. student / teacher (Q, D), image (Q,) in [0, num_images)."""
    if len(image) == 0:
        return student.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
    d = pair_distance(student, teacher, kind)  # (Q,)
    per_image = scatter_mean(d, image, dim=0, dim_size=num_images)  # (I,)
    has_pairs = torch.bincount(image, minlength=num_images) > 0
    return per_image[has_pairs].mean()


def multilayer_distill_loss(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 1's 1 / (K + 1) sum over the distilled layers of their per-image means."""
    return torch.stack(per_layer).mean()


def cls_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``student_cls`` (B, D) against the teacher CLS max-pooled over cameras,
    ``teacher_cls`` (B, V, D); the squared error averaged over samples and channels."""
    target = teacher_cls.float().amax(dim=1)  # (B, D)
    return F.mse_loss(student_cls.float(), target)


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
