"""hilda-train: the lean trainer on the Zarr cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hilda.cli.common import fail_cleanly

app = typer.Typer(
    help="Pre-train the student on a hilda-prep cache (Eq. 1-4 of the HilDA paper).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Pre-train the student on a hilda-prep cache."""


@app.command("presets")
def presets_cmd() -> None:
    """List the shipped pre-training presets (names for --config)."""
    from hilda.presets import list_presets

    typer.echo("\n".join(list_presets("train")))


Store = Annotated[str, typer.Option("--store", help="hilda-prep cache (folder or fsspec URL)")]
ConfigFile = Annotated[
    str | None,
    typer.Option("--config", help="a preset's name (hilda-train presets) or a YAML file"),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)"),
]


@app.command("run")
@fail_cleanly
def run_cmd(
    store: Store,
    out: Annotated[Path, typer.Option("--out", help="run folder: config, metrics, checkpoints")],
    config: ConfigFile = None,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from OUT/checkpoints/last.pt")
    ] = False,
) -> None:
    """Pre-train the student on the cache. Several processes: `torchrun --nproc_per_node N
    --no-python hilda-train run ...` (gloo on CPU, NCCL on CUDA)."""
    from hilda.engine.config_io import load_config
    from hilda.train.config import TrainConfig
    from hilda.train.loop import train

    cfg = load_config(TrainConfig, config, overrides or [])
    train(cfg, store, out, resume=resume)


@app.command("check")
@fail_cleanly
def check_cmd(store: Store, config: ConfigFile = None, overrides: Overrides = None) -> None:
    """Check that the cache can feed the config (teacher, blocks, stages, schema) and count
    the samples, without training."""
    from hilda.engine.config_io import load_config
    from hilda.train.config import TrainConfig
    from hilda.train.data import check_cache, sample_index

    cfg = load_config(TrainConfig, config, overrides or [])
    info = check_cache(store, cfg)
    samples = sample_index(store, info, cfg.needs_occupancy)
    from hilda.models.scatter import BACKEND as SCATTER

    typer.echo(
        f"ok: {len(samples.frames)} samples; excluded {samples.excluded}; teacher "
        f"{info.teacher} blocks {info.blocks}; scatter reductions on {SCATTER}"
    )


if __name__ == "__main__":
    app()
