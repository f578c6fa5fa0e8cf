"""Eq. 1-4 against hand-computed values, through the functions the trainer calls; and the
trainer's loss terms on a real batch against the same equations computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hilda.engine.config_io import load_config
from hilda.models.grid import sample_grid
from hilda.models.voxelize import voxelize
from hilda.train.config import TrainConfig
from hilda.train.data import CacheDataset, check_cache, collate, sample_index, teacher_means
from hilda.train.losses import (
    LossWeights,
    batch_mean,
    cls_loss,
    cls_loss_per_image,
    diffusion_loss,
    distill_loss,
    multilayer_distill_loss,
    teacher_targets,
    total_loss,
)
from hilda.train.model import HildaModel
from tests.train_helpers import CONFIGS, SMALL


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


def test_centred_targets_by_hand() -> None:
    # One 28 x 28 image of 2 x 2 patches; a patch's centre pixel (6.5, 20.5) reads it exactly.
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])  # (1, 2, 2, 2)
    uv = torch.tensor([[6.5, 6.5], [20.5, 6.5], [6.5, 20.5], [13.5, 6.5]])
    image = torch.zeros(4, dtype=torch.long)
    size = torch.tensor([[28.0, 28.0]])
    plain = teacher_targets(grid, image, uv, size)
    # row 0 col 0; row 0 col 1; row 1 col 0; halfway between row 0's two patches
    expect = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [2.0, 3.0]])
    torch.testing.assert_close(plain, expect)
    mean = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(teacher_targets(grid, image, uv, size, mean), expect - mean)


def test_distill_loss_is_eq1() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    image = torch.tensor([0, 0, 0, 2])  # image 1 has no pairs and does not count
    # image 0: 1 - cos = 0, 1, 1 - 1/sqrt(2) -> mean; image 2: 1 - (-1) = 2
    img0 = (0 + 1 + (1 - 2**-0.5)) / 3
    expect = (img0 + 2.0) / 2
    torch.testing.assert_close(distill_loss(s, t, image, 3), torch.tensor(expect))
    # The reduction over images is the caller's (the trainer's global-batch mean).
    torch.testing.assert_close(
        distill_loss(s, t, image, 3, reduce=torch.sum), torch.tensor(img0 + 2)
    )
    layers = [distill_loss(s, t, image, 3), torch.tensor(0.5)]
    torch.testing.assert_close(multilayer_distill_loss(layers), (torch.tensor(expect) + 0.5) / 2)
    # l2 (mean squared difference over channels) and KL by hand on image 2's pair
    torch.testing.assert_close(
        distill_loss(s[3:], t[3:], image[3:], 3, "l2"), torch.tensor((3.0**2 + 0.0) / 2)
    )
    p_t, p_s = torch.softmax(t[3], 0), torch.softmax(s[3], 0)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    torch.testing.assert_close(distill_loss(s[3:], t[3:], image[3:], 3, "kl"), kl)
    # No pairs: zero, still attached to the graph.
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = distill_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long), 3)
    assert float(loss) == 0.0 and loss.requires_grad


def test_cls_loss_is_eq2_with_camera_max_pool() -> None:
    teacher = torch.tensor([[[1.0, -2.0], [0.0, 3.0]]])  # (B=1, V=2, D=2) -> max [1, 3]
    student = torch.tensor([[2.0, 1.0]])
    torch.testing.assert_close(cls_loss(student, teacher), torch.tensor((1.0 + 4.0) / 2))
    two = torch.cat([teacher, teacher])  # a second cloud with error 0
    got = cls_loss(torch.tensor([[2.0, 1.0], [1.0, 3.0]]), two, reduce=torch.sum)
    torch.testing.assert_close(got, torch.tensor(2.5))


def test_cls_loss_per_image_by_hand() -> None:
    tokens = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 2.0]])  # (Q=3, D=2)
    image = torch.tensor([0, 0, 1])  # cloud 0's two cameras; cloud 1 (images 2, 3) unseen
    teacher = torch.tensor([[[1.0, 1.0], [2.0, 4.0]], [[9.0, 9.0], [9.0, 9.0]]])  # (2, 2, 2)
    # image 0: max-pool [3, 5] vs [1, 1] -> (4 + 16) / 2 = 10; image 1: [2, 2] vs [2, 4] -> 2
    torch.testing.assert_close(cls_loss_per_image(tokens, image, teacher), torch.tensor(6.0))
    torch.testing.assert_close(
        cls_loss_per_image(tokens, image, teacher, reduce=torch.sum), torch.tensor(12.0)
    )


def test_diffusion_loss_is_eq3() -> None:
    eps = torch.tensor([1.0, -1.0, 0.0, 2.0]).view(2, 1, 1, 2)
    noise = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(2, 1, 1, 2)
    x0_hat = torch.tensor([0.5, 1.0, 0.0, 0.0]).view(2, 1, 1, 2)
    x0 = torch.tensor([0.0, 1.0, 1.0, 1.0]).view(2, 1, 1, 2)
    # sample 0: noise (1 + 1) / 2 = 1, x0 0.25 / 2; sample 1: noise 4 / 2 = 2, x0 2 / 2 = 1
    res = diffusion_loss(eps, noise, x0_hat, x0, x0_weight=0.5)
    torch.testing.assert_close(res.noise, torch.tensor(1.5))
    torch.testing.assert_close(res.x0, torch.tensor((0.125 + 1.0) / 2))
    torch.testing.assert_close(res.total, torch.tensor(((1 + 0.0625) + (2 + 0.5)) / 2))
    summed = diffusion_loss(eps, noise, x0_hat, x0, 0.5, reduce=torch.sum)
    torch.testing.assert_close(summed.total, torch.tensor(1.0625 + 2.5))


def test_total_loss_is_eq4() -> None:
    terms = {"distill": torch.tensor(2.0), "cls": torch.tensor(4.0), "aux": torch.tensor(1.0)}
    torch.testing.assert_close(total_loss(terms, LossWeights()), torch.tensor(2 + 0.2 + 1.0))


def test_batch_mean() -> None:
    torch.testing.assert_close(batch_mean(torch.tensor([1.0, 2.0, 6.0])), torch.tensor(3.0))
    assert float(batch_mean(torch.zeros(0))) == 0.0


# --- the trainer's terms on a real batch, recomputed by hand ----------------------------------


def _upsampled_targets(grid: torch.Tensor, image: torch.Tensor, uv: torch.Tensor, size):
    """Eq. 1 targets the slow way, pair by pair: bilinear interpolation of the image's patch
    grid at the pair's pixel, as up-sampling with align_corners=False places it (pixel
    centres at integer uv; the border patches repeat)."""
    out = []
    for q in range(len(image)):
        i = int(image[q])
        w, h = (float(x) for x in size[i])
        gh, gw = grid.shape[1:3]
        # pixel centre u -> patch-grid coordinate (u + 0.5) * gw / w - 0.5, clamped as border
        x = min(max((float(uv[q, 0]) + 0.5) * gw / w - 0.5, 0.0), gw - 1.0)
        y = min(max((float(uv[q, 1]) + 0.5) * gh / h - 0.5, 0.0), gh - 1.0)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        x1, y1 = min(x0 + 1, gw - 1), min(y0 + 1, gh - 1)
        fx, fy = x - x0, y - y0
        g = grid[i].double()
        top = (1 - fx) * g[y0, x0] + fx * g[y0, x1]
        bottom = (1 - fx) * g[y1, x0] + fx * g[y1, x1]
        out.append((1 - fy) * top + fy * bottom)
    return torch.stack(out)


@pytest.mark.parametrize("cls_pooling", ["max", "per_image"])
def test_model_terms_equal_eq1_eq2_by_hand(train_store: str, cls_pooling: str) -> None:
    cfg = load_config(
        TrainConfig,
        CONFIGS / "tiny_cpu.yaml",
        [
            *SMALL,
            "data.teacher=vits",
            "data.max_pairs_per_image=40",
            "loss.center_teacher=true",
            f"loss.cls_pooling={cls_pooling}",
            "loss.aux=none",
        ],
    )
    info = check_cache(train_store, cfg)
    samples = sample_index(train_store, info, False)
    means = teacher_means(info, samples.frames, count=len(samples.frames))
    batch = collate([CacheDataset(cfg, info, samples)[(i, 0)] for i in range(2)])
    torch.manual_seed(0)
    model = HildaModel(cfg, info.teacher_dim, means).eval()
    with torch.no_grad():
        terms = model(batch)
        feats = model.student(voxelize(batch.points, batch.cloud, cfg.model.voxel)).point_feats
    images = batch.teacher_cls.shape[0] * batch.teacher_cls.shape[1]
    per_pair = []
    for pair, head in zip(cfg.loss.distill, model.heads, strict=True):
        with torch.no_grad():
            student = head(feats[pair.student][batch.pair_point]).double()
        target = torch.cat(
            [
                _upsampled_targets(
                    batch.grids[k], batch.pair_image, batch.pair_uv, batch.image_size
                )
                - torch.as_tensor(means[k]).double()
                for k in pair.teacher
            ],
            dim=1,
        )
        per_image = []
        for i in range(images):
            sel = batch.pair_image == i
            if sel.any():
                cos = F.cosine_similarity(student[sel], target[sel], dim=1)
                per_image.append(float((1 - cos).mean()))
        per_pair.append(np.mean(per_image))
    assert float(terms["distill"]) == pytest.approx(np.mean(per_pair), rel=1e-4)
    teacher = batch.teacher_cls.double()  # (2B, V, D)
    with torch.no_grad():
        if cls_pooling == "max":
            student = model.cls_head(feats[0], batch.cloud, 2 * batch.batch_size).double()
            expect = ((student - teacher.amax(dim=1)) ** 2).mean(dim=1).mean()
        else:
            tokens = model.cls_head.head(feats[0][batch.pair_point]).double()
            errs = []
            for i in range(images):
                sel = batch.pair_image == i
                if sel.any():
                    pooled = tokens[sel].amax(dim=0)
                    errs.append(((pooled - teacher.reshape(images, -1)[i]) ** 2).mean())
            expect = torch.stack(errs).mean()
    assert float(terms["cls"]) == pytest.approx(float(expect), rel=1e-4)
