"""What could silently turn a user's run into garbage is an error or visible instead: a random
teacher only when named, a voxel size never guessed, one GPU per Dask worker or an error, the
AMP path's non-finite policy end to end, tensorboard refused at config time, the ops that
deterministic mode cannot make deterministic named once, one writer lock per real store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hilda.cli.prep import app as prep_app
from hilda.engine.config_io import load_config
from hilda.errors import ConfigError
from hilda.pipeline.gpus import WorkerGpus, own_gpu, resolve_layout
from hilda.pipeline.plan import Given, prep_plan, preset_source
from hilda.teachers.spec import SIZES
from hilda.train.config import TrainConfig
from hilda.train.needs import cache_needs
from tests.train_helpers import CONFIGS

# --- the teacher: never a random one by default ---------------------------------------------


def test_every_dinov2_size_has_its_public_weights() -> None:
    for size in ("vits14", "vitb14", "vitl14", "vitg14"):
        assert SIZES[size].hub == f"facebook/dinov2-{_hf_size(size)}"
        assert SIZES[f"{size}_reg"].hub == f"facebook/dinov2-with-registers-{_hf_size(size)}"
    assert all(not v.hub.startswith("random:") for v in SIZES.values())


def _hf_size(size: str) -> str:
    return {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}[size]


def test_a_preset_of_an_unknown_or_no_teacher_size_is_refused() -> None:
    reg = cache_needs(load_config(TrainConfig, "paper_vits", ["data.teacher_arch=vitb14_reg"]))
    assert preset_source(reg) == "facebook/dinov2-with-registers-base"
    odd = cache_needs(load_config(TrainConfig, "paper_vits", ["data.teacher_arch=vitx14"]))
    with pytest.raises(ConfigError, match=r"'vitx14' is no known teacher size: use one of vits14"):
        preset_source(odd)
    tiny = cache_needs(load_config(TrainConfig, CONFIGS / "tiny_cpu.yaml"))
    with pytest.raises(ConfigError, match=r"names no teacher size.*pass --teacher.*random:<size>"):
        prep_plan(tiny, Given())
    named = prep_plan(tiny, Given(teacher="random:vits14"))
    assert named.source == "random:vits14" and named.layers == tiny.layers


def test_a_teacher_stage_without_teacher_is_an_error_listing_the_choices(tmp_path: Path) -> None:
    store = str(tmp_path / "c.zarr")
    for args in (["extract-teacher", "--store", store], ["all", "--out", store]):
        result = CliRunner().invoke(prep_app, args)
        assert result.exit_code == 2, result.output
        assert "--teacher is required" in result.output
        assert "random:<size>" in result.output and "oracle" in result.output
    assert not Path(store).exists()  # refused before anything was written


# --- the voxel size: recorded in every export, never guessed ----------------------------------


def test_every_export_records_what_feeds_it_and_a_bare_one_is_refused(tmp_path: Path) -> None:
    from hilda.eval.segment import build_backbone
    from hilda.models.convert import export_pointcept, save_backbone
    from hilda.models.student import StudentConfig, build_student
    from hilda.models.voxelize import VoxelConfig

    torch.manual_seed(0)
    cfg = StudentConfig(init_dim=8, planes=(8, 8, 8, 8, 8, 8, 8, 8), layers=(1,) * 8)
    model = build_student(cfg)
    voxel = VoxelConfig(voxel_size=0.1)
    pointcept = export_pointcept(model, tmp_path / "pointcept_backbone.pth", voxel=voxel)
    save_backbone(model, tmp_path / "backbone.pt", voxel=voxel)
    blob = torch.load(pointcept, weights_only=True)
    assert blob["hilda"]["voxel"] == {"voxel_size": 0.1, "intensity_scale": 1 / 255}
    assert blob["hilda"]["config"]["in_channels"] == cfg.in_channels
    for path in (pointcept, tmp_path / "backbone.pt"):
        loaded = build_backbone(str(path))
        assert loaded.voxel == voxel and loaded.net.cfg == model.cfg
    # a backbone.pt as written before the voxelisation was required: no "voxel"
    bare = tmp_path / "bare.pt"
    old = torch.load(tmp_path / "backbone.pt", weights_only=True)
    torch.save({k: v for k, v in old.items() if k != "voxel"}, bare)
    with pytest.raises(ConfigError, match=rf"{bare} records no voxel size.*--voxel-size"):
        build_backbone(str(bare))
    # the user's value where none is recorded; a value that contradicts the record is refused
    assert build_backbone(str(bare), voxel_size=0.1).voxel.voxel_size == 0.1
    with pytest.raises(ConfigError, match=r"trained on 0\.1 m voxels, not the 0\.05 m given"):
        build_backbone(str(pointcept), voxel_size=0.05)
    # a diverged run's weights are named, not fed to a probe that fails with "loss is nan"
    state = dict(blob["state_dict"])
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(float("nan"))
    torch.save({**blob, "state_dict": state}, tmp_path / "nan.pth")
    with pytest.raises(
        ConfigError, match=rf"nan\.pth: tensor {name.removeprefix('module.backbone.')} holds"
    ):
        build_backbone(str(tmp_path / "nan.pth"))


# --- one GPU per Dask worker -------------------------------------------------------------------


def _worker(name: str, visible: str | None, count: int, host: str = "node1") -> WorkerGpus:
    return WorkerGpus(f"tcp://{host}:{abs(hash(name)) % 60000}", name, host, visible, count)


def test_local_cluster_workers_take_the_gpu_of_their_number() -> None:
    workers = [_worker(str(i), None, 4) for i in range(4)]
    assert sorted(resolve_layout(workers, local=True).values()) == [0, 1, 2, 3]


def test_external_workers_use_the_gpu_their_environment_gives_them() -> None:
    # dask-cuda: every worker sees all GPUs, its own first; names are addresses
    dask_cuda = [
        _worker(f"w{i}", ",".join(str((i + k) % 4) for k in range(4)), 4) for i in range(4)
    ]
    assert set(resolve_layout(dask_cuda, local=False).values()) == {0}  # each its first
    one_each = [_worker(f"w{i}", str(i), 1) for i in range(2)]
    assert set(resolve_layout(one_each, local=False).values()) == {0}
    numbered = [_worker(str(i), None, 2) for i in range(2)]
    assert sorted(resolve_layout(numbered, local=False).values()) == [0, 1]
    # two machines' workers may use their own GPU 0 each
    hosts = [_worker("a", None, 1, "node1"), _worker("b", None, 1, "node2")]
    assert set(resolve_layout(hosts, local=False).values()) == {0}


def test_a_layout_that_cannot_be_resolved_is_an_error_naming_the_worker() -> None:
    with pytest.raises(ConfigError, match=r"worker gpu-a .* sees 4 GPUs and nothing says"):
        own_gpu(_worker("gpu-a", None, 4), local=False)
    with pytest.raises(ConfigError, match=r"worker w .* sees no CUDA device"):
        own_gpu(_worker("w", "", 0), local=False)
    shared = [_worker(f"w{i}", "0,1", 2) for i in range(2)]  # one list given to every worker
    with pytest.raises(ConfigError, match=r"workers w0 and w1 on node1 would both run on GPU 0"):
        resolve_layout(shared, local=False)


def test_named_workers_of_an_external_scheduler_get_their_own_gpu(monkeypatch) -> None:
    """A scheduler with named workers (CUDA mocked: each reports two GPUs): workers named by
    number get the GPU of their number and a task on each runs there; one
    CUDA_VISIBLE_DEVICES list given to every worker is refused before any task runs."""
    from distributed import Client, Scheduler, SpecCluster, Worker

    from hilda.pipeline import gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spec = {n: {"cls": Worker, "options": {"nthreads": 1, "name": n}} for n in ("0", "1")}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with SpecCluster(workers=spec, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the same two GPUs for every worker
        with pytest.raises(ConfigError, match=r"Dask workers [01] and [01] on .* GPU 0"):
            gpus.assign_gpus(client, local=False)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        layout = gpus.assign_gpus(client, local=False)
        names = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
        assert {names[a]: i for a, i in layout.items()} == {"0": 0, "1": 1}
        for address, index in layout.items():
            assert (
                client.submit(gpus.worker_device, workers=[address], pure=False).result() == index
            )


# --- the AMP path end to end: bf16 on the CPU --------------------------------------------------

AMP = ["optim.amp=true", "optim.amp_dtype=bfloat16", "optim.cpu_amp=true"]
RUN = [
    "data.teacher=vits",
    "data.num_workers=0",
    "data.max_pairs_per_image=200",
    "optim.max_steps=4",
    "run.checkpoint_every=1",
    "run.log_every=1",
    "run.tensorboard=false",
]


def test_a_clean_bf16_cpu_pretraining_trains(train_store: str, tmp_path: Path) -> None:
    from hilda.train.loop import train

    cfg = load_config(TrainConfig, CONFIGS / "tiny_cpu.yaml", [*RUN, *AMP])
    result = train(cfg, train_store, tmp_path / "run")
    assert result.steps == 4 and result.backbone is not None
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.final.items() if k != "time")


def test_a_nan_under_bf16_stops_the_pretraining_and_keeps_its_checkpoint(
    train_store: str, tmp_path: Path, monkeypatch
) -> None:
    from hilda.engine.checkpoint import load_latest_checkpoint
    from hilda.engine.loop import NonFiniteLoss
    from hilda.train import loop

    calls = []

    def poisoned(terms: dict, weights) -> torch.Tensor:
        calls.append(1)
        total = real(terms, weights)
        return total * float("nan") if len(calls) == 3 else total

    real = loop.total_loss
    monkeypatch.setattr(loop, "total_loss", poisoned)
    cfg = load_config(TrainConfig, CONFIGS / "tiny_cpu.yaml", [*RUN, *AMP])
    with pytest.raises(NonFiniteLoss, match=r"step 3 .*frames t0 \d+.*distill .*cls"):
        loop.train(cfg, train_store, tmp_path / "run")
    blob, _ = load_latest_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", print)
    assert blob["step"] == 2  # the last good step's checkpoint, intact
    assert not (tmp_path / "run" / "backbone.pt").exists()


# --- smaller ones --------------------------------------------------------------------------------


def test_tensorboard_asked_for_but_missing_is_refused_at_config_time(monkeypatch) -> None:
    import importlib.util

    from hilda.eval.config import SegConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"run\.tensorboard=true but the tensorboard package"):
        load_config(TrainConfig, "tiny_cpu", ["run.tensorboard=true"])
    load_config(TrainConfig, "tiny_cpu", ["run.tensorboard=false"])
    with pytest.raises(ConfigError, match="tensorboard=true but the tensorboard package"):
        SegConfig(tensorboard=True)


def test_deterministic_mode_names_each_op_without_a_deterministic_kernel_once() -> None:
    code = """
import warnings
from hilda.determinism import deterministic_mode
with deterministic_mode(True):
    for _ in range(3):
        warnings.warn("scatter_add_cuda_kernel does not have a deterministic implementation, "
                      "but you set 'torch.use_deterministic_algorithms(True, warn_only=True)'")
    warnings.warn("index_add_cuda_ does not have a deterministic implementation, but ...")
    warnings.warn("something else")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "[deterministic mode]" in line]
    assert len(lines) == 2, run.stderr
    assert lines[0].startswith("[deterministic mode] scatter_add_cuda_kernel has no deterministic")
    assert "index_add_cuda_" in lines[1] and "something else" in run.stderr


def test_one_lock_per_store_whatever_path_reaches_it(tmp_path: Path, monkeypatch) -> None:
    from hilda.store.lock import LockedError, lock_path, writer_lock
    from tests.test_lock import HOLDER, wait_for

    real = tmp_path / "c.zarr"
    real.mkdir()
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    monkeypatch.chdir(tmp_path)
    assert lock_path(link) == lock_path(real) == lock_path("c.zarr") == lock_path("./link.zarr")
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(real), str(ready), str(release)])
    try:
        wait_for(ready, holder)
        for target in (link, "link.zarr", "c.zarr"):
            with pytest.raises(LockedError, match="test holder"), writer_lock(target, "second"):
                pass
    finally:
        release.touch()
        holder.wait(timeout=60)
    with writer_lock(link, "after"):
        pass
