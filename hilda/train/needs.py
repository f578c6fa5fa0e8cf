"""What a pre-training config needs from the cache, derived once: used by ``hilda-train check``
(through ``check_cache``) to refuse a cache that cannot feed it, and by ``hilda-prep plan /
all --for PRESET`` to build one that can."""

from __future__ import annotations

from dataclasses import dataclass

from hilda.train.config import TrainConfig

# The public weights of each teacher size (Hugging Face ids), the default source of
# ``hilda-prep all --for PRESET`` when the preset names a teacher size.
HUB_SOURCES: dict[str, str] = {
    "vits14": "facebook/dinov2-small",
    "vitb14": "facebook/dinov2-base",
    "vitl14": "facebook/dinov2-large",
    "vitg14": "facebook/dinov2-giant",
    "dinov3_vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3_vits16plus": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3_vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3_vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3_vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
}
# A preset without a teacher size takes whatever the cache holds; the demo's random ViT-S/14.
DEFAULT_SOURCE = "random:vits14"


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
        return f"last{self.last_blocks}"

    def teacher_source(self) -> str:
        """The default ``--teacher`` of a cache for this config."""
        if self.teacher_arch is None:
            return DEFAULT_SOURCE
        return HUB_SOURCES.get(self.teacher_arch, f"random:{self.teacher_arch}")

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
