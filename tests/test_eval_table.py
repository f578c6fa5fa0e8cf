"""Downstream evaluation on SemanticKITTI (19 classes, remission put on the pre-training
intensity scale) and ``hilda-eval table``: the entries it plans, the configs it gives them,
its files, and resuming (a finished entry is not rerun; another config's result is an error).

The table's learning check (a pre-trained checkpoint beats random init in the row) runs on the
pre-trained tiny checkpoints of tests/test_pretraining_margin.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hilda.cli.eval import app
from hilda.datasets import semantickitti as kitti
from hilda.datasets.io import DatasetError
from hilda.datasets.labelled import NUSCENES
from hilda.engine.config_io import load_config
from hilda.errors import ConfigError, HildaError
from hilda.eval.config import SegConfig, SegDataConfig
from hilda.eval.data import SegDataset, open_split
from hilda.eval.table import (
    TableSpec,
    columns,
    entry_config,
    gain_verdict,
    gains,
    load_table_configs,
    plan,
    run_table,
    table_data,
)
from hilda.eval.teacher_probe import run_teacher_probe
from tests.test_eval import tiny_backbone

QUICK = ["data.num_workers=0", "device=cpu", "log_every=1"]


def test_semantickitti_split_classes_and_intensities(kitti_cfg) -> None:
    cfg = SegDataConfig(dataset="semantickitti", root=str(kitti_cfg.out))
    assert cfg.resolved() == (None, "train", "val")
    train = open_split(cfg, "train")
    val = open_split(cfg, "val")
    assert [f.token for f in val.frames] == ["08/000000"]
    assert len(train.frames) == train.total == 10 and train.classes == kitti.CLASSES
    assert train.dataset == "semantickitti" and train.intensity_range == 1.0
    assert [f.token for f in open_split(cfg, "train", fraction=0.2).frames] == [
        "00/000000",
        "05/000000",  # every 5th scan of 00-07, 09, 10
    ]
    raw = SegDataset(train, None)[3]
    scaled = SegDataset(train, None, intensity_factor=255.0)[3]
    np.testing.assert_array_equal(scaled["points"][:, :3], raw["points"][:, :3])
    np.testing.assert_allclose(scaled["points"][:, 3], raw["points"][:, 3] * 255.0, rtol=1e-6)
    assert raw["points"][:, 3].max() <= 1.0 < scaled["points"][:, 3].max()
    labels = raw["labels"]
    assert labels.min() >= -1 and labels.max() < 19
    assert {kitti.CLASSES.index(c) for c in ("car", "road", "building")} <= set(labels.tolist())


def test_semantickitti_config_errors(kitti_cfg) -> None:
    with pytest.raises(ConfigError, match="nuScenes setting"):
        SegDataConfig(dataset="semantickitti", version="v1.0-mini")
    cfg = SegDataConfig(dataset="semantickitti", root=str(kitti_cfg.out))
    with pytest.raises(DatasetError, match="sequence folder"):
        open_split(cfg, "test")  # 11-21 are not in the world
    with pytest.raises(DatasetError, match="splits are"):
        open_split(cfg, "mini_train")


def test_the_teacher_probe_needs_camera_frames(kitti_cfg, tmp_path: Path) -> None:
    cfg = load_config(SegConfig, "eval/tiny_linear_probe", ["data.dataset=semantickitti"])
    with pytest.raises(HildaError, match="no camera images"):
        run_teacher_probe(cfg, str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"))


def test_finetune_on_semantickitti_from_the_cli(kitti_cfg, tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "backbone.pt")
    args = ["finetune", "--backbone", str(path), "--dataset", "semantickitti"]
    args += ["--root", str(kitti_cfg.out), "--fraction", "0.1"]
    for o in [*QUICK, "optim.max_steps=2", "optim.batch_size=1"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "backbone.semantickitti.finetune-10pct.json").read_text())
    assert saved["dataset"] == "semantickitti" and saved["version"] is None
    assert saved["train_frames"] == 1 and saved["train_frames_total"] == 10
    assert saved["subset"] == {"fraction": 0.1, "rule": "frames", "k": 10}
    assert saved["train_tokens"] == ["00/000000"]  # the exact frames, as SS/NNNNNN
    assert saved["classes"] == list(kitti.CLASSES) and list(saved["iou"]) == list(kitti.CLASSES)
    assert np.array(saved["confusion"]).shape == (19, 19)
    assert saved["intensity"] == {"dataset_range": 1.0, "pretraining_range": 255.0, "factor": 255.0}
    assert "traffic-sign" in res.output  # the per-class table lists SemanticKITTI's classes
    res = CliRunner().invoke(app, ["classes", "--dataset", "semantickitti"])
    assert res.exit_code == 0 and "   18  traffic-sign" in res.output


def spec(backbone: Path, nusc: Path | None, kitti_root: Path | None, **kw) -> TableSpec:
    # nusc_cfg's train split is one scene: a scene subset of it would be empty, so its
    # fractions take every k-th frame.
    sets = ["linear.optim.epochs=2", "finetune.optim.max_steps=1", "optim.batch_size=2"]
    sets.append("finetune.data.subset=frames")
    linear, finetune = load_table_configs(
        "eval/tiny_linear_probe", "eval/tiny_finetune", [*QUICK, *sets]
    )
    fractions = kw.pop("fractions", None)
    roots = {"nuscenes": str(nusc or ""), "semantickitti": str(kitti_root or "")}
    given = {"version": {"nuscenes": "v1.0-mini"}}
    if fractions is not None:
        given["fractions"] = {"nuscenes": fractions}
    return TableSpec(
        backbone=str(backbone),
        linear=linear,
        finetune=finetune,
        datasets=table_data(roots, **given),
        **kw,
    )


def test_table_plan_and_entry_configs(tmp_path: Path) -> None:
    s = spec(tmp_path / "b.pt", tmp_path / "nusc", tmp_path / "kitti", random_init=True)
    assert columns(s) == [
        "nuScenes LP",
        *(f"nuScenes {p}%" for p in (1, 5, 10, 25, 100)),
        "SemanticKITTI 1%",
        "Waymo 1%",  # a column of the row; no root here, so no entry
    ]
    entries = plan(s)
    assert len(entries) == 14 and [e.init for e in entries] == ["pretrained"] * 7 + ["random"] * 7
    assert entries[0].file == "linear-probe.json"
    assert entries[6].file == "semantickitti.finetune-1pct.json"
    assert entries[-1].file == "semantickitti.finetune-1pct.random-init.json"
    lp, kt = entry_config(s, entries[0]), entry_config(s, entries[6])
    assert (lp.mode, lp.optim.epochs, lp.cache_features) == ("linear", 2, True)
    assert lp.data.resolved() == ("v1.0-mini", "mini_train", "mini_val")
    assert (kt.mode, kt.optim.max_steps, kt.data.fraction) == ("finetune", 1, 0.01)
    assert kt.data.resolved() == (None, "train", "val") and kt.data.root.endswith("kitti")
    assert lp.optim.batch_size == kt.optim.batch_size == 2  # unprefixed: both configs
    only_kitti = spec(tmp_path / "b.pt", None, tmp_path / "kitti")
    assert [e.column for e in plan(only_kitti)] == ["SemanticKITTI 1%"]
    with pytest.raises(ConfigError, match="needs a dataset"):
        spec(tmp_path / "b.pt", None, None)
    with pytest.raises(ConfigError, match="fractions"):
        spec(tmp_path / "b.pt", tmp_path, None, fractions=(0.0,))


def test_nuscenes_version_is_found_under_the_root(nusc_cfg, tmp_path: Path) -> None:
    assert NUSCENES.version_of(nusc_cfg.out) == "v1.0-mini"
    with pytest.raises(DatasetError, match="none of the nuScenes versions"):
        NUSCENES.version_of(tmp_path)


def test_table_runs_resumes_and_refuses_another_config(
    nusc_cfg, kitti_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = tiny_backbone(tmp_path / "backbone.pt")
    s = spec(backbone, nusc_cfg.out, kitti_cfg.out, fractions=(0.5,), random_init=True)
    out = tmp_path / "table"
    table = run_table(s, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["table.json", "table.md"]
        + [
            f"{n}{r}{ext}"
            for n in ("linear-probe", "finetune-50pct", "semantickitti.finetune-1pct")
            for r in ("", ".random-init")
            for ext in (".json", ".metrics.jsonl")  # the result and its metrics log
        ]
    )
    rows = table["rows"]
    filled = {init: {c for c, v in row.items() if v is not None} for init, row in rows.items()}
    assert (
        filled["pretrained"]
        == filled["random"]
        == {
            "nuScenes LP",
            "nuScenes 50%",
            "SemanticKITTI 1%",
        }
    )
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| init | nuScenes LP | nuScenes 50% | SemanticKITTI 1% |")
    assert md[2].startswith("| random init |") and md[3].startswith("| pre-trained (backbone.pt)")
    assert table["subsets"] == {"nuScenes 50%": "frames", "SemanticKITTI 1%": "frames"}
    assert md[-1] == "Label fractions: nuScenes 50%: frames, SemanticKITTI 1%: frames"
    kitti_result = json.loads((out / "semantickitti.finetune-1pct.json").read_text())
    assert kitti_result["intensity"]["factor"] == 255.0 and len(kitti_result["iou"]) == 19

    # Resuming runs nothing: every entry is finished with the same config and checkpoint.
    def no_run(*args, **kwargs):
        raise AssertionError("a finished entry was rerun")

    monkeypatch.setattr("hilda.eval.table.run_segmentation", no_run)
    # The operational keys (workers, device, logging) may differ: they change no result.
    operational = {"log_every": 7, "device": "auto", "checkpoint_every": 3}
    again = dataclasses.replace(
        s,
        linear=dataclasses.replace(s.linear, **operational),
        finetune=dataclasses.replace(
            s.finetune, data=dataclasses.replace(s.finetune.data, num_workers=1)
        ),
    )
    again = run_table(again, out)
    assert again["rows"] == table["rows"]
    # Another config is refused, naming the file and the key; nothing is overwritten.
    before = (out / "finetune-50pct.json").read_bytes()
    other = dataclasses.replace(s, finetune=dataclasses.replace(s.finetune, seed=1))
    with pytest.raises(HildaError, match=r"finetune-50pct\.json .*seed"):
        run_table(other, out)
    assert (out / "finetune-50pct.json").read_bytes() == before
    tiny_backbone(backbone, seed=1)  # another checkpoint at the same path
    with pytest.raises(HildaError, match="another checkpoint"):
        run_table(s, out)


def test_table_cli(nusc_cfg, tmp_path: Path) -> None:
    backbone = tiny_backbone(tmp_path / "backbone.pt")
    args = ["table", "--backbone", str(backbone), "--nuscenes-root", str(nusc_cfg.out)]
    args += ["--fractions", "1.0", "--linear-config", "eval/tiny_linear_probe"]
    args += ["--finetune-config", "eval/tiny_finetune"]
    for o in [*QUICK, "linear.optim.epochs=1", "finetune.optim.max_steps=1"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "backbone.table" / "table.json").read_text())
    nusc = next(d for d in table["spec"]["datasets"] if d["dataset"] == "nuscenes")
    assert nusc["version"] == "v1.0-mini"  # found under the root
    assert list(table["rows"]) == ["pretrained"] and "nuScenes 100%" in res.output
    assert table["rows"]["pretrained"]["SemanticKITTI 1%"] is None  # no SemanticKITTI root
    res = CliRunner().invoke(app, ["table", "--backbone", str(backbone)])
    assert res.exit_code == 2 and "needs a dataset" in res.output


def test_gain_of_each_column_and_its_verdict(tmp_path: Path) -> None:
    """``hilda-eval gain``: pre-trained minus random init per column, and a verdict against
    an expected gain that says plainly when it was not reached (exit 1 only with --strict)."""
    table = {
        "columns": ["nuScenes LP", "nuScenes 100%"],
        "rows": {
            "pretrained": {"nuScenes LP": 0.30, "nuScenes 100%": None},
            "random": {"nuScenes LP": 0.20, "nuScenes 100%": 0.25},
        },
    }
    assert gains(table)["nuScenes LP"] == pytest.approx(0.10)
    assert gains(table)["nuScenes 100%"] is None
    ok, text = gain_verdict(table, "nuScenes LP", 0.05)
    assert ok and "+10.0 points" in text and "above the expected +5.0" in text
    ok, text = gain_verdict(table, "nuScenes LP", 0.12)
    assert not ok and "NOT above the expected +12.0" in text
    with pytest.raises(ConfigError, match="random-init entry"):
        gain_verdict(table, "nuScenes 100%", 0.0)
    with pytest.raises(ConfigError, match="no column"):
        gain_verdict(table, "SemanticKITTI 1%", 0.0)
    (tmp_path / "table.json").write_text(json.dumps(table))
    runner = CliRunner()
    res = runner.invoke(app, ["gain", str(tmp_path), "--column", "nuScenes LP", "--expect", "5"])
    assert res.exit_code == 0 and "nuScenes 100%: -" in res.output, res.output
    args = ["gain", str(tmp_path / "table.json"), "--column", "nuScenes LP", "--expect", "12"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "NOT above" in res.output, res.output
    assert runner.invoke(app, [*args, "--strict"]).exit_code == 1
