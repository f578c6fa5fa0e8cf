"""Every command of the three CLIs answers --help; make-synthetic and frames run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from hilda.cli import eval as eval_cli
from hilda.cli import prep, train

APPS = {"hilda-prep": prep.app, "hilda-train": train.app, "hilda-eval": eval_cli.app}


def _commands(app: typer.Typer) -> list[str]:
    return sorted(get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(APPS))
def test_help_for_every_command(name: str) -> None:
    app = APPS[name]
    runner = CliRunner()
    assert runner.invoke(app, ["--help"]).exit_code == 0
    commands = _commands(app)
    assert commands
    for cmd in commands:
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0, (cmd, result.output)
        assert "Usage" in result.output


def test_make_synthetic_then_frames(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "syn"
    result = runner.invoke(
        prep.app,
        [
            "make-synthetic",
            "--out",
            str(out),
            "--scenes",
            "1",
            "--frames-per-scene",
            "2",
            "--image-size",
            "64x36",
            "--seed",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "samples" in result.output
    result = runner.invoke(prep.app, ["frames", "--root", str(out), "--split", "mini_train"])
    assert result.exit_code == 0, result.output
    assert "2 keyframes" in result.output and "driveable_surface" in result.output


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        prep.app, ["make-synthetic", "--out", str(tmp_path), "--image-size", "big"]
    )
    assert result.exit_code != 0 and "expected WxH" in result.output
    result = runner.invoke(
        prep.app, ["make-synthetic", "--out", str(tmp_path), "--format", "kitti"]
    )
    assert result.exit_code == 2 and "format must be" in result.output
    result = runner.invoke(
        prep.app, ["make-synthetic", "--out", str(tmp_path), "--scale", "--format", "av2"]
    )
    assert result.exit_code == 2 and "--scale writes nuScenes" in result.output


def test_make_synthetic_scale(tmp_path: Path) -> None:
    """--scale: a v1.0-trainval world (its few scenes split train / val) of tiny sensors."""
    runner = CliRunner()
    out = tmp_path / "scale"
    args = ["--out", str(out), "--scale", "--scenes", "2", "--frames-per-scene", "2"]
    result = runner.invoke(prep.app, ["make-synthetic", *args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "cameras 64x36" in result.output and "v1.0-trainval" in result.output
    result = runner.invoke(
        prep.app, ["frames", "--root", str(out), "--version", "v1.0-trainval", "--split", "val"]
    )
    assert result.exit_code == 0, result.output
    assert "2 keyframes" in result.output


def test_prep_plan_and_all_for_a_preset(nusc_cfg, tmp_path) -> None:
    """What a preset needs from the cache is derived once: `hilda-prep plan --for` prints it,
    `hilda-prep all --for` builds it, and `hilda-train check` accepts the result."""
    runner = CliRunner()
    res = runner.invoke(
        prep.app, ["plan", "--for", "ablations/table8_separate_last4", "--out", "S"]
    )
    assert res.exit_code == 0, res.output
    assert "--teacher facebook/dinov2-small --layers last4 --name vits14" in res.output
    assert "build-occupancy" not in res.output  # that ablation has no occupancy target
    res = runner.invoke(prep.app, ["plan", "--for", "dinov3_vitb16", "--out", "S"])
    assert "--teacher facebook/dinov3-vitb16-pretrain-lvd1689m --layers last2" in res.output
    assert "--grid 512 --cell 0.4" in res.output

    store = str(tmp_path / "cache.zarr")
    args = ["all", "--for", "tiny_cpu", "--out", store, "--root", str(nusc_cfg.out)]
    args += ["--teacher", "random:vits14", "--image-size", "112x56", "--frames-per-shard", "2"]
    res = runner.invoke(prep.app, args)
    assert res.exit_code == 0, res.output
    res = runner.invoke(train.app, ["check", "--config", "tiny_cpu", "--store", store])
    assert res.exit_code == 0, res.output
