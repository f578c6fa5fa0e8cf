"""Shared CLI helpers: clean error reporting, option parsing, and the options the CLIs share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from hilda.errors import HildaError

P = ParamSpec("P")
R = TypeVar("R")
err = Console(stderr=True)


def fail_cleanly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the project's input errors into one red line and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except HildaError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected WxH (e.g. 800x450), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise typer.BadParameter(f"size must be positive, got {text!r}")
    return w, h


# --- the options the CLIs share (each written once) ------------------------------------------

Workers = Annotated[int, typer.Option(min=1, help="local Dask workers (processes)")]
Scheduler = Annotated[str | None, typer.Option(help="address of an existing Dask scheduler")]
NoWorkerTimeout = Annotated[
    float,
    typer.Option(
        "--no-worker-timeout",
        min=0.0,
        help="fail when the cluster has had no worker this many seconds",
    ),
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
LayersOpt = Annotated[str, typer.Option("--layers", help="lastK or block indices, e.g. 10,11")]
ImageSize = Annotated[str, typer.Option(help="WxH fed to the teacher (multiples of its patch)")]
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
KeyframeEvery = Annotated[int, typer.Option(min=1, help="AV2: sweeps per keyframe")]
CacheStore = Annotated[str, typer.Option("--store", help="hilda-prep cache (folder or fsspec URL)")]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)"),
]
