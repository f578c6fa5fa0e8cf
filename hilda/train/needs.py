"""What a pre-training config needs from the cache, derived once: used by ``hilda-train check``
(through ``check_cache``) to refuse a cache that cannot feed it, and by ``hilda-prep plan /
all --for PRESET`` to build one that can."""

from __future__ import annotations

from dataclasses import dataclass

from hilda.store.teacher_record import Layers
from hilda.train.config import TrainConfig


@dataclass(frozen=True)
class CacheNeeds:
    """The groups and settings a config reads from the cache."""

    pointmaps: bool
    teacher: bool
    teacher_arch: str | None  # the teacher size the config distils (None: any)
    teacher_name: str | None  # the teacher group it reads (None: the only one)
    last_blocks: int  # the teacher's last K blocks: Eq. 1 pairs and the CLS block
    occupancy: bool
    grid: int  # BEV cells per side
    cell: float  # metres per cell

    @property
    def layers(self) -> str:
        return Layers.last(self.last_blocks)

    def group_name(self) -> str | None:
        """The teacher group to write: the config's ``data.teacher``, else its teacher size."""
        return self.teacher_name or self.teacher_arch


def cache_needs(cfg: TrainConfig) -> CacheNeeds:
    offsets = set(cfg.teacher_offsets)
    if cfg.loss.cls:
        offsets.add(0)  # Eq. 2 distils the last block's CLS token
    return CacheNeeds(
        pointmaps=cfg.needs_teacher,
        teacher=cfg.needs_teacher,
        teacher_arch=cfg.data.teacher_arch,
        teacher_name=cfg.data.teacher,
        last_blocks=max(offsets, default=0) + 1,
        occupancy=cfg.needs_occupancy,
        grid=cfg.model.bev_grid,
        cell=round(cfg.model.bev_stride * cfg.model.voxel.voxel_size, 6),
    )
