"""hilda-prep: build the datasets and the training cache (thin: parse, call, report)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hilda.cli.common import fail_cleanly, parse_size
from hilda.errors import ConfigError
from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.store import teacher_path
from hilda.train.needs import TEACHER_CHOICES, PrepPlan

# The stages' defaults, written once (in their config dataclasses) and shown by the options.
GRID, CELL = OccupancyConfig.grid, OccupancyConfig.cell
LAYERS = "last2"

app = typer.Typer(
    help="Prepare data: the synthetic world, and the Zarr training cache (stages run on Dask).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def main() -> None:
    """Prepare data and the training cache."""


@app.command("make-synthetic")
@fail_cleanly
def make_synthetic_cmd(
    format: Annotated[
        str, typer.Option("--format", help="nuscenes, av2 or semantickitti on-disk format")
    ] = "nuscenes",
    out: Annotated[Path, typer.Option(help="output folder (the dataset root)")] = Path(
        "out/synthetic"
    ),
    scenes: Annotated[
        int | None, typer.Option(min=1, help="number of scenes (logs) [default: 2; --scale 850]")
    ] = None,
    frames_per_scene: Annotated[
        int | None,
        typer.Option(min=1, help="keyframes per scene, 0.5 s apart [default: 6; --scale 40]"),
    ] = None,
    seed: Annotated[int, typer.Option(help="world seed; output is deterministic for a seed")] = 0,
    image_size: Annotated[
        str | None,
        typer.Option(help="WxH of landscape cameras (default 800x450 nuscenes, 512x388 av2)"),
    ] = None,
    version: Annotated[
        str, typer.Option(help="nuScenes table version: v1.0-mini or v1.0-trainval")
    ] = "v1.0-mini",
    keyframe_every: Annotated[
        int, typer.Option(min=1, help="AV2: sweeps (10 Hz) per keyframe")
    ] = 5,
    scale: Annotated[
        bool,
        typer.Option(
            "--scale",
            help="nuScenes trainval's size with cheap sensors: 850 scenes x 40 keyframes, "
            "8-beam sweeps (~2k points), 64x36 cameras, one map for all logs (a dry run of "
            "the pipeline at scale)",
        ),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="processes writing nuScenes scenes [default: 1; --scale: cores]"),
    ] = None,
) -> None:
    """Generate the procedural driving world and write it in nuScenes, AV2 or SemanticKITTI
    format."""
    from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic, scale_config

    if scale:
        if format != "nuscenes" or image_size is not None:
            raise typer.BadParameter("--scale writes nuScenes v1.0-trainval at its own sizes")
        cfg = scale_config(
            out,
            scenes=scenes or 850,
            frames_per_scene=frames_per_scene or 40,
            seed=seed,
            workers=workers or os.cpu_count() or 1,
        )
    else:
        cfg = SyntheticConfig(
            format=format,  # type: ignore[arg-type]
            out=out,
            scenes=scenes or 2,
            frames_per_scene=frames_per_scene or 6,
            seed=seed,
            image_size=parse_size(image_size) if image_size else None,
            version=version,
            keyframe_every=keyframe_every,
            workers=workers or 1,
        )
    scenes, frames_per_scene, version = cfg.scenes, cfg.frames_per_scene, cfg.version
    w, h = cfg.resolved_image_size
    cameras = "no cameras" if not cfg.rig.cameras else f"cameras {w}x{h}"
    console.print(
        f"[bold]synthetic world[/] seed {seed}: {scenes} scenes x {frames_per_scene} keyframes, "
        f"{format} format, {cameras} -> {out}"
    )
    start = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("keyframes", total=scenes * frames_per_scene)
        counts = make_synthetic(
            cfg, progress=lambda msg: bar.update(task, advance=1, description=msg)
        )
    _counts_table(counts, f"wrote {out} in {time.perf_counter() - start:.1f} s")
    console.print(
        {
            "nuscenes": f"read it with: hilda-prep frames --dataset nuscenes --root {out} "
            f"--version {version}",
            "av2": f"read it with: hilda-prep frames --dataset av2 --root {out} --split train",
            "semantickitti": f"{out}/sequences/NN (train 00-07, 09, 10; val 08)",
        }[format]
    )


def _counts_table(counts: dict[str, int], title: str) -> None:
    table = Table(title=title)
    table.add_column("item")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, f"{value:,}")
    console.print(table)


@app.command("frames")
@fail_cleanly
def frames_cmd(
    dataset: DatasetName = "nuscenes",
    root: Root = Path("out/synthetic"),
    version: Version = "v1.0-mini",
    split: Split = "all",
    keyframe_every: Annotated[int, typer.Option(min=1, help="AV2: sweeps per keyframe")] = 5,
    load: Annotated[bool, typer.Option(help="also read every sweep and label file")] = True,
) -> None:
    """Read a dataset split back through its devkit and summarise its keyframes."""
    from hilda.datasets import neighbour_stats, open_dataset
    from hilda.datasets.classes import COARSE_CLASSES
    from hilda.datasets.io import read_lidarseg_labels, read_sweep

    reader = open_dataset(
        dataset, str(root), version=version, split=split, keyframe_every=keyframe_every
    )  # type: ignore[arg-type]
    frames = reader.frames
    per_scene: dict[str, list[int]] = {}
    labels: Counter[int] = Counter()
    lut = reader.coarse_label_lut if reader.has_labels else None  # type: ignore[attr-defined]
    for f in frames:
        n = -1
        if load:
            pts = read_sweep(f.lidar_file, f.token)
            n = len(pts)
            if f.labels_file and lut is not None:
                lab = lut[read_lidarseg_labels(f.labels_file, n, f.token)]
                labels.update({int(c): int(k) for c, k in enumerate(np.bincount(lab)) if k})
        per_scene.setdefault(f.scene, []).append(n)
    table = Table(title=f"{dataset} {root} ({version if dataset == 'nuscenes' else split})")
    for col in ("scene", "keyframes", "points per sweep", "cameras"):
        table.add_column(col)
    cams_by_scene = {f.scene: len(f.cameras) for f in frames}
    for scene, counts in per_scene.items():
        pts = f"{int(np.mean(counts)):,}" if load else "-"
        table.add_row(scene, str(len(counts)), pts, str(cams_by_scene[scene]))
    console.print(table)
    stats = neighbour_stats(frames)
    console.print(
        f"{stats['frames']} keyframes; {stats['with_prev']} with a previous and "
        f"{stats['with_next']} with a next keyframe; {stats['with_both']} usable as "
        "(t-1, t0, t+1) training samples"
    )
    if frames:
        f = frames[0]
        console.print(f"cameras: {', '.join(c.name + f' {c.width}x{c.height}' for c in f.cameras)}")
    if labels:
        total = sum(labels.values())
        share = ", ".join(
            f"{COARSE_CLASSES[c]} {100 * k / total:.1f}%" for c, k in sorted(labels.items())
        )
        console.print(f"lidarseg points per class (16-class mapping): {share}")


@app.command("validate")
@fail_cleanly
def validate_cmd(
    store: Annotated[str, typer.Option(help="store path or fsspec URL")],
) -> None:
    """Check a Zarr cache against this hilda's store layout; list every problem."""
    from hilda.store.validate import validate_store

    root = validate_store(store)
    groups = sorted(k for k in root.group_keys())
    console.print(f"[green]ok[/]: {store} (schema {root.attrs['schema_version']}, groups {groups})")


def _report(stage: str, store: str, summary: dict) -> None:
    """One green line: what a stage wrote."""
    parts = (f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in summary.items())
    console.print(f"[green]{stage}[/] {store}: " + ", ".join(parts))


def _stage_options(
    workers: int,
    scheduler: str | None,
    overwrite: bool,
    skip_bad: bool,
    gpu: bool = False,
    no_worker_timeout: float = 300.0,
):
    from hilda.pipeline.runner import ClusterConfig
    from hilda.pipeline.stages.common import StageOptions

    return StageOptions(
        cluster=ClusterConfig(
            workers=workers,
            scheduler=scheduler,
            gpu_workers=gpu,
            no_worker_timeout=no_worker_timeout,
        ),
        overwrite=overwrite,
        skip_bad=skip_bad,
    )


Workers = Annotated[int, typer.Option(min=1, help="local Dask workers (processes)")]
Scheduler = Annotated[str | None, typer.Option(help="address of an existing Dask scheduler")]
NoWorkerTimeout = Annotated[
    float,
    typer.Option(min=0.0, help="fail when the cluster has had no worker this many seconds"),
]
Overwrite = Annotated[bool, typer.Option(help="redo the stage from scratch")]
SkipBad = Annotated[bool, typer.Option(help="record bad frames as skipped and go on")]
Teacher = Annotated[
    str | None,
    typer.Option(
        help="required: a HF id, a local dir, an official dinov2_*_pretrain.pth or "
        "dinov3_*_pretrain_lvd1689m-*.pth, random:<size> (a randomly initialised teacher, "
        "only when named), or oracle (synthetic worlds only: known-semantics features from "
        "the rendered class maps)"
    ),
]
Layers = Annotated[str, typer.Option(help="lastK or block indices, e.g. last2 or 10,11")]
ImageSize = Annotated[str, typer.Option(help="WxH fed to the teacher (multiples of 14)")]
Codec = Annotated[
    str,
    typer.Option(
        help="int8 (token x channel scales, dequantised on the training device) | float16 "
        "| bitround"
    ),
]
Device = Annotated[str, typer.Option(help="cpu or cuda")]
Grid = Annotated[int, typer.Option(help="BEV cells per side")]
Cell = Annotated[float, typer.Option(help="metres per cell (8 x 0.05 m voxels)")]
Store = Annotated[
    str, typer.Option(help="store: a folder or an fsspec URL (s3://, memory://, ...)")
]
DatasetName = Annotated[str, typer.Option(help="nuscenes or av2")]
Root = Annotated[Path, typer.Option(help="dataset root")]
Version = Annotated[str, typer.Option(help="nuScenes version folder")]
Split = Annotated[str, typer.Option(help="nuScenes: all or a devkit split; AV2: split folder")]
FramesPerShard = Annotated[int, typer.Option(min=1, help="frames per shard file")]


@app.command("index")
@fail_cleanly
def index_cmd(
    out: Store,
    dataset: DatasetName = "nuscenes",
    root: Root = Path("out/synthetic"),
    version: Version = "v1.0-mini",
    split: Split = "all",
    keyframe_every: Annotated[int, typer.Option(min=1, help="AV2: sweeps per keyframe")] = 5,
    frames_per_shard: FramesPerShard = 32,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    no_worker_timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 1: the index group and the points group (ragged, CSR)."""
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
    summary = run_index(
        cfg,
        _stage_options(
            workers, scheduler, overwrite, skip_bad, no_worker_timeout=no_worker_timeout
        ),
    )
    _report("index", out, summary)


@app.command("build-pointmaps")
@fail_cleanly
def build_pointmaps_cmd(
    store: Store,
    occlusion: Annotated[
        bool, typer.Option(help="drop points hidden behind nearer surfaces")
    ] = True,
    cell_px: Annotated[float, typer.Option(help="occlusion z-buffer cell, pixels")] = 8.0,
    abs_tol: Annotated[float, typer.Option(help="occlusion depth tolerance, metres")] = 0.5,
    rel_tol: Annotated[float, typer.Option(help="occlusion depth tolerance, fraction")] = 0.05,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    no_worker_timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 2: point-pixel pairs per camera (the devkit's projection and mask, + occlusion)."""
    from hilda.pipeline.ops.occlusion import OcclusionRule
    from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps

    cfg = PointmapConfig(
        store=store, occlusion=occlusion, rule=OcclusionRule(cell_px, abs_tol, rel_tol)
    )
    summary = run_pointmaps(
        cfg,
        _stage_options(
            workers, scheduler, overwrite, skip_bad, no_worker_timeout=no_worker_timeout
        ),
    )
    _report("pointmaps", store, summary)


@app.command("build-occupancy")
@fail_cleanly
def build_occupancy_cmd(
    store: Store,
    grid: Grid = GRID,
    cell: Cell = CELL,
    min_height: Annotated[
        float, typer.Option(help="keep points this high above the ground")
    ] = 0.25,
    max_height: Annotated[float, typer.Option(help="... and at most this high")] = 4.0,
    horizon: Annotated[int, typer.Option(min=1, help="keyframes ahead")] = 1,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    no_worker_timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 4: ego-compensated future (t+1) BEV occupancy, ground removed, bit-packed."""
    from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy

    occ = OccupancyConfig(
        grid=grid, cell=cell, min_height=min_height, max_height=max_height, horizon=horizon
    )
    summary = run_occupancy(
        OccupancyStageConfig(store, occ),
        _stage_options(
            workers, scheduler, overwrite, skip_bad, no_worker_timeout=no_worker_timeout
        ),
    )
    _report("occupancy", store, summary)


@app.command("extract-teacher")
@fail_cleanly
def extract_teacher_cmd(
    store: Store,
    teacher: Teacher = None,
    layers: Layers = LAYERS,
    image_size: ImageSize = "448x224",
    norm: Annotated[
        bool, typer.Option(help="apply the final LayerNorm to each block output")
    ] = True,
    codec: Codec = "int8",
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 6,
    device: Device = "cpu",
    name: Annotated[str | None, typer.Option(help="group name under teacher/")] = None,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    no_worker_timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Stage 3: the teacher's multi-layer patch grids and CLS tokens of every camera image."""
    from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

    if teacher is None:  # never a default teacher: a cache of random features looks like any
        raise ConfigError(f"--teacher is required: {TEACHER_CHOICES}")

    cfg = TeacherConfig(
        store=store,
        teacher=teacher,
        layers=layers,
        image_size=parse_size(image_size),
        norm=norm,
        codec=codec,
        batch_size=batch_size,
        device=device,
        name=name,
    )
    summary = run_teacher(
        cfg,
        _stage_options(
            workers,
            scheduler,
            overwrite,
            skip_bad,
            gpu=device == "cuda",
            no_worker_timeout=no_worker_timeout,
        ),
    )
    _report(teacher_path(cfg.group_name()), store, summary)


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


def _prep_plan(
    preset: str | None,
    sets: list[str] | None,
    teacher: str | None,
    layers: str | None = None,
    name: str | None = None,
    grid: int | None = None,
    cell: float | None = None,
) -> PrepPlan:
    """The cache's stages and settings: given explicitly, else what the ``--for`` preset
    needs (``hilda.train.needs``), else the single commands' defaults."""
    from hilda.train.needs import cache_needs, prep_plan

    needs = None
    if preset is not None:
        from hilda.engine.config_io import load_config
        from hilda.train.config import TrainConfig

        needs = cache_needs(load_config(TrainConfig, preset, list(sets or [])))
    return prep_plan(
        needs,
        teacher=teacher,
        layers=layers,
        name=name,
        grid=grid,
        cell=cell,
        default_grid=GRID,
        default_cell=CELL,
        default_layers=LAYERS,
    )


@app.command("all")
@fail_cleanly
def all_cmd(
    out: Store,
    dataset: DatasetName = "nuscenes",
    root: Root = Path("out/synthetic"),
    version: Version = "v1.0-mini",
    split: Split = "all",
    frames_per_shard: FramesPerShard = 32,
    for_preset: ForPreset = None,
    preset_sets: PresetSets = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="teacher source (default: the public weights of the --for preset's size)"
        ),
    ] = None,
    layers: Annotated[str | None, typer.Option(help="lastK or block indices")] = None,
    image_size: ImageSize = "448x224",
    codec: Codec = "int8",
    device: Device = "cpu",
    name: Annotated[str | None, typer.Option(help="teacher group name")] = None,
    grid: Annotated[int | None, typer.Option(help=f"BEV cells per side (default {GRID})")] = None,
    cell: Annotated[
        float | None, typer.Option(help=f"metres per BEV cell (default {CELL})")
    ] = None,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    no_worker_timeout: NoWorkerTimeout = 300.0,
    overwrite: Overwrite = False,
    skip_bad: SkipBad = False,
) -> None:
    """Every stage in order on one Dask cluster: index, build-pointmaps, extract-teacher,
    build-occupancy. With --for PRESET, the teacher blocks, group name and BEV grid the preset
    needs (and only the stages it reads). Resumable."""

    from hilda.pipeline.stages.index import IndexConfig
    from hilda.pipeline.stages.occupancy import OccupancyStageConfig
    from hilda.pipeline.stages.pointmaps import PointmapConfig
    from hilda.pipeline.stages.prepare import PrepareConfig, run_all
    from hilda.pipeline.stages.teacher import TeacherConfig

    plan = _prep_plan(for_preset, preset_sets, teacher, layers, name, grid, cell)
    teacher_cfg = None
    if plan.source is not None:
        teacher_cfg = TeacherConfig(
            out,
            plan.source,
            plan.layers,
            parse_size(image_size),
            codec=codec,
            device=device,
            name=plan.name,
        )
    occupancy = OccupancyStageConfig(out, OccupancyConfig(grid=plan.grid, cell=plan.cell))
    cfg = PrepareConfig(
        index=IndexConfig(
            dataset, str(root), out, version, split, frames_per_shard=frames_per_shard
        ),
        pointmaps=PointmapConfig(out) if plan.teacher else None,
        teacher=teacher_cfg,
        occupancy=occupancy if plan.occupancy else None,
    )
    options = _stage_options(
        workers,
        scheduler,
        overwrite,
        skip_bad,
        gpu=device == "cuda",
        no_worker_timeout=no_worker_timeout,
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
    plan = _prep_plan(for_preset, preset_sets, teacher)
    lines = [
        f"hilda-prep index --dataset {dataset} --root {root} --version {version} "
        f"--split {split} --out {out}"
    ]
    if plan.teacher:
        lines.append(f"hilda-prep build-pointmaps --store {out}")
        named = f" --name {plan.name}" if plan.name else ""
        lines.append(
            f"hilda-prep extract-teacher --store {out} --teacher {plan.source} "
            f"--layers {plan.layers}{named}"
        )
    if plan.occupancy:
        lines.append(
            f"hilda-prep build-occupancy --store {out} --grid {plan.grid} --cell {plan.cell:g}"
        )
    lines.append(f"hilda-train check --config {for_preset} --store {out}")
    typer.echo("\n".join(lines))


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
        table.add_row(
            name,
            "yes" if g["complete"] else "[red]no[/]",
            g["shards_done"],
            f"{g['bytes_per_frame'] / 1024:,.1f}",
            str(g["skipped"]),
            ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in short.items()),
        )
    console.print(table)
    for name, g in info["groups"].items():
        if not name.startswith(teacher_path("")):
            continue
        console.print(f"[bold]{name}[/]")
        for key in TEACHER_SUMMARY_KEYS:
            console.print(f"  {key}: {g[key]}")
        for layer, fid in g["fidelity"].items():
            console.print(
                f"  fidelity {layer}: mean cos {fid['mean_cos']:.6f}, min cos {fid['min_cos']:.6f}"
            )
