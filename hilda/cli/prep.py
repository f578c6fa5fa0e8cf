"""hilda-prep: build the datasets and the training cache (thin: parse, call, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hilda.cli import data
from hilda.cli.common import (
    Cell,
    Codec,
    DatasetName,
    Device,
    FramesPerShard,
    Grid,
    ImageSize,
    KeyframeEvery,
    NoWorkerTimeout,
    Overwrite,
    Root,
    Scheduler,
    SkipBad,
    Split,
    Store,
    Teacher,
    Version,
    Workers,
    fail_cleanly,
    parse_size,
)
from hilda.cli.common import LayersOpt as Layers
from hilda.errors import ConfigError
from hilda.pipeline.ops.occlusion import OcclusionRule
from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.pipeline.plan import Given, PrepPlan, Source
from hilda.pipeline.stages.index import IndexConfig
from hilda.pipeline.stages.teacher import TeacherConfig
from hilda.store import teacher_path
from hilda.store.schema import stage_command
from hilda.teachers.spec import TEACHER_CHOICES

# The stages' defaults, written once (in their config dataclasses) and shown by the options.
GRID, CELL = OccupancyConfig.grid, OccupancyConfig.cell
MIN_H, MAX_H, HORIZON = (
    OccupancyConfig.min_height,
    OccupancyConfig.max_height,
    OccupancyConfig.horizon,
)
LAYERS = Given.default_layers
VERSION, SPLIT = IndexConfig.version, IndexConfig.split
EVERY, FPS = IndexConfig.keyframe_every, IndexConfig.frames_per_shard
RULE = OcclusionRule()
T = TeacherConfig
IMAGE = "x".join(str(v) for v in T.image_size)

app = typer.Typer(
    help="Prepare data: the synthetic world, and the Zarr training cache (stages run on Dask).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def main() -> None:
    """Prepare data and the training cache."""


# The dataset commands (the synthetic world, reading a split back) live in hilda.cli.data.
app.command("make-synthetic")(fail_cleanly(data.make_synthetic_cmd))
app.command("frames")(fail_cleanly(data.frames_cmd))


@app.command("validate")
@fail_cleanly
def validate_cmd(
    store: Annotated[str, typer.Option(help="store path or fsspec URL")],
    deep: Annotated[
        bool, typer.Option("--deep", help="also compare every file's CRC-32 (reads it all)")
    ] = False,
) -> None:
    """Check a Zarr cache against this hilda's store layout and every file against what its
    stage recorded writing (present, its size; with --deep its content); list every
    problem."""
    from hilda.store.validate import unrecorded_groups, validate_store

    root = validate_store(store, files="deep" if deep else "sizes")
    for group in unrecorded_groups(root):
        console.print(
            f"[yellow]note[/]: {group}/ was built before write records: a lost shard file "
            f"reads as zeros there; rebuild it with `{stage_command(group)} --overwrite` to "
            "check it"
        )
    groups = sorted(k for k in root.group_keys())
    checked = "contents" if deep else "sizes"
    console.print(
        f"[green]ok[/]: {store} (schema {root.attrs['schema_version']}, groups {groups}; "
        f"file {checked} as written)"
    )


def _report(stage: str, store: str, summary: dict) -> None:
    """One green line: what a stage wrote."""
    parts = (f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in summary.items())
    console.print(f"[green]{stage}[/] {store}: " + ", ".join(parts))


@app.command("index")
@fail_cleanly
def index_cmd(
    out: Store,
    dataset: DatasetName = "nuscenes",
    root: Root = Path("out/synthetic"),
    version: Version = VERSION,
    split: Split = SPLIT,
    keyframe_every: KeyframeEvery = EVERY,
    frames_per_shard: FramesPerShard = FPS,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 1: the index group and the points group (ragged, CSR)."""
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.index import IndexConfig, run_index

    cfg = IndexConfig(
        dataset=dataset,
        root=str(root),
        store=out,
        version=version,
        split=split,
        keyframe_every=keyframe_every,
        frames_per_shard=frames_per_shard,
    )
    options = StageOptions.of(workers, scheduler, overwrite, skip_bad, no_worker_timeout=timeout)
    _report("index", out, run_index(cfg, options))


@app.command("build-pointmaps")
@fail_cleanly
def build_pointmaps_cmd(
    store: Store,
    occlusion: Annotated[
        bool, typer.Option(help="drop points hidden behind nearer surfaces")
    ] = True,
    cell_px: Annotated[float, typer.Option(help="occlusion z-buffer cell, pixels")] = RULE.cell_px,
    abs_tol: Annotated[
        float, typer.Option(help="occlusion depth tolerance, metres")
    ] = RULE.abs_tol,
    rel_tol: Annotated[
        float, typer.Option(help="occlusion depth tolerance, fraction")
    ] = RULE.rel_tol,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 2: point-pixel pairs per camera (the devkit's projection and mask, + occlusion)."""
    from hilda.pipeline.ops.occlusion import OcclusionRule
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps

    cfg = PointmapConfig(store, occlusion, OcclusionRule(cell_px, abs_tol, rel_tol))
    options = StageOptions.of(workers, scheduler, overwrite, skip_bad, no_worker_timeout=timeout)
    _report("pointmaps", store, run_pointmaps(cfg, options))


@app.command("build-occupancy")
@fail_cleanly
def build_occupancy_cmd(
    store: Store,
    grid: Grid = GRID,
    cell: Cell = CELL,
    min_height: Annotated[
        float, typer.Option(help="keep points this high above the ground")
    ] = MIN_H,
    max_height: Annotated[float, typer.Option(help="... and at most this high")] = MAX_H,
    horizon: Annotated[int, typer.Option(min=1, help="keyframes ahead")] = HORIZON,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 4: ego-compensated future (t+1) BEV occupancy, ground removed, bit-packed."""
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy

    occ = OccupancyConfig(
        grid=grid, cell=cell, min_height=min_height, max_height=max_height, horizon=horizon
    )
    options = StageOptions.of(workers, scheduler, overwrite, skip_bad, no_worker_timeout=timeout)
    _report("occupancy", store, run_occupancy(OccupancyStageConfig(store, occ), options))


@app.command("extract-teacher")
@fail_cleanly
def extract_teacher_cmd(
    store: Store,
    teacher: Teacher = None,
    layers: Layers = LAYERS,
    image_size: ImageSize = IMAGE,
    norm: Annotated[
        bool, typer.Option(help="apply the final LayerNorm to each block output")
    ] = True,
    codec: Codec = T.codec,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = T.batch_size,
    device: Device = T.device,
    name: Annotated[str | None, typer.Option(help="group name under teacher/")] = None,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 3: the teacher's multi-layer patch grids and CLS tokens of every camera image."""
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

    if teacher is None:  # never a default teacher: a cache of random features looks like any
        raise ConfigError(f"--teacher is required: {TEACHER_CHOICES}")
    size = parse_size(image_size)
    cfg = TeacherConfig(store, teacher, layers, size, norm, codec, batch_size, device, name)
    options = StageOptions.of(
        workers, scheduler, overwrite, skip_bad, gpu=device == "cuda", no_worker_timeout=timeout
    )
    _report(teacher_path(cfg.group_name()), store, run_teacher(cfg, options))


ForPreset = Annotated[
    str | None,
    typer.Option(
        "--for",
        help="a pre-training preset or YAML: derive the teacher size, blocks, group name and "
        "BEV grid it needs (hilda-train check accepts the result)",
    ),
]
PresetSets = Annotated[
    list[str] | None, typer.Option("--set", help="override a key of the --for preset")
]


def _plan(preset: str | None, sets: list[str] | None, given: Given) -> PrepPlan:
    """What the cache holds: given explicitly, else what the ``--for`` preset needs
    (``hilda.train.needs``), else the single commands' defaults (``hilda.pipeline.plan``)."""
    from hilda.pipeline.plan import prep_plan

    needs = None
    if preset is not None:
        from hilda.engine.config_io import load_config
        from hilda.train.config import TrainConfig
        from hilda.train.needs import cache_needs

        needs = cache_needs(load_config(TrainConfig, preset, list(sets or [])))
    return prep_plan(needs, given)


@app.command("all")
@fail_cleanly
def all_cmd(
    out: Store,
    dataset: DatasetName = "nuscenes",
    root: Root = Path("out/synthetic"),
    version: Version = VERSION,
    split: Split = SPLIT,
    frames_per_shard: FramesPerShard = FPS,
    for_preset: ForPreset = None,
    preset_sets: PresetSets = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="teacher source (default: the public weights of the --for preset's size)"
        ),
    ] = None,
    layers: Annotated[str | None, typer.Option(help="lastK or block indices")] = None,
    image_size: ImageSize = IMAGE,
    codec: Codec = T.codec,
    device: Device = T.device,
    name: Annotated[str | None, typer.Option(help="teacher group name")] = None,
    grid: Annotated[int | None, typer.Option(help=f"BEV cells per side (default {GRID})")] = None,
    cell: Annotated[
        float | None, typer.Option(help=f"metres per BEV cell (default {CELL})")
    ] = None,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Every stage in order on one Dask cluster: index, build-pointmaps, extract-teacher,
    build-occupancy. With --for PRESET, the teacher blocks, group name and BEV grid the preset
    needs (and only the stages it reads). Resumable."""
    from hilda.pipeline.plan import prepare_config
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.prepare import run_all

    plan = _plan(for_preset, preset_sets, Given(teacher, layers, name, grid, cell))
    source = Source(dataset, str(root), version, split, frames_per_shard)
    size = parse_size(image_size)
    cfg = prepare_config(plan, source, out, image_size=size, codec=codec, device=device)
    options = StageOptions.of(
        workers, scheduler, overwrite, skip_bad, gpu=device == "cuda", no_worker_timeout=timeout
    )
    for stage, summary in run_all(cfg, options).items():
        _report(stage, out, summary)


@app.command("plan")
@fail_cleanly
def plan_cmd(
    for_preset: Annotated[str, typer.Option("--for", help="a pre-training preset or YAML")],
    preset_sets: PresetSets = None,
    out: Annotated[str, typer.Option(help="the store to build")] = "STORE",
    root: Annotated[str, typer.Option(help="dataset root")] = "ROOT",
    dataset: DatasetName = "nuscenes",
    version: Version = "v1.0-trainval",
    split: Split = "train",
    teacher: Annotated[str | None, typer.Option(help="teacher source")] = None,
) -> None:
    """Print the hilda-prep commands that build a cache the preset can train on (what
    `hilda-prep all --for PRESET` runs, stage by stage)."""
    from hilda.pipeline.plan import plan_commands

    plan = _plan(for_preset, preset_sets, Given(teacher))
    source = Source(dataset, root, version, split)
    typer.echo("\n".join(plan_commands(plan, source, out, for_preset)))


@app.command("info")
@fail_cleanly
def info_cmd(store: Store) -> None:
    """Frames, stages complete, bytes per frame per group, teacher provenance, codec fidelity."""
    from hilda.store.info import TEACHER_SUMMARY_KEYS, store_info

    info = store_info(store)
    console.print(
        f"[bold]{store}[/]: {info['dataset']} {info['version']} {info['split']}, "
        f"{info['frames']} frames, cameras {', '.join(info['cameras'])}, "
        f"schema {info['schema_version']}"
    )
    table = Table()
    for col in ("group", "complete", "shards", "KiB/frame", "skipped", "contents"):
        table.add_column(col)
    for name, g in info["groups"].items():
        short = {k: g[k] for k in ("points", "pairs", "valid", "codec") if k in g}
        parts = (f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in short.items())
        complete = "yes" if g["complete"] else "[red]no[/]"
        kib = f"{g['bytes_per_frame'] / 1024:,.1f}"
        table.add_row(name, complete, g["shards_done"], kib, str(g["skipped"]), ", ".join(parts))
    console.print(table)
    for name, g in info["groups"].items():
        if name.startswith(teacher_path("")):
            console.print(f"[bold]{name}[/]")
            for key in TEACHER_SUMMARY_KEYS:
                console.print(f"  {key}: {g[key]}")
            for layer, f in g["fidelity"].items():
                console.print(
                    f"  fidelity {layer}: mean cos {f['mean_cos']:.6f}, min cos {f['min_cos']:.6f}"
                )
