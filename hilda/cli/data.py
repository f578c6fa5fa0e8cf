"""hilda-prep's dataset commands: write the synthetic world (``make-synthetic``) and read a
split back through its devkit (``frames``). Registered on ``hilda.cli.prep.app``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hilda.cli.common import DatasetName, KeyframeEvery, Root, Split, Version, parse_size

console = Console()


Format = Annotated[
    str, typer.Option("--format", help="nuscenes, av2, semantickitti or waymo (v2) on-disk format")
]
OutDir = Annotated[Path, typer.Option(help="output folder (the dataset root)")]
Scenes = Annotated[
    int | None, typer.Option(min=1, help="number of scenes (logs) [default: 2; --scale 850]")
]
FramesPerScene = Annotated[
    int | None,
    typer.Option(min=1, help="keyframes per scene, 0.5 s apart [default: 6; --scale 40]"),
]
Seed = Annotated[int, typer.Option(help="world seed; output is deterministic for a seed")]
CameraSize = Annotated[
    str | None,
    typer.Option(help="WxH of landscape cameras (default 800x450 nuscenes, 512x388 av2)"),
]
TableVersion = Annotated[
    str, typer.Option(help="nuScenes table version: v1.0-mini or v1.0-trainval")
]
SweepsPerKeyframe = Annotated[int, typer.Option(min=1, help="AV2: sweeps (10 Hz) per keyframe")]
Scale = Annotated[
    bool,
    typer.Option(
        "--scale",
        help="nuScenes trainval's size with cheap sensors: 850 scenes x 40 keyframes, "
        "8-beam sweeps (~2k points), 64x36 cameras, one map for all logs (a dry run of "
        "the pipeline at scale)",
    ),
]
WriterWorkers = Annotated[
    int | None,
    typer.Option(min=1, help="processes writing nuScenes scenes [default: 1; --scale: cores]"),
]


def make_synthetic_cmd(
    format: Format = "nuscenes",
    out: OutDir = Path("out/synthetic"),
    scenes: Scenes = None,
    frames_per_scene: FramesPerScene = None,
    seed: Seed = 0,
    image_size: CameraSize = None,
    version: TableVersion = "v1.0-mini",
    keyframe_every: SweepsPerKeyframe = 5,
    scale: Scale = False,
    workers: WriterWorkers = None,
) -> None:
    """Generate the procedural driving world and write it in nuScenes, AV2, SemanticKITTI or
    Waymo v2 format."""
    from hilda.datasets.synthetic.generate import make_synthetic, read_hint, world_config

    size = parse_size(image_size) if image_size else None
    cfg = world_config(
        format,
        out,
        scenes=scenes,
        frames_per_scene=frames_per_scene,
        seed=seed,
        image_size=size,
        version=version,
        keyframe_every=keyframe_every,
        scale=scale,
        workers=workers,
    )
    w, h = cfg.resolved_image_size
    cameras = "no cameras" if not cfg.rig.cameras else f"cameras {w}x{h}"
    console.print(
        f"[bold]synthetic world[/] seed {seed}: {cfg.scenes} scenes x {cfg.frames_per_scene} "
        f"keyframes, {format} format, {cameras} -> {out}"
    )
    start = time.perf_counter()
    with _bar() as bar:
        task = bar.add_task("keyframes", total=cfg.scenes * cfg.frames_per_scene)
        counts = make_synthetic(cfg, progress=lambda m: bar.update(task, advance=1, description=m))
    _counts_table(counts, f"wrote {out} in {time.perf_counter() - start:.1f} s")
    console.print(read_hint(cfg))


def _bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _counts_table(counts: dict[str, int], title: str) -> None:
    table = Table(title=title)
    table.add_column("item")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, f"{value:,}")
    console.print(table)


def frames_cmd(
    dataset: DatasetName = "nuscenes",
    root: Root = Path("out/synthetic"),
    version: Version = "v1.0-mini",
    split: Split = "all",
    keyframe_every: KeyframeEvery = 5,
    load: Annotated[bool, typer.Option(help="also read every sweep and label file")] = True,
) -> None:
    """Read a dataset split back through its devkit and summarise its keyframes."""
    from hilda.datasets import open_dataset
    from hilda.datasets.summary import summarise_frames

    reader = open_dataset(
        dataset, str(root), version=version, split=split, keyframe_every=keyframe_every
    )  # type: ignore[arg-type]
    lut = reader.coarse_label_lut if reader.has_labels else None  # type: ignore[attr-defined]
    summary = summarise_frames(reader.frames, lut, load)
    # The release version where the reader's source has one (nuScenes), else the split.
    which = getattr(getattr(reader, "source", None), "version", None) or split
    table = Table(title=f"{dataset} {root} ({which})")
    for col in ("scene", "keyframes", "points per sweep", "cameras"):
        table.add_column(col)
    for sc in summary.scenes:
        pts = "-" if sc.mean_points is None else f"{sc.mean_points:,}"
        table.add_row(sc.scene, str(sc.keyframes), pts, str(sc.cameras))
    console.print(table)
    n = summary.neighbours
    console.print(
        f"{n['frames']} keyframes; {n['with_prev']} with a previous and {n['with_next']} with a "
        f"next keyframe; {n['with_both']} usable as (t-1, t0, t+1) training samples"
    )
    if summary.cameras:
        console.print(f"cameras: {summary.cameras}")
    if summary.class_shares:
        share = ", ".join(f"{c} {100 * v:.1f}%" for c, v in summary.class_shares.items())
        console.print(f"lidarseg points per class (16-class mapping): {share}")
