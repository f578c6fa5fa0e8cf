"""The training loop: set-up, one optimisation step, logging, checkpoints, export.

Run folder (``--out``): ``config.yaml`` (the resolved config), ``run.json`` (store, teacher,
samples, world size), ``metrics.jsonl`` (one line per logged step), ``tb/`` (TensorBoard),
``checkpoints/last.pt`` (resume point), and at the end ``backbone.pt`` (the student alone,
``hilda.models.convert`` format), ``pointcept_backbone.pth`` (Pointcept's ``state_dict`` with
``module.backbone.`` keys) and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from hilda.atomic import write_json
from hilda.determinism import deterministic_mode
from hilda.engine.checkpoint import load_latest_checkpoint, previous_path, save_checkpoint
from hilda.engine.config_io import from_dict, save_config, to_dict
from hilda.engine.distributed import (
    World,
    device_type,
    init_distributed,
    pick_device,
    shutdown,
)
from hilda.engine.fit import Fit
from hilda.engine.loop import LoopSettings, StepLoss, run_loop
from hilda.engine.metrics import MetricsLog
from hilda.engine.optim import total_steps
from hilda.engine.sampler import ResumableSampler
from hilda.errors import ConfigError
from hilda.models.convert import POINTCEPT_FILE, export_pointcept, save_backbone
from hilda.models.sparse import load_ops
from hilda.store.lock import writer_lock
from hilda.train.config import TrainConfig
from hilda.train.data import (
    Batch,
    CacheDataset,
    CacheInfo,
    SampleIndex,
    check_cache,
    collate,
    sample_index,
    teacher_means,
)
from hilda.train.losses import total_loss
from hilda.train.model import HildaModel

EQ4_TERMS = ("distill", "cls", "aux")


@dataclass(frozen=True)
class RunResult:
    out: Path
    steps: int
    final: dict[str, float]  # last logged metrics
    backbone: Path | None


def step_loss(fit: Fit, batch: Batch, cfg: TrainConfig) -> StepLoss:
    """Forward and Eq. 4 of one batch (the engine's loop runs it under autocast and takes
    the optimiser step)."""
    fit.net.train()
    batch = batch.to(fit.device)
    terms = fit.net(batch)
    loss = total_loss({k: terms[k] for k in EQ4_TERMS if k in terms}, cfg.loss.weights)
    frames = ",".join(str(f) for f in batch.frames.tolist())
    samples = batch.batch_size * fit.world.size
    return StepLoss(loss, dict(terms), f"t0 {frames}", samples)


def train(
    cfg: TrainConfig,
    store: str,
    out: str | Path,
    *,
    resume: bool = False,
    console: Console | None = None,
) -> RunResult:
    """Pre-train on the cache at ``store``; the run folder is ``out``."""
    out = Path(out)
    console = console or Console()
    world = init_distributed(device_type(cfg.run.device))
    load_ops(cfg.model.student.backend)  # before the thread settings (deterministic_mode)
    # One writer per run folder (its main process; the other ranks write nothing there).
    lock = writer_lock(out, "hilda-train run") if world.main else contextlib.nullcontext()
    try:
        with lock, deterministic_mode(cfg.run.deterministic):
            return _train(cfg, store, out, resume, console, world)
    finally:
        shutdown(world)


def _train(
    cfg: TrainConfig, store: str, out: Path, resume: bool, console: Console, world: World
) -> RunResult:
    device = pick_device(cfg.run.device, world)
    ckpt_path = out / "checkpoints" / "last.pt"
    blob = _resume_point(cfg, ckpt_path, console) if resume else None
    if blob is None and (ckpt_path.exists() or previous_path(ckpt_path).exists()):
        raise ConfigError(
            f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or choose "
            "another --out"
        )
    info = check_cache(store, cfg)
    samples = sample_index(store, info, cfg.needs_occupancy)
    per_rank = math.ceil(len(samples.frames) / world.size)
    if per_rank < cfg.optim.batch_size:
        raise ConfigError(
            f"{store}: {len(samples.frames)} samples (excluded: {samples.excluded}) give "
            f"{per_rank} per process, fewer than optim.batch_size={cfg.optim.batch_size}"
        )
    per_epoch = per_rank // cfg.optim.batch_size  # drop_last
    total = total_steps(cfg.optim.epochs, per_epoch, cfg.optim.max_steps)
    torch.manual_seed(cfg.run.seed)
    means = None
    if cfg.loss.center_teacher and cfg.loss.distill:
        means = teacher_means(info, samples.frames, cfg.loss.center_frames)
    model = HildaModel(cfg, info.teacher_dim, means).to(device)
    run = build_fit(cfg, model, world, device, total, per_epoch)
    if blob is not None:
        run.load(blob)
    if world.main:
        _write_run_info(cfg, out, info, samples, world, run, console, resumed=blob is not None)
    tb = out / "tb" if cfg.run.tensorboard else None
    log = MetricsLog(out / "metrics.jsonl", world.main, tb, run.step if blob else -1)
    dataset = CacheDataset(cfg, info, samples)
    sampler = ResumableSampler(dataset, num_replicas=world.size, rank=world.rank, seed=cfg.run.seed)
    try:
        record = _epochs(cfg, run, dataset, sampler, log, ckpt_path, console)
    finally:
        log.close()
    backbone = None
    if world.main:
        backbone = export(model, out)
        summary = {"steps": run.step, "final": record, "backbone": str(backbone)}
        write_json(out / "summary.json", summary)
        console.print(f"[bold green]done[/]: {run.step} steps; backbone -> {backbone}")
    return RunResult(out, run.step, record, backbone)


def _resume_point(cfg: TrainConfig, ckpt_path: Path, console: Console) -> dict:
    """The checkpoint to resume from (the one before the newest when that one is damaged),
    refused if it was written with another config."""

    def warn(text: str) -> None:
        console.print(f"[yellow]warning[/]: {text}")

    blob, ckpt_path = load_latest_checkpoint(ckpt_path, warn)
    saved = to_dict(from_dict(TrainConfig, blob["config"]))
    if saved != to_dict(cfg):
        differ = _differences(saved, to_dict(cfg))
        raise ConfigError(
            f"--resume: {ckpt_path} was written with another config ({', '.join(differ)}); "
            "resume with the same config or start a new --out"
        )
    return blob


def build_fit(
    cfg: TrainConfig,
    model: HildaModel,
    world: World,
    device: torch.device,
    total: int,
    per_epoch: int,
) -> Fit:
    """The engine's state for pre-training: every parameter at ``optim.lr``."""
    o = cfg.optim
    return Fit.build(
        model,
        lambda: [{"params": list(model.parameters()), "lr": o.lr}],
        o,
        world=world,
        device=device,
        total=total,
        per_epoch=per_epoch,
        sync_bn=cfg.run.sync_bn,
        betas=o.betas,
    )


def _write_run_info(
    cfg: TrainConfig,
    out: Path,
    info: CacheInfo,
    samples: SampleIndex,
    world: World,
    run: Fit,
    console: Console,
    resumed: bool,
) -> None:
    """``config.yaml`` and ``run.json`` in the run folder, and the run's one-line summary."""
    b = cfg.optim.batch_size
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    run_info = {
        "store": info.store,
        "teacher": info.teacher,
        "teacher_blocks": {str(k): v for k, v in info.blocks.items()},
        "samples": len(samples.frames),
        "excluded": samples.excluded,
        "world_size": world.size,
        "global_batch": b * world.size,
        "steps": run.total,
        "device": str(run.device),
    }
    write_json(out / "run.json", run_info)
    excluded = ", ".join(f"{v} {k}" for k, v in samples.excluded.items() if v)
    console.print(
        f"[bold]hilda-train[/]: {len(samples.frames)} samples "
        f"(excluded: {excluded or 'none'}), {world.size} process(es) x batch {b}, "
        f"{run.total} steps on {run.device}" + (f", resuming at step {run.step}" if resumed else "")
    )


def _epochs(
    cfg: TrainConfig,
    run: Fit,
    dataset: CacheDataset,
    sampler: ResumableSampler,
    log: MetricsLog,
    ckpt_path: Path,
    console: Console,
) -> dict[str, float]:
    """Train from the run's position to its last step through the engine's loop; returns
    the last step's record."""
    b = cfg.optim.batch_size

    def batches(epoch: int, done: int) -> DataLoader:
        sampler.set_epoch(epoch)
        sampler.start = done * b
        return DataLoader(
            dataset,
            batch_size=b,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            drop_last=True,
            pin_memory=run.device.type == "cuda",
        )

    def save() -> None:
        if run.world.main:
            save_checkpoint(ckpt_path, {**run.state(), "config": to_dict(cfg)})

    settings = LoopSettings("train", cfg.run.log_every, cfg.run.checkpoint_every)
    return run_loop(
        run,
        batches,
        lambda batch: step_loss(run, batch, cfg),
        settings,
        console=console,
        log=log,
        save=save,
    )


def export(model: HildaModel, out: Path) -> Path:
    """``backbone.pt`` (the student alone) and ``pointcept_backbone.pth`` (loads in
    Pointcept as ``weight=...``: ``state_dict`` with ``module.backbone.`` keys)."""
    voxel = model.cfg.model.voxel
    path = save_backbone(model.student, out / "backbone.pt", voxel=voxel)
    export_pointcept(model.student, out / POINTCEPT_FILE, voxel=voxel)
    return path


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
