"""What the trainer optimises: the student, one projection head per distilled pair, the CLS
head and the auxiliary occupancy head, and their loss terms (Eq. 1-3) on a batch.

The terms are computed by ``hilda.train.losses`` (the functions its tests check by hand); this
module only gathers their inputs. Each is reduced over the *global* batch (``global_mean``), so
DDP with any process count trains like one process with the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hilda.engine.distributed import global_mean
from hilda.errors import ConfigError
from hilda.models.bev import bev_pool
from hilda.models.diffusion import DiffusionHead, draw_per_sample
from hilda.models.grid import as_float_grid
from hilda.models.heads import ClsHead, ProjectionHead
from hilda.models.occupancy_heads import AlsoHead, SimpleOccupancyDecoder
from hilda.models.student import build_student
from hilda.models.voxelize import voxelize
from hilda.train.config import TrainConfig
from hilda.train.data import Batch
from hilda.train.losses import (
    cls_loss,
    cls_loss_per_image,
    diffusion_loss,
    distill_loss,
    multilayer_distill_loss,
    teacher_targets,
)


class HildaModel(nn.Module):
    def __init__(
        self,
        cfg: TrainConfig,
        teacher_dim: int,
        teacher_means: dict[int, np.ndarray] | None = None,
    ) -> None:
        """``teacher_means`` {offset: (D,)}: the Eq. 1 target centres (``loss.center_teacher``;
        kept as a buffer, so checkpoints carry them)."""
        super().__init__()
        self.cfg = cfg
        self.register_buffer("teacher_mean", None)  # (K, D); None: not in the state dict
        if cfg.loss.center_teacher and cfg.loss.distill:
            offsets = cfg.teacher_offsets
            if teacher_means is None or set(teacher_means) != set(offsets):
                raise ConfigError(
                    f"loss.center_teacher needs the mean of teacher blocks at offsets {offsets}"
                )
            rows = [torch.as_tensor(teacher_means[k], dtype=torch.float32) for k in offsets]
            self.teacher_mean = torch.stack(rows)
        m, loss = cfg.model, cfg.loss
        self.student = build_student(m.student)
        channels = m.student.stage_channels  # (C_L, C_{L-1}, C_{L-2}, C_{L-3})
        self.heads = nn.ModuleList(
            ProjectionHead(channels[p.student], teacher_dim * len(p.teacher), m.head)
            for p in loss.distill
        )
        self.cls_head = None
        if loss.cls:
            pooling = "max" if loss.cls_pooling == "per_image" else loss.cls_pooling
            self.cls_head = ClsHead(channels[0], teacher_dim, m.head, pooling)
        c = channels[0]
        self.aux: nn.Module | None = {
            "diffusion": lambda: DiffusionHead(c, m.diffusion),
            "simple": lambda: SimpleOccupancyDecoder(c, m.simple_hidden, m.diffusion.groups),
            "also": lambda: AlsoHead(c, m.also),
            "none": lambda: None,
        }[loss.aux]()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss terms: ``distill``, ``cls``, ``aux`` (the Eq. 4 inputs) and their parts
        (``distill/<i>``, ``aux/noise``, ...) for logging."""
        clouds = 2 * batch.batch_size
        voxels = voxelize(batch.points, batch.cloud, self.cfg.model.voxel)
        out = self.student(voxels)  # point_feats [(N, C_L), (N, C_{L-1}), ...]
        terms: dict[str, torch.Tensor] = {}
        if self.cfg.loss.distill:
            terms.update(self._distill(out.point_feats, batch, clouds))
        if self.cls_head is not None:
            terms["cls"] = self._cls(out.point_feats[0], batch, clouds)
        if self.aux is not None:
            terms.update(self._aux(out, voxels, batch))
        return terms

    def _distill(self, feats: list[torch.Tensor], batch: Batch, clouds: int) -> dict:
        """Eq. 1 for every distilled pair (teacher blocks -> student layer), then their mean."""
        images = clouds * batch.teacher_cls.shape[1]
        row = {k: i for i, k in enumerate(self.cfg.teacher_offsets)}
        targets = {  # offset -> (Q, D): bilinear at uv, centred when configured
            offset: teacher_targets(
                as_float_grid(grid),  # int8 grids are dequantised here, on the device
                batch.pair_image,
                batch.pair_uv,
                batch.image_size,
                None if self.teacher_mean is None else self.teacher_mean[row[offset]],
            )
            for offset, grid in batch.grids.items()
        }
        per_pair = {}
        for i, (pair, head) in enumerate(zip(self.cfg.loss.distill, self.heads, strict=True)):
            student = head(feats[pair.student][batch.pair_point])  # (Q, D k)
            target = torch.cat([targets[k] for k in pair.teacher], dim=1)  # (Q, D k)
            per_pair[f"distill/{i}"] = distill_loss(
                student, target, batch.pair_image, images, self.cfg.loss.distance, global_mean
            )
        return {"distill": multilayer_distill_loss(list(per_pair.values())), **per_pair}

    def _cls(self, feats: torch.Tensor, batch: Batch, clouds: int) -> torch.Tensor:
        """Eq. 2 per cloud (or, for ``per_image``, per camera frustum)."""
        if self.cfg.loss.cls_pooling == "per_image":
            tokens = self.cls_head.head(feats[batch.pair_point])  # (Q, D)
            return cls_loss_per_image(tokens, batch.pair_image, batch.teacher_cls, global_mean)
        student = self.cls_head(feats, batch.cloud, clouds)  # (2B, D)
        return cls_loss(student, batch.teacher_cls, global_mean)

    def _aux(self, out, voxels, batch: Batch) -> dict:
        m, b = self.cfg.model, batch.batch_size
        if isinstance(self.aux, AlsoHead):  # the t0 sweeps' points, sensor at the origin
            now = batch.cloud >= b
            points = batch.points[now]
            inten = points[:, 3] * m.voxel.intensity_scale  # as the student sees it
            res = self.aux(out.point_feats[0][now], points[:, :3], inten)
            return {
                "aux": res.total,
                "aux/occupancy": res.occupancy,
                "aux/intensity": res.intensity,
            }
        bev = bev_pool(
            out.voxel_feats, out.voxel_coords, voxels.origin, 2 * b, m.bev_grid, m.bev_stride
        )  # (2B, C, H, W)
        prev, now = bev[:b], bev[b:]
        if isinstance(self.aux, SimpleOccupancyDecoder):
            logits = self.aux.logits(prev, now).float()  # (B, H, W)
            bce = F.binary_cross_entropy_with_logits(logits, batch.target, reduction="none")
            return {"aux": global_mean(bce.mean(dim=(1, 2)))}
        draws = draw_per_sample(
            batch.seeds.tolist(), tuple(batch.target.shape[1:]), m.diffusion, bev.device
        )
        pred = self.aux(prev, now, batch.target, draws=draws)
        res = diffusion_loss(
            pred.eps, pred.noise, pred.x0_hat, pred.x0, m.diffusion.x0_weight, global_mean
        )
        return {"aux": res.total, "aux/noise": res.noise, "aux/x0": res.x0}
