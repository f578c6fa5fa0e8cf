"""What a pre-training config needs from the cache, derived once: used by ``hilda-train check``
(through ``check_cache``) to refuse a cache that cannot feed it, and by ``hilda-prep plan /
all --for PRESET`` to build one that can."""

from __future__ import annotations

from dataclasses import dataclass

from hilda.errors import ConfigError
from hilda.train.config import TrainConfig

# The public weights of each teacher size (Hugging Face ids), the default source of
# ``hilda-prep all --for PRESET`` when the preset names a teacher size. A size missing here
# is an error, never a randomly initialised teacher: ``random:<size>`` only when named.
HUB_SOURCES: dict[str, str] = {
    "vits14": "facebook/dinov2-small",
    "vitb14": "facebook/dinov2-base",
    "vitl14": "facebook/dinov2-large",
    "vitg14": "facebook/dinov2-giant",
    "vits14_reg": "facebook/dinov2-with-registers-small",
    "vitb14_reg": "facebook/dinov2-with-registers-base",
    "vitl14_reg": "facebook/dinov2-with-registers-large",
    "vitg14_reg": "facebook/dinov2-with-registers-giant",
    "dinov3_vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3_vits16plus": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3_vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3_vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3_vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
}
TEACHER_CHOICES = (
    "a Hugging Face id (e.g. facebook/dinov2-small), a folder saved by save_pretrained, an "
    "official dinov2_*_pretrain.pth / dinov3_*_pretrain_lvd1689m-*.pth checkpoint, "
    "random:<size> for a randomly initialised teacher (sizes: "
    + ", ".join(HUB_SOURCES)
    + "), or oracle (synthetic worlds)"
)


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
        """The default ``--teacher`` of a cache for this config: the public weights of its
        teacher size. A config without one (it distils whatever the cache holds) or of a size
        without public weights is refused: the teacher must then be named."""
        if self.teacher_arch is None:
            raise ConfigError(
                "the preset names no teacher size (data.teacher_arch is null: it distils "
                f"whatever teacher the cache holds): pass --teacher, {TEACHER_CHOICES}"
            )
        if self.teacher_arch not in HUB_SOURCES:
            raise ConfigError(
                f"data.teacher_arch={self.teacher_arch!r} is no known teacher size: use one of "
                f"{', '.join(HUB_SOURCES)}, or pass --teacher"
            )
        return HUB_SOURCES[self.teacher_arch]

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


@dataclass(frozen=True)
class PrepPlan:
    """What ``hilda-prep all|plan`` builds: which stages and with which settings."""

    teacher: bool  # build-pointmaps and extract-teacher
    occupancy: bool  # build-occupancy
    source: str | None  # the teacher source (None: no teacher stage)
    layers: str
    name: str | None  # teacher group name (None: from the source)
    grid: int
    cell: float


def prep_plan(
    needs: CacheNeeds | None,
    *,
    teacher: str | None = None,
    layers: str | None = None,
    name: str | None = None,
    grid: int | None = None,
    cell: float | None = None,
    default_grid: int = 512,
    default_cell: float = 0.4,
    default_layers: str = "last2",
) -> PrepPlan:
    """The plan from what was given explicitly, else what a preset ``needs``, else the
    single stages' defaults (passed in by the CLI, which owns them). The teacher is never
    a default: given, or the public weights of the preset's teacher size."""
    runs_teacher = needs.teacher if needs is not None else True
    source = teacher
    if source is None and runs_teacher:
        if needs is None:
            raise ConfigError(f"--teacher is required (or --for PRESET): {TEACHER_CHOICES}")
        source = needs.teacher_source()
    return PrepPlan(
        teacher=runs_teacher,
        occupancy=needs.occupancy if needs is not None else True,
        source=source if runs_teacher else None,
        layers=layers or (needs.layers if needs is not None else default_layers),
        name=name or (needs.group_name() if needs is not None else None),
        grid=grid or (needs.grid if needs is not None else default_grid),
        cell=cell or (needs.cell if needs is not None else default_cell),
    )
