"""What ``hilda-prep all|plan`` builds: which stages, with which teacher and settings, from
what was given explicitly, else what a preset needs (``hilda.train.needs.CacheNeeds``), else
the single stages' defaults. The teacher is never a default: given, or the public weights of
the preset's teacher size (``hilda.teachers.spec.SIZES``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hilda.errors import ConfigError
from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.store.teacher_record import DEFAULT_LAYERS
from hilda.teachers.spec import TEACHER_CHOICES, hub_source


class PresetNeeds(Protocol):
    """What the plan reads of a preset's needs (``CacheNeeds``)."""

    teacher: bool
    occupancy: bool
    teacher_arch: str | None
    grid: int
    cell: float

    @property
    def layers(self) -> str: ...

    def group_name(self) -> str | None: ...


@dataclass(frozen=True)
class PrepPlan:
    teacher: bool  # build-pointmaps and extract-teacher
    occupancy: bool  # build-occupancy
    source: str | None  # the teacher source (None: no teacher stage)
    layers: str
    name: str | None  # teacher group name (None: from the source)
    grid: int
    cell: float


@dataclass(frozen=True)
class Given:
    """What the user gave explicitly (None: not given) and the single stages' defaults."""

    teacher: str | None = None
    layers: str | None = None
    name: str | None = None
    grid: int | None = None
    cell: float | None = None
    default_layers: str = DEFAULT_LAYERS
    default_grid: int = OccupancyConfig.grid
    default_cell: float = OccupancyConfig.cell


def preset_source(needs: PresetNeeds) -> str:
    """The public weights of the preset's teacher size; a preset without one (it distils
    whatever the cache holds) or of an unknown size is refused: name the teacher."""
    if needs.teacher_arch is None:
        raise ConfigError(
            "the preset names no teacher size (data.teacher_arch is null: it distils "
            f"whatever teacher the cache holds): pass --teacher, {TEACHER_CHOICES}"
        )
    return hub_source(needs.teacher_arch)


def prep_plan(needs: PresetNeeds | None, given: Given) -> PrepPlan:
    """The plan (module doc)."""
    runs_teacher = needs.teacher if needs is not None else True
    source = given.teacher
    if source is None and runs_teacher:
        if needs is None:
            raise ConfigError(f"--teacher is required (or --for PRESET): {TEACHER_CHOICES}")
        source = preset_source(needs)
    return PrepPlan(
        teacher=runs_teacher,
        occupancy=needs.occupancy if needs is not None else True,
        source=source if runs_teacher else None,
        layers=given.layers or (needs.layers if needs is not None else given.default_layers),
        name=given.name or (needs.group_name() if needs is not None else None),
        grid=given.grid or (needs.grid if needs is not None else given.default_grid),
        cell=given.cell or (needs.cell if needs is not None else given.default_cell),
    )


@dataclass(frozen=True)
class Source:
    """The dataset a cache is built from (``hilda-prep all|plan``)."""

    dataset: str
    root: str
    version: str
    split: str
    frames_per_shard: int = 32


def prepare_config(
    plan: PrepPlan,
    source: Source,
    store: str,
    *,
    image_size: tuple[int, int],
    codec: str,
    device: str,
):
    """The ``PrepareConfig`` of ``hilda-prep all``: the plan's stages on ``store``."""
    from hilda.pipeline.ops.occupancy import OccupancyConfig
    from hilda.pipeline.stages.index import IndexConfig
    from hilda.pipeline.stages.occupancy import OccupancyStageConfig
    from hilda.pipeline.stages.pointmaps import PointmapConfig
    from hilda.pipeline.stages.prepare import PrepareConfig
    from hilda.pipeline.stages.teacher import TeacherConfig

    teacher = None
    if plan.source is not None:
        teacher = TeacherConfig(
            store, plan.source, plan.layers, image_size, codec=codec, device=device, name=plan.name
        )
    index = IndexConfig(
        source.dataset,
        source.root,
        store,
        source.version,
        source.split,
        frames_per_shard=source.frames_per_shard,
    )
    occupancy = OccupancyStageConfig(store, OccupancyConfig(grid=plan.grid, cell=plan.cell))
    return PrepareConfig(
        index=index,
        pointmaps=PointmapConfig(store) if plan.teacher else None,
        teacher=teacher,
        occupancy=occupancy if plan.occupancy else None,
    )


def plan_commands(plan: PrepPlan, source: Source, store: str, preset: str) -> list[str]:
    """The single ``hilda-prep`` commands the plan runs, then the check that it fits."""
    lines = [
        f"hilda-prep index --dataset {source.dataset} --root {source.root} --version "
        f"{source.version} --split {source.split} --out {store}"
    ]
    if plan.teacher:
        lines.append(f"hilda-prep build-pointmaps --store {store}")
        named = f" --name {plan.name}" if plan.name else ""
        lines.append(
            f"hilda-prep extract-teacher --store {store} --teacher {plan.source} "
            f"--layers {plan.layers}{named}"
        )
    if plan.occupancy:
        lines.append(
            f"hilda-prep build-occupancy --store {store} --grid {plan.grid} --cell {plan.cell:g}"
        )
    return [*lines, f"hilda-train check --config {preset} --store {store}"]
