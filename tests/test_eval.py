"""hilda-eval: labelled splits, the linear probe / fine-tune runs and their JSON, RankMe on a
cache, the figures, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hilda.cli.eval import app
from hilda.datasets.io import DatasetError
from hilda.engine.augment import AugmentConfig
from hilda.engine.config_io import from_dict
from hilda.errors import HildaError
from hilda.eval import probe as seg
from hilda.eval.config import SegConfig, SegDataConfig
from hilda.eval.data import IGNORE, SegDataset, evenly_spaced, open_split, subset
from hilda.eval.figures import SIZES
from hilda.eval.probe import result_path, run_segmentation
from hilda.eval.rank import backbone_rankme
from hilda.eval.segment import Segmenter, build_backbone
from hilda.eval.viz import central_anchor, cosine_to, patch_of, pca_basis, pca_rgb
from hilda.models.convert import save_backbone
from hilda.models.student import StudentConfig, build_student
from hilda.models.voxelize import VoxelConfig

TINY = StudentConfig(
    init_dim=8, planes=(8, 16, 16, 16, 16, 16, 16, 16), layers=(1,) * 8, out_channels=16
)
VOXEL = VoxelConfig(voxel_size=0.2)


def tiny_backbone(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_backbone(build_student(TINY), path, voxel=VOXEL)


def seg_config(root: Path, **over) -> SegConfig:
    data = {"dataset": "synthetic", "root": str(root), "num_workers": 0}
    base = {
        "data": data,
        "optim": {"epochs": 2, "batch_size": 2},
        "device": "cpu",
        "log_every": 1,
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[key] = value
    return from_dict(SegConfig, base)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def figures_cli(backbone: Path, store: str, out: Path, camera: str):
    args = ["--backbone", str(backbone), "--store", store, "--out", str(out)]
    return CliRunner().invoke(app, ["figures", *args, "--teacher", "vits", "--camera", camera])


def test_evenly_spaced_label_fractions() -> None:
    np.testing.assert_array_equal(evenly_spaced(10, 1.0), np.arange(10))
    np.testing.assert_array_equal(evenly_spaced(10, 0.5), [0, 2, 4, 7, 9])
    assert len(evenly_spaced(29130, 0.01)) == 291  # nuScenes train, 1% (Table 1)
    np.testing.assert_array_equal(evenly_spaced(5, 0.01), [0])  # at least one frame
    assert len(evenly_spaced(0, 0.5)) == 0


def test_label_fractions_of_one_over_k_take_every_kth_frame() -> None:
    # Sec. C.2: "we construct 1% subsets by sampling every 100th frame".
    np.testing.assert_array_equal(subset(19130, 0.01), np.arange(0, 19130, 100))
    np.testing.assert_array_equal(subset(10, 0.25), [0, 4, 8])
    np.testing.assert_array_equal(subset(10, 1.0), np.arange(10))
    np.testing.assert_array_equal(subset(10, 0.3), evenly_spaced(10, 0.3))  # not 1/k
    np.testing.assert_array_equal(subset(5, 0.01), [0])


def test_split_reads_mapped_labels(nusc_cfg) -> None:
    cfg = SegDataConfig(dataset="synthetic", root=str(nusc_cfg.out))
    train = open_split(cfg, "mini_train")
    val = open_split(cfg, "mini_val")
    assert len(train.frames) == 3 and len(val.frames) == 3
    assert not {f.token for f in train.frames} & {f.token for f in val.frames}
    item = SegDataset(train, None)[0]
    labels = item["labels"]
    assert len(labels) == len(item["points"]) > 1000
    assert labels.min() >= IGNORE and labels.max() <= 15
    # The synthetic world labels road, buildings and cars: driveable_surface (10), manmade
    # (14), car (3) in the 0-based 16-class order.
    assert {3, 10, 14} <= set(np.unique(labels).tolist())
    frames = dataclasses.replace(cfg, subset="frames")
    assert len(open_split(frames, "mini_train", fraction=0.34).frames) == 1
    assert [f.token for f in open_split(cfg, "mini_val", max_frames=2).frames] == [
        val.frames[0].token,
        val.frames[2].token,
    ]


def test_split_errors_name_the_problem(nusc_cfg, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_split(SegDataConfig(dataset="synthetic", root=str(tmp_path)), "mini_train")
    cfg = SegDataConfig(dataset="synthetic", root=str(nusc_cfg.out))
    split = open_split(cfg, "mini_train")
    frame = split.frames[0]
    bad = tmp_path / "short.bin"
    bad.write_bytes(Path(frame.labels_file).read_bytes()[:-7])
    broken = dataclasses.replace(split, frames=[dataclasses.replace(frame, labels_file=str(bad))])
    with pytest.raises(DatasetError, match=frame.token):
        SegDataset(broken, None)[0]


def test_augmented_items_depend_only_on_seed_epoch_index(nusc_cfg) -> None:
    split = open_split(SegDataConfig(dataset="synthetic", root=str(nusc_cfg.out)), "mini_train")
    a = SegDataset(split, AugmentConfig(), seed=1)
    b = SegDataset(split, AugmentConfig(), seed=1)
    np.testing.assert_array_equal(a[(1, 3)]["points"], b[(1, 3)]["points"])
    assert not np.array_equal(a[(1, 3)]["points"], a[(1, 4)]["points"])
    np.testing.assert_array_equal(a[(1, 3)]["labels"], SegDataset(split, None)[1]["labels"])


def test_random_init_has_the_checkpoints_shape_and_voxels(tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "backbone.pt", seed=5)
    pre = build_backbone(str(path))
    rnd = build_backbone(str(path), "random", seed=0)
    again = build_backbone(str(path), "random", seed=0)
    assert rnd.voxel == pre.voxel == VOXEL and rnd.net.cfg == pre.net.cfg
    w = "conv0p1s1.kernel"
    assert not torch.equal(pre.net.state_dict()[w], rnd.net.state_dict()[w])
    assert torch.equal(rnd.net.state_dict()[w], again.net.state_dict()[w])


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_segmentation_run_trains_what_it_should(
    nusc_cfg, tmp_path: Path, mode: str, monkeypatch
) -> None:
    path = tiny_backbone(tmp_path / "backbone.pt")
    cfg = seg_config(nusc_cfg.out, mode=mode, augment__enabled=mode == "finetune")
    models: list[tuple[Segmenter, dict[str, torch.Tensor]]] = []
    build = seg.Segmenter

    def keep(*args, **kwargs) -> Segmenter:
        model = build(*args, **kwargs)
        models.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(seg, "Segmenter", keep)
    result = run_segmentation(cfg, path)
    # training changed what it should: the head always, the backbone only when fine-tuning
    ((model, initial),) = models
    trained = model.state_dict()
    moved = {
        k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])
    }
    assert any(k.startswith("head.") for k in moved), sorted(moved)
    assert any(k.startswith("backbone.") and "running" not in k for k in moved) == (
        mode == "finetune"
    ), sorted(moved)
    out = Path(result["path"])
    assert out == result_path(path, mode, 1.0, "pretrained") and out.parent == tmp_path
    saved = json.loads(out.read_text())
    assert saved["protocol"] == ("linear-probe" if mode == "linear" else "finetune")
    assert saved["train_frames"] == 3 and saved["val_frames"] == 3 and saved["steps"] == 4
    assert 0.0 <= saved["miou"] <= 1.0 and len(saved["iou"]) == 16
    assert saved["config"]["mode"] == mode and saved["intensity"]["factor"] == 1.0
    assert saved["backbone_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    conf = np.array(saved["confusion"])
    assert conf.shape == (16, 16) and conf.sum() > 1000
    assert all(np.isfinite(v) for _, v in saved["loss_curve"])
    curve = [v for _, v in saved["loss_curve"]]
    assert len(curve) >= 2 and curve[-1] < curve[0], curve  # the loss fell


def test_linear_probe_leaves_the_backbone_untouched(nusc_cfg, tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "backbone.pt")
    backbone = build_backbone(str(path))
    model = Segmenter(backbone, 16, frozen=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not model.backbone.training and model.head.training
    pts = torch.from_numpy(
        SegDataset(open_split(seg_config(nusc_cfg.out).data, "mini_train"), None)[0]["points"]
    )
    logits = model(pts, torch.zeros(len(pts), dtype=torch.long))
    logits.sum().backward()
    assert model.head.linear.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    after = model.backbone.state_dict()  # running BatchNorm statistics too
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cached_features_equal_online_without_augmentation(nusc_cfg, tmp_path: Path) -> None:
    """Caching the frozen features is a speed-up, not another protocol: same seed, same
    frame order, same head updates."""
    path = tiny_backbone(tmp_path / "backbone.pt")
    common = dict(augment__enabled=False, optim__batch_size=3, optim__epochs=3)
    online = run_segmentation(seg_config(nusc_cfg.out, **common), path, out=tmp_path / "a.json")
    cached = run_segmentation(
        seg_config(nusc_cfg.out, cache_features=True, **common), path, out=tmp_path / "b.json"
    )
    # One batch holds every training frame, so the frame order does not matter.
    np.testing.assert_allclose(
        [v for _, v in online["loss_curve"]], [v for _, v in cached["loss_curve"]], rtol=1e-3
    )
    assert abs(online["miou"] - cached["miou"]) < 1e-3


class Killed(Exception):
    """Stands for a run killed mid-way."""


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_an_interrupted_run_resumes_to_the_same_result(
    nusc_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Killed after step 3 of 5 with a checkpoint every 2 steps, the rerun continues from
    step 2 (mid-epoch: 2 steps an epoch) and ends where an uninterrupted run ends."""
    path = tiny_backbone(tmp_path / "backbone.pt")
    linear = mode == "linear"
    cfg = seg_config(
        nusc_cfg.out,
        mode=mode,
        cache_features=linear,  # the linear probe resumes over cached features
        augment__enabled=not linear,
        optim__max_steps=5,
        optim__epochs=10,
        checkpoint_every=2,
        deterministic=True,  # 2-thread sparse kernels differ run to run in the last bits
    )
    whole = run_segmentation(cfg, path, out=tmp_path / "whole.json")
    real, calls = seg.seg_loss, []

    def dies_at_step_4(logits, labels):
        calls.append(1)
        if len(calls) == 4:
            raise Killed
        return real(logits, labels)

    monkeypatch.setattr(seg, "seg_loss", dies_at_step_4)
    with pytest.raises(Killed):
        run_segmentation(cfg, path, out=tmp_path / "resumed.json")
    partial = tmp_path / "resumed.partial.pt"
    assert partial.exists() and not (tmp_path / "resumed.json").exists()
    monkeypatch.setattr(seg, "seg_loss", real)
    other = dataclasses.replace(cfg, seed=1)
    with pytest.raises(HildaError, match=r"resumed\.partial\.pt is a partial run of another"):
        run_segmentation(other, path, out=tmp_path / "resumed.json")
    resumed = run_segmentation(cfg, path, out=tmp_path / "resumed.json")
    assert not partial.exists()  # the finished result removes it
    assert [s for s, _ in resumed["loss_curve"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [v for _, v in resumed["loss_curve"]], [v for _, v in whole["loss_curve"]], rtol=1e-5
    )
    assert resumed["confusion"] == whole["confusion"]


def _rankme_by_numpy(z: np.ndarray) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1) written here from the paper: exp of the entropy
    of the normalised singular values, eps = 1e-7."""
    sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_on_the_cache(train_store: str, tmp_path: Path, monkeypatch) -> None:
    from hilda.eval import rank

    seen: list[np.ndarray] = []

    def recording(z: torch.Tensor) -> float:
        seen.append(z.detach().double().numpy())
        return rankme_impl(z)

    rankme_impl = rank.rankme
    monkeypatch.setattr(rank, "rankme", recording)
    path = tiny_backbone(tmp_path / "backbone.pt")
    result = backbone_rankme(path, train_store, frames=4, max_points=2000)
    assert Path(result["path"]) == tmp_path / "backbone.rankme.json"
    assert set(result["layers"]) == {"L", "L-1", "L-2", "L-3"}
    # each layer's figure is RankMe of the embeddings it drew, computed independently
    assert len(seen) == 4
    for layer, z in zip(result["layers"].values(), seen, strict=True):
        assert z.shape == (result["points"], layer["dim"])
        assert layer["rankme"] == pytest.approx(_rankme_by_numpy(z), rel=1e-6)
        assert 1.0 <= layer["rankme"] <= layer["dim"]
    assert len(result["frames"]) == 4 and result["points"] <= 2000


def test_rankme_of_features_of_known_rank() -> None:
    """Embeddings spanning exactly r directions with equal energy have RankMe r."""
    from hilda.eval.metrics import rankme

    rng = np.random.default_rng(0)
    for r in (1, 3, 7):
        q, _ = np.linalg.qr(rng.normal(size=(32, r)))  # (32, r) orthonormal columns
        u, _ = np.linalg.qr(rng.normal(size=(500, r)))  # (500, r)
        z = u @ q.T * 10.0  # (500, 32): r equal singular values
        assert rankme(torch.from_numpy(z)) == pytest.approx(r, rel=1e-4)


def test_figures_are_pngs_of_the_expected_sizes(train_store: str, tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "run" / "backbone.pt")
    records = [{"step": s, "loss": 2.0 / s, "distill": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = figures_cli(path, train_store, tmp_path / "f", "CAM_BACK")
    assert res.exit_code == 0, res.output
    for name, size in SIZES.items():
        assert png_size(tmp_path / "f" / name) == size, name
    meta = json.loads((tmp_path / "f" / "figures.json").read_text())
    assert meta["camera"] == "CAM_BACK" and meta["teacher"] == "vits"
    from PIL import Image

    with Image.open(tmp_path / "f" / "similarity.png") as img:
        img.verify()


def test_figures_refuse_an_unknown_camera(train_store: str, tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "backbone.pt")
    res = figures_cli(path, train_store, tmp_path, "CAM_NOPE")
    assert res.exit_code == 2 and "CAM_NOPE" in res.output and "CAM_FRONT" in res.output


def test_cli_linear_probe_and_compare(nusc_cfg, tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "backbone.pt")
    runner = CliRunner()
    common = [
        "--backbone",
        str(path),
        "--dataset",
        "synthetic",
        "--root",
        str(nusc_cfg.out),
        "--set",
        "optim.epochs=1",
        "--set",
        "data.num_workers=0",
        "--set",
        "device=cpu",
        "--set",
        "augment.enabled=false",
        "--set",
        "cache_features=true",
    ]
    for init in ("pretrained", "random"):
        res = runner.invoke(app, ["linear-probe", *common, "--init", init])
        assert res.exit_code == 0, res.output
        assert "mIoU" in res.output
    files = sorted(tmp_path.glob("backbone.linear-probe*.json"))
    assert [f.name for f in files] == [
        "backbone.linear-probe.json",
        "backbone.linear-probe.random-init.json",
    ]
    res = runner.invoke(app, ["compare", *map(str, files)])
    assert (
        res.exit_code == 0 and "random backbone" in res.output and "driveable_surface" in res.output
    )
    res = runner.invoke(app, ["compare", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "missing.json" in res.output


def test_viz_maths() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 8)) * np.array([10, 5, 2, 1, 1, 1, 1, 1])
    _, comps = pca_basis(feats)
    assert comps.shape == (8, 3)
    assert abs(comps[0, 0]) > 0.99  # the widest axis comes first
    rgb = pca_rgb(feats)
    assert rgb.shape == (500, 3) and rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_array_equal(rgb, pca_rgb(feats))  # deterministic signs
    np.testing.assert_allclose(
        cosine_to(np.array([1.0, 0]), np.array([[2.0, 0], [0, 3], [-1, 0]])), [1, 0, -1]
    )
    cells = patch_of(np.array([[0.0, 0.0], [1599.9, 899.9], [800, 450]]), (1600, 900), (16, 32))
    np.testing.assert_array_equal(cells, [[0, 0], [15, 31], [8, 16]])
    assert central_anchor(np.array([[0.0, 0], [790, 440], [1600, 900]]), (1600, 900)) == 1
    assert pca_basis(rng.normal(size=(2, 8)))[1][:, 2].tolist() == [0.0] * 8  # rank 1: padded
