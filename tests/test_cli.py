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
