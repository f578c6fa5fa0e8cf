"""The shipped presets: found by name or path, listed by ``hilda-train presets``, and present
in a wheel installed into a fresh virtual environment (not only in a checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hilda.engine.config_io import load_config
from hilda.errors import ConfigError
from hilda.presets import list_presets, preset_root, resolve_config
from hilda.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_list_presets() -> None:
    train = list_presets("train")
    papers = {"paper_vits", "paper_vitb", "paper_vitl", "tiny_cpu"}
    dinov3 = {"dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"}
    ptv3 = {"paper_vits_ptv3", "paper_vitb_ptv3", "paper_vitl_ptv3", "tiny_cpu_ptv3"}
    assert papers | dinov3 | ptv3 <= set(train)
    assert "ablations/table8_final_only" in train and len(train) == 45  # 34 ablations
    assert not any(n.startswith("eval/") for n in train)
    assert list_presets("eval") == [
        "eval/finetune",
        "eval/linear_probe",
        "eval/tiny_finetune",
        "eval/tiny_linear_probe",
    ]


def test_resolve_config(tmp_path: Path) -> None:
    want = preset_root() / "tiny_cpu.yaml"
    assert resolve_config("tiny_cpu") == resolve_config("tiny_cpu.yaml") == want
    own = tmp_path / "tiny_cpu.yaml"  # an existing file wins over the preset of its name
    own.write_text("optim:\n  lr: 0.5\n")
    assert resolve_config(own) == own
    assert load_config(TrainConfig, own).optim.lr == 0.5
    with pytest.raises(ConfigError, match="did you mean tiny_cpu"):
        resolve_config("tiny_cpux")
    with pytest.raises(ConfigError, match="neither a file nor a shipped preset"):
        resolve_config(tmp_path / "nothing.yaml")
    # An ablation through its base chain.
    cfg = load_config(TrainConfig, "ablations/table8_final_only")
    assert [p.teacher for p in cfg.loss.distill] == [(0,)]


def test_presets_cli() -> None:
    from hilda.cli.train import app

    result = CliRunner().invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == list_presets("train")


def test_wheel_install_ships_the_presets(tmp_path: Path) -> None:
    """``pip install`` of the built wheel (not the editable checkout) lists and loads them.
    The fresh environment borrows this one's installed dependencies through a path file, so
    the test needs no network."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hilda", src / "hilda", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run = {"check": True, "capture_output": True, "text": True, "cwd": tmp_path}
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], **run)
    (wheel,) = dist.glob("hilda-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], **run)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], **run
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], **run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = (
        "import hilda, sys; from hilda.presets import list_presets; "
        "from hilda.train.config import TrainConfig;"
        " from hilda.engine.config_io import load_config;"
        f" assert hilda.__file__.startswith({site!r}), hilda.__file__;"
        " assert 'ablations/table7_base' in list_presets('train');"
        " print(load_config(TrainConfig, 'paper_vitb').data.teacher_arch)"
    )
    out = subprocess.run([python, "-c", check], env=env, **run)
    assert out.stdout.strip() == "vitb14", out.stderr
    listed = subprocess.run(
        [python, "-c", "from hilda.cli.train import app; app()", "presets"], env=env, **run
    )
    assert listed.stdout.split() == list_presets("train"), listed.stderr
