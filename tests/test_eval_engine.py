"""hilda-eval's fits on the one engine (``hilda.engine.fit``): a fine-tune on 2 DDP processes
(gloo on CPU) equals one process with the same global batch, and a fine-tune killed with
``kill -9`` mid-run resumes to the uninterrupted run's result. The kill is a real SIGKILL the
run sends itself at a fixed step (synchronised on that event, not on a sleep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic
from hilda.models.convert import save_backbone
from hilda.models.student import StudentConfig, build_student
from hilda.models.voxelize import VoxelConfig

VENV_BIN = Path(sys.executable).parent
TINY = StudentConfig(
    init_dim=8, planes=(8, 16, 16, 16, 16, 16, 16, 16), layers=(1,) * 8, out_channels=16
)
# 4 training frames (3 scenes of 2 keyframes: 2 train scenes, 1 val): a global batch of 2
# splits evenly over 2 processes with no padding, so both layouts see the same batches.
WORLD = dict(format="nuscenes", scenes=3, frames_per_scene=2, seed=3, image_size=(96, 54))

DIES = """
import os, signal, sys
from hilda.eval import probe
real, calls = probe.seg_loss, [0]
def dies_at_step(logits, labels):
    calls[0] += 1
    if calls[0] == int(os.environ["DIE_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no clean-up of any kind
    return real(logits, labels)
probe.seg_loss = dies_at_step
from hilda.cli.eval import app
app(sys.argv[1:], prog_name="hilda-eval")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_world")
    make_synthetic(SyntheticConfig(out=out, **WORLD))
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ddp_backbone") / "backbone.pt"
    return save_backbone(build_student(TINY), path, voxel=VoxelConfig(voxel_size=0.2))


def finetune_args(backbone: Path, root: Path, out: Path, *sets: str) -> list[str]:
    args = ["finetune", "--backbone", str(backbone), "--dataset", "synthetic", "--root", str(root)]
    args += ["--out", str(out)]
    base = (
        "device=cpu",
        "data.num_workers=0",
        "deterministic=true",
        "log_every=1",
        "optim.epochs=10",
        "optim.batch_size=2",
    )
    for s in (*base, *sets):
        args += ["--set", s]
    return args


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )


def test_two_ddp_finetune_processes_equal_one(backbone: Path, world: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    steps = "optim.max_steps=4"  # two epochs of two steps
    res = run([str(VENV_BIN / "hilda-eval"), *finetune_args(backbone, world, one, steps)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    torchrun = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
    res = run(
        [*torchrun, str(VENV_BIN / "hilda-eval"), *finetune_args(backbone, world, two, steps)]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["train_tokens"] == b["train_tokens"] and len(a["train_tokens"]) == 4
    la, lb = (np.array([v for _, v in r["loss_curve"]]) for r in (a, b))
    assert len(la) == len(lb) == 4
    # Synchronised BatchNorm and global-mean losses: equal up to float summation order, which
    # Adam amplifies a little per step (as for pre-training's DDP test).
    np.testing.assert_allclose(lb, la, rtol=1e-3)
    # The tiny random-init net has many near-ties between classes, which that rounding flips:
    # 0.36% of the points here (recorded: losses within 1e-5 relative, mIoU 4e-5 apart); the
    # bounds leave room for other machines' kernels.
    assert abs(a["miou"] - b["miou"]) <= 2e-3, (a["miou"], b["miou"])
    ca, cb = np.array(a["confusion"]), np.array(b["confusion"])
    moved = np.abs(ca - cb).sum() / 2  # points predicted differently
    assert ca.sum() == cb.sum() and moved <= 0.02 * ca.sum(), moved / ca.sum()


def test_a_finetune_killed_with_sigkill_resumes_to_the_same_result(
    backbone: Path, world: Path, tmp_path: Path
) -> None:
    sets = ("optim.max_steps=6", "checkpoint_every=2")
    whole, resumed = tmp_path / "whole.json", tmp_path / "resumed.json"
    res = run([str(VENV_BIN / "hilda-eval"), *finetune_args(backbone, world, whole, *sets)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    killed = run(
        [sys.executable, "-c", DIES, *finetune_args(backbone, world, resumed, *sets)],
        DIE_AT_STEP="4",  # mid-epoch 2, after the step-2 checkpoint
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = tmp_path / "resumed.partial.pt"
    assert partial.exists() and not resumed.exists()

    res = run([str(VENV_BIN / "hilda-eval"), *finetune_args(backbone, world, resumed, *sets)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming from step 2 of 6" in res.stdout
    a, b = json.loads(whole.read_text()), json.loads(resumed.read_text())
    assert [s for s, _ in b["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert b["loss_curve"] == a["loss_curve"]  # deterministic mode: bit for bit
    assert b["confusion"] == a["confusion"] and b["miou"] == a["miou"]
    assert not partial.exists()
    # The metrics log was cut back to the resume point and continued: the same lines.
    lines = [(tmp_path / f"{n}.metrics.jsonl").read_text() for n in ("whole", "resumed")]
    assert lines[0] == lines[1] and len(lines[0].splitlines()) == 6


def test_the_table_runs_under_torchrun(backbone: Path, world: Path, tmp_path: Path) -> None:
    """Every entry trains data-parallel; the processes agree on what is done (a barrier after
    each result) and the first one writes the table."""
    out = tmp_path / "table"
    torchrun = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
    args = ["table", "--backbone", str(backbone), "--nuscenes-root", str(world)]
    args += ["--nuscenes-version", "v1.0-mini", "--fractions", "0.5", "--out", str(out)]
    args += ["--semantickitti-fractions", "", "--waymo-fractions", ""]
    for s in ("optim.max_steps=2", "optim.batch_size=2", "device=cpu", "data.num_workers=0"):
        args += ["--set", s]
    res = run([*torchrun, str(VENV_BIN / "hilda-eval"), *args])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert set(table["rows"]["pretrained"]) == {"nuScenes LP", "nuScenes 50%"}
    for name in ("linear-probe.json", "finetune-50pct.json"):
        assert json.loads((out / name).read_text())["processes"] == 2
    assert res.stdout.count("table ->") == 1  # one process reports
