"""hilda-eval: what pre-training learned (linear probe, fine-tune, the Table 1 row, RankMe,
figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hilda.cli.common import fail_cleanly
from hilda.datasets.labelled import DATASETS, labelled_dataset
from hilda.store import teacher_path

app = typer.Typer(
    help="Evaluate a pre-trained backbone: linear-probe and fine-tune mIoU, RankMe, figures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Evaluate a pre-trained backbone."""


@app.command("classes")
def classes_cmd(
    dataset: Annotated[
        str, typer.Option("--dataset", help=f"one of {', '.join(DATASETS)}")
    ] = "nuscenes",
) -> None:
    """Print a dataset's evaluation classes (the label indices of its results)."""
    from hilda.errors import ConfigError

    try:
        ds = labelled_dataset(dataset)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo("index  class")
    for i, name in enumerate(ds.classes):
        typer.echo(f"{i:5d}  {name}")
    for line in ds.class_notes():
        typer.echo(line)


Backbone = Annotated[
    Path, typer.Option("--backbone", help="backbone checkpoint (hilda-train's backbone.pt)")
]
ConfigFile = Annotated[
    str | None,
    typer.Option("--config", help="a YAML file or a shipped config, e.g. eval/linear_probe"),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key, e.g. --set optim.epochs=20 (repeatable)"),
]
Dataset = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help=f"one of {', '.join(DATASETS)} (synthetic: the synthetic world in nuScenes "
        "format; in another format it is read as that dataset)",
    ),
]
Root = Annotated[Path | None, typer.Option("--root", help="dataset root")]
InitOpt = Annotated[
    str,
    typer.Option(
        "--init",
        help="pretrained: the checkpoint's weights; random: a fresh student of the same "
        "architecture (the baseline)",
    ),
]
Out = Annotated[
    Path | None, typer.Option("--out", help="result JSON (default: next to the checkpoint)")
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="replace a result already at the output")
]


def _seg_config(
    mode: str,
    config: str | None,
    overrides: list[str] | None,
    dataset: str | None,
    root: Path | None,
    extra: tuple[str, ...] | list[str] = (),
):
    from hilda.engine.config_io import load_config
    from hilda.eval.config import SegConfig

    sets = list(overrides or [])
    sets.append(f"mode={mode}")
    if dataset is not None:
        sets.append(f"data.dataset={dataset}")
    if root is not None:
        sets.append(f"data.root={root}")
    sets.extend(extra)
    return load_config(SegConfig, config, sets)


def _run_seg(cfg, backbone: Path, init: str, out: Path | None, overwrite: bool) -> None:
    from rich.console import Console

    from hilda.eval.probe import run_segmentation
    from hilda.eval.report import result_table

    if init not in ("pretrained", "random"):
        raise typer.BadParameter(f"--init must be pretrained or random, got {init!r}")
    from hilda.engine.distributed import close_process_group, main_process

    console = Console(quiet=not main_process())  # torchrun: the first process reports
    try:
        result = run_segmentation(
            cfg, backbone, init, out=out, console=console, overwrite=overwrite
        )
        console.print(result_table([result]))
        console.print(f"mIoU {100 * result['miou']:.2f} -> {result['path']}")
    finally:
        close_process_group()


@app.command("linear-probe")
@fail_cleanly
def linear_probe_cmd(
    backbone: Backbone,
    dataset: Dataset = None,
    root: Root = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    init: InitOpt = "pretrained",
    out: Out = None,
    overwrite: Overwrite = False,
) -> None:
    """Frozen backbone, BatchNorm + linear head trained with cross-entropy on lidarseg labels;
    mIoU and per-class IoU on the validation frames (HilDA Sec. C.2)."""
    cfg = _seg_config("linear", config, overrides, dataset, root)
    _run_seg(cfg, backbone, init, out, overwrite)


@app.command("teacher-probe")
@fail_cleanly
def teacher_probe_cmd(
    store: Annotated[Path, typer.Option("--store", help="cache of the training split")],
    val_store: Annotated[Path, typer.Option("--val-store", help="cache of the validation split")],
    dataset: Dataset = None,
    root: Root = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="group under teacher/ (default: the only one)")
    ] = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="result JSON (default: next to --store)")
    ] = None,
) -> None:
    """The teacher's own linear probe at the LiDAR points the cameras see (its features at the
    point-pixel pairs, the Eq. 1 targets): what a student distilled from it can approach."""
    from rich.console import Console

    from hilda.eval.report import result_table
    from hilda.eval.teacher_probe import run_teacher_probe

    cfg = _seg_config("linear", config, overrides, dataset, root)
    console = Console()
    result = run_teacher_probe(
        cfg, str(store), str(val_store), teacher=teacher, out=out, console=console
    )
    console.print(result_table([{**result, "backbone": teacher_path(result["teacher"])}]))
    console.print(f"teacher mIoU {100 * result['miou']:.2f} -> {result['path']}")


@app.command("finetune")
@fail_cleanly
def finetune_cmd(
    backbone: Backbone,
    fraction: Annotated[
        float, typer.Option("--fraction", help="labelled training frames used: 0.01 = 1%")
    ] = 1.0,
    dataset: Dataset = None,
    root: Root = None,
    config: ConfigFile = None,
    overrides: Overrides = None,
    init: InitOpt = "pretrained",
    out: Out = None,
    subset: Annotated[
        str | None,
        typer.Option(
            "--subset",
            help="how a fraction 1/k picks frames: scenes (every k-th scene, SLidR; nuScenes' "
            "default) | frames (every k-th frame; SemanticKITTI's and Waymo's default)",
        ),
    ] = None,
    subset_file: Annotated[
        Path | None,
        typer.Option(
            "--subset-file",
            help="train on the frames this file lists (lidar tokens or sweep file names, one "
            "a line, or a .npy of them, e.g. ScaLR's lists)",
        ),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """The whole network trained on a fraction of the labelled frames (Table 1: 1, 5, 10, 25,
    100% of nuScenes by SLidR's scene protocol, 1% of SemanticKITTI as every 100th scan); mIoU
    and per-class IoU on the validation frames."""
    extra = [f"data.fraction={fraction}"]
    if subset is not None and subset_file is not None:
        raise typer.BadParameter("--subset and --subset-file: give one")
    if subset is not None:
        extra.append(f"data.subset={subset}")
    if subset_file is not None:
        extra += ["data.subset=file", f"data.subset_file={subset_file.resolve()}"]
    cfg = _seg_config("finetune", config, overrides, dataset, root, extra)
    _run_seg(cfg, backbone, init, out, overwrite)


def _fractions(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{option}: expected numbers like 0.01,0.1: {text!r}") from None


NuscenesRoot = Annotated[
    Path | None, typer.Option("--nuscenes-root", help="nuScenes with nuScenes-lidarseg")
]
NuscenesVersion = Annotated[
    str | None,
    typer.Option("--nuscenes-version", help="default: the root's (v1.0-trainval, v1.0-mini)"),
]
KittiRoot = Annotated[
    Path | None, typer.Option("--semantickitti-root", help="SemanticKITTI (sequences/...)")
]
Fractions = Annotated[str, typer.Option("--fractions", help="nuScenes fine-tune label fractions")]
KittiFractions = Annotated[
    str, typer.Option("--semantickitti-fractions", help="SemanticKITTI fine-tune fractions")
]
WaymoRoot = Annotated[
    Path | None,
    typer.Option("--waymo-root", help="Waymo Open Dataset v2 (training/, validation/ parquet)"),
]
WaymoFractions = Annotated[
    str, typer.Option("--waymo-fractions", help="Waymo fine-tune label fractions")
]
TableInit = Annotated[
    str,
    typer.Option("--init", help="random: also the random-init baseline of every entry"),
]
LinearConfig = Annotated[
    str, typer.Option("--linear-config", help="the linear probe's config (file or preset)")
]
FinetuneConfig = Annotated[
    str, typer.Option("--finetune-config", help="the fine-tunes' config (file or preset)")
]
TableOverrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="override a key of both configs, or of one with a linear. / finetune. prefix, "
        "e.g. --set data.num_workers=8 --set finetune.optim.epochs=50 (repeatable)",
    ),
]
TableOut = Annotated[
    Path | None,
    typer.Option("--out", help="folder of the results (default: <checkpoint>.table/)"),
]


@app.command("table")
@fail_cleanly
def table_cmd(
    backbone: Backbone,
    nuscenes_root: NuscenesRoot = None,
    nuscenes_version: NuscenesVersion = None,
    semantickitti_root: KittiRoot = None,
    fractions: Fractions = "0.01,0.05,0.1,0.25,1.0",
    semantickitti_fractions: KittiFractions = "0.01",
    waymo_root: WaymoRoot = None,
    waymo_fractions: WaymoFractions = "0.01",
    init: TableInit = "pretrained",
    linear_config: LinearConfig = "eval/linear_probe",
    finetune_config: FinetuneConfig = "eval/finetune",
    overrides: TableOverrides = None,
    out: TableOut = None,
) -> None:
    """One row of Table 1: nuScenes linear probe and 1/5/10/25/100% fine-tunes, SemanticKITTI
    and Waymo 1% fine-tunes, as the given datasets allow; resumable (finished entries are not
    rerun)."""
    from rich.console import Console

    from hilda.eval.table import TableSpec, load_table_configs, rich_table, run_table, table_data

    if init not in ("pretrained", "random"):
        raise typer.BadParameter(f"--init must be pretrained or random, got {init!r}")
    linear, finetune = load_table_configs(linear_config, finetune_config, overrides)
    # Each dataset's options (the names are the registry's keys, not compared here).
    roots = {"nuscenes": nuscenes_root, "semantickitti": semantickitti_root, "waymo": waymo_root}
    roots = {name: str(root) for name, root in roots.items() if root}
    versions = {name: labelled_dataset(name).version_of(root) for name, root in roots.items()}
    if nuscenes_version:
        versions["nuscenes"] = nuscenes_version
    fractions_of = {
        "nuscenes": _fractions(fractions, "--fractions"),
        "semantickitti": _fractions(semantickitti_fractions, "--semantickitti-fractions"),
        "waymo": _fractions(waymo_fractions, "--waymo-fractions"),
    }
    spec = TableSpec(
        backbone=str(backbone),
        linear=linear,
        finetune=finetune,
        datasets=table_data(roots, version=versions, fractions=fractions_of),
        random_init=init == "random",
    )
    folder = out or backbone.with_name(f"{backbone.stem}.table")
    from hilda.engine.distributed import close_process_group, main_process

    console = Console(quiet=not main_process())  # torchrun: the first process reports
    try:
        table = run_table(spec, folder, console)
        console.print(rich_table(table))
        console.print(f"table -> {folder / 'table.md'} and {table['path']}")
    finally:
        close_process_group()


@app.command("gain")
@fail_cleanly
def gain_cmd(
    table: Annotated[Path, typer.Argument(help="a table folder or its table.json")],
    column: Annotated[
        str | None, typer.Option("--column", help="the column to judge, e.g. 'nuScenes LP'")
    ] = None,
    expect: Annotated[
        float | None,
        typer.Option("--expect", help="mIoU points by which pre-training should beat random init"),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 1 when the gain is not above --expect")
    ] = False,
) -> None:
    """Pre-trained minus random-init mIoU of every column of a table made with --init
    random; with --column and --expect, whether the gain is above the expected one."""
    import json

    from hilda.eval.table import gain_verdict, gains

    if (column is None) != (expect is None):
        raise typer.BadParameter("--column and --expect go together")
    path = table / "table.json" if table.is_dir() else table
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist (hilda-eval table writes it)")
    record = json.loads(path.read_text())
    for name, value in gains(record).items():
        typer.echo(f"{name}: {'-' if value is None else f'{100 * value:+.1f}'} points")
    if column is not None and expect is not None:
        ok, text = gain_verdict(record, column, expect / 100)
        typer.echo(text)
        if not ok:
            typer.echo(
                "This run fell short of the expected gain: a broken installation, or a run "
                "outside the spread recorded over pre-training seeds (docs/notes.md says what "
                "moves it between seeds and machines)."
            )
            if strict:
                raise typer.Exit(1)


@app.command("compare")
@fail_cleanly
def compare_cmd(
    results: Annotated[list[Path], typer.Argument(help="result JSON files of hilda-eval runs")],
) -> None:
    """Print several runs' mIoU and per-class IoU side by side."""
    from rich.console import Console

    from hilda.eval.report import read_result, result_table, run_label

    runs = [read_result(p) for p in results]
    console = Console()
    console.print(result_table(runs))
    line = " | ".join(f"{run_label(r).replace(chr(10), ' ')} {100 * r['miou']:.2f}" for r in runs)
    if len(runs) == 2:
        line += f" (difference {100 * (runs[0]['miou'] - runs[1]['miou']):+.2f})"
    console.print(f"mIoU: {line}")


Store = Annotated[str, typer.Option("--store", help="hilda-prep cache (folder or fsspec URL)")]
VoxelSize = Annotated[
    float | None,
    typer.Option("--voxel-size", min=1e-6, help="metres; only for a checkpoint that records none"),
]


@app.command("rankme")
@fail_cleanly
def rankme_cmd(
    backbone: Backbone,
    store: Store,
    frames: Annotated[int, typer.Option("--frames", help="frames spread over the cache")] = 16,
    points: Annotated[int, typer.Option("--points", help="embeddings drawn")] = 25_600,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    init: InitOpt = "pretrained",
    out: Out = None,
    voxel_size: VoxelSize = None,
) -> None:
    """Label-free RankMe of the backbone's point features (each student layer)."""
    from hilda.eval.rank import backbone_rankme

    if init not in ("pretrained", "random"):
        raise typer.BadParameter(f"--init must be pretrained or random, got {init!r}")
    r = backbone_rankme(
        backbone,
        store,
        init=init,
        frames=frames,
        max_points=points,
        seed=seed,
        out=out,
        voxel_size=voxel_size,
    )
    layers = ", ".join(f"{k} {v['rankme']:.2f} / {v['dim']}" for k, v in r["layers"].items())
    typer.echo(
        f"RankMe ({init} backbone, {r['points']} points of {len(r['frames'])} frames): "
        f"{layers} -> {r['path']}"
    )


@app.command("figures")
@fail_cleanly
def figures_cmd(
    backbone: Backbone,
    store: Store,
    out: Annotated[Path, typer.Option("--out", help="folder for the PNGs")],
    frame: Annotated[int, typer.Option("--frame", help="frame index in the cache")] = 0,
    camera: Annotated[str | None, typer.Option("--camera", help="default: the first")] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="group under teacher/ (default: the only)")
    ] = None,
    anchor: Annotated[
        int | None,
        typer.Option("--anchor", help="point index (default: the one seen nearest the centre)"),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option("--run", help="hilda-train run folder (default: the checkpoint's)"),
    ] = None,
    voxel_size: VoxelSize = None,
) -> None:
    """PCA of the point features (from above and on a camera image), cosine-similarity maps
    of an anchor point against the points and the teacher's patches, and loss curves."""
    from hilda.eval.figures import write_figures

    paths = write_figures(
        backbone,
        store,
        out,
        frame=frame,
        camera=camera,
        teacher=teacher,
        anchor=anchor,
        run=run,
        voxel_size=voxel_size,
    )
    typer.echo(f"{len(paths)} figures -> {out}: {', '.join(paths)}")
