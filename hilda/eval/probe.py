"""Linear probing and fine-tuning on labelled LiDAR frames (HilDA Sec. 4.1, C.2, D.1), on
any dataset of the registry (``hilda.datasets.labelled``).

``run_segmentation`` trains the Sec. C.2 head (and, fine-tuning, the backbone) with
cross-entropy on the training frames, then scores every point of the validation frames:
mIoU and per-class IoU from one confusion matrix. The result is a JSON file next to the
checkpoint (or at ``out``) holding the metrics, the loss curve, the intensity scaling, the
checkpoint's SHA-256 and the resolved config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from torch.utils.data import DataLoader, Subset

from hilda.atomic import write_json
from hilda.datasets.labelled import labelled_dataset
from hilda.determinism import deterministic_mode
from hilda.engine.config_io import to_dict
from hilda.engine.distributed import (
    World,
    barrier,
    device_type,
    global_mean,
    init_distributed,
    pick_device,
)
from hilda.engine.fit import Fit
from hilda.engine.loop import LoopSettings, StepLoss, run_loop
from hilda.engine.metrics import MetricsLog
from hilda.engine.optim import steps_per_epoch, total_steps
from hilda.engine.sampler import ResumableSampler
from hilda.errors import ConfigError
from hilda.eval.config import SegConfig
from hilda.eval.data import (
    IGNORE,
    SegBatch,
    SegDataset,
    Split,
    collate_seg,
    file_sha256,
    open_split,
)
from hilda.eval.metrics import confusion, iou_per_class, mean_iou
from hilda.eval.partial import PartialRun, partial_path
from hilda.eval.segment import Init, Segmenter, build_backbone

# hilda pre-trains on nuScenes and AV2 sweeps, whose intensities are both 0-255: the scale a
# pre-trained backbone's input features were learned on.
PRETRAINING_INTENSITY_RANGE = 255.0


def result_name(mode: str, fraction: float, init: Init, dataset: str = "nuscenes") -> str:
    """A run's JSON file name after its protocol, e.g. ``linear-probe.json``,
    ``finetune-1pct.random-init.json``, ``semantickitti.finetune-1pct.json``."""
    name = "linear-probe" if mode == "linear" else f"finetune-{fraction * 100:g}pct"
    prefix = labelled_dataset(dataset).result_prefix
    suffix = ".random-init" if init == "random" else ""
    return f"{prefix}{name}{suffix}.json"


def result_path(
    backbone: str | Path, mode: str, fraction: float, init: Init, dataset: str = "nuscenes"
) -> Path:
    """Where a run's JSON goes by default: next to the checkpoint, e.g.
    ``backbone.linear-probe.json``, ``backbone.semantickitti.finetune-1pct.json``."""
    backbone = Path(backbone)
    return backbone.with_name(f"{backbone.stem}.{result_name(mode, fraction, init, dataset)}")


def intensity_factor(split: Split) -> float:
    """The factor that puts ``split``'s intensities on the pre-training scale (SemanticKITTI's
    0-1 remission x 255; 1 for nuScenes), so the input features mean the same on every
    dataset."""
    return PRETRAINING_INTENSITY_RANGE / split.intensity_range


def _loader(dataset: SegDataset, batch: int, workers: int, sampler=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_seg,
        persistent_workers=False,
    )


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the points not ignored. Under DDP it is this process's share of
    the mean over every process's points (``global_mean``), so N processes train like one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        keep = labels != IGNORE
        per_point = F.cross_entropy(logits[keep], labels[keep], reduction="none")  # (n,)
        return global_mean(per_point.float())
    if not bool((labels != IGNORE).any()):  # every point ignored: nothing to learn here
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def head_groups(model: Segmenter, cfg: SegConfig) -> list[dict]:
    """The parameter groups a run trains: the head at ``lr x head_lr_mult``, and the backbone
    at ``lr`` when fine-tuning."""
    groups = [
        {"params": list(model.head.parameters()), "lr": cfg.optim.lr * cfg.optim.head_lr_mult}
    ]
    if not model.frozen:
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.optim.lr})
    return groups


def local_batch(cfg: SegConfig, world: World, samples: int) -> int:
    """Frames a process takes a step: the global ``optim.batch_size`` (at most the split's
    frames) split evenly over the processes."""
    size = min(cfg.optim.batch_size, samples)
    if size % world.size:
        raise ConfigError(
            f"optim.batch_size={size} frames a step cannot be split over {world.size} "
            "processes: use a multiple of the process count"
        )
    return size // world.size


def frozen_features(
    model: Segmenter, split: Split, cfg: SegConfig, device: torch.device, console: Console
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The frozen backbone's (N, C) float16 features and (N,) labels of every training frame,
    computed once (each process computes all of them: a frozen forward costs less than the
    communication of the features)."""
    feats, labels = [], []
    model.eval()
    dataset = SegDataset(split, None, intensity_factor=intensity_factor(split))
    with torch.no_grad():
        for b in _loader(dataset, 1, cfg.data.num_workers):
            b = b.to(device)
            feats.append(model.features(b.points, b.batch).to("cpu", torch.float16))
            labels.append(b.labels.cpu())
    console.print(f"cached frozen features of {len(feats)} training frames")
    return feats, labels


def feature_epoch(
    feats: list[torch.Tensor],
    labels: list[torch.Tensor],
    cfg: SegConfig,
    world: World,
    device: torch.device,
    epoch: int,
    start: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(features (N, C), labels (N,), frame rows) of this process's share of each
    ``optim.batch_size``-frame batch of ``epoch``, in an order seeded by (seed, epoch), from
    batch ``start`` on."""
    n = len(feats)
    size = local_batch(cfg, world, n) * world.size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    for i in range(start * size, n, size):
        rows = order[i : i + size][world.rank :: world.size].tolist()
        x = torch.cat([feats[r] for r in rows]).to(device, torch.float32)
        y = torch.cat([labels[r] for r in rows]).to(device)
        yield x, y, rows


def online_epochs(
    split: Split, cfg: SegConfig, world: World, device: torch.device
) -> Callable[[int, int], Iterator[SegBatch]]:
    """Per (epoch, batches done): this process's augmented batches of the epoch, in the
    sampler's (seed, epoch) order; the processes' batches together are the global batch."""
    dataset = SegDataset(split, cfg.augment, cfg.seed, intensity_factor(split))
    sampler = ResumableSampler(dataset, num_replicas=world.size, rank=world.rank, seed=cfg.seed)
    size = local_batch(cfg, world, len(dataset))

    def epoch_batches(epoch: int, start: int) -> Iterator[SegBatch]:
        sampler.set_epoch(epoch)
        sampler.start = start * size
        for b in _loader(dataset, size, cfg.data.num_workers, sampler):
            yield b.to(device)

    return epoch_batches


def run_fit(
    fit: Fit,
    epoch_batches: Callable[[int, int], Iterable[Any]],
    loss_of: Callable[[Any], torch.Tensor | StepLoss],
    cfg: SegConfig,
    console: Console,
    curve: list[tuple[int, float]] | None = None,
    save: Callable[[list[tuple[int, float]]], None] | None = None,
    log: MetricsLog | None = None,
) -> list[tuple[int, float]]:
    """The engine's loop from ``fit``'s position to its last step over ``epoch_batches(epoch,
    batches done)``; returns the loss curve (every ``log_every`` steps and the last,
    continuing ``curve``, also written to ``log``) and hands the curve to ``save`` every
    ``checkpoint_every`` steps and after the last."""
    curve = list(curve or [])

    def step(batch: Any) -> StepLoss:
        out = loss_of(batch)
        return out if isinstance(out, StepLoss) else StepLoss(out)

    def logged(record: dict[str, float]) -> None:
        curve.append((int(record["step"]), record["loss"]))
        if log is not None:  # what determines the fit only: a resumed log equals the whole one
            log.write({k: record[k] for k in ("step", "epoch", "lr", "loss")})

    settings = LoopSettings(cfg.mode, cfg.log_every, cfg.checkpoint_every)
    run_loop(
        fit,
        epoch_batches,
        step,
        settings,
        console=console,
        save=None if save is None or not cfg.checkpoint_every else lambda: save(curve),
        on_log=logged,
    )
    return curve


def evaluate(
    model: Segmenter,
    split: Split,
    cfg: SegConfig,
    device: torch.device,
    world: World | None = None,
) -> np.ndarray:
    """(K, K) confusion matrix over every point of the split's frames; under DDP each
    process scores every world.size-th frame and the matrices are summed."""
    world = world or World()
    model.eval()
    k = len(split.classes)
    conf = np.zeros((k, k), dtype=np.int64)
    dataset = SegDataset(split, None, intensity_factor=intensity_factor(split))
    if world.distributed:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.size))
    with torch.no_grad():
        for b in _loader(dataset, 1, cfg.data.num_workers):
            b = b.to(device)
            pred = model(b.points, b.batch).argmax(dim=1)  # (N,)
            conf += confusion(pred.cpu().numpy(), b.labels.cpu().numpy(), k, IGNORE)
    if world.distributed:
        total = torch.from_numpy(conf)
        dist.all_reduce(total)
        conf = total.numpy()
    return conf


def _frames(split: Split, rows: Iterable[int]) -> str:
    """The split's frame tokens at ``rows``, for an error naming a step's frames."""
    return ",".join(split.frames[r].lidar_token for r in rows)


def _batches_and_loss(
    model: Segmenter,
    fit: Fit,
    split: Split,
    cfg: SegConfig,
    device: torch.device,
    world: World,
    console: Console,
) -> tuple[Callable[[int, int], Iterable[Any]], Callable[[Any], StepLoss]]:
    """A fit's epochs of batches and the loss of one: the frozen features computed once
    (``cache_features``), or the (augmented) frames through the backbone."""
    if cfg.cache_features:
        feats, labels = frozen_features(model, split, cfg, device, console)

        def feature_batches(epoch: int, start: int) -> Iterator[tuple]:
            return feature_epoch(feats, labels, cfg, world, device, epoch, start)

        def feature_loss(batch: tuple) -> StepLoss:
            model.train()
            x, y, rows = batch
            frames, samples = _frames(split, rows), len(rows) * world.size
            return StepLoss(seg_loss(fit.net(x), y), frames=frames, samples=samples)

        return feature_batches, feature_loss

    def frame_loss(batch: SegBatch) -> StepLoss:
        model.train()
        frames = _frames(split, batch.index.tolist())
        if model.frozen:  # the backbone runs without a graph; DDP wraps the head
            logits = fit.net(model.features(batch.points, batch.batch))
        else:
            logits = fit.net(batch.points, batch.batch)
        samples = len(batch.index) * world.size
        return StepLoss(seg_loss(logits, batch.labels), frames=frames, samples=samples)

    return online_epochs(split, cfg, world, device), frame_loss


def _train(
    model: Segmenter,
    split: Split,
    cfg: SegConfig,
    device: torch.device,
    world: World,
    total: int,
    console: Console,
    partial: PartialRun,
) -> list[tuple[int, float]]:
    """``total`` steps of the head (linear probe) or of everything (fine-tune) through the
    engine, resumed from ``partial``'s checkpoint when there is one; the loss curve."""
    n = len(split.frames)
    fit = Fit.build(
        model.head if model.frozen else model,
        lambda: head_groups(model, cfg),
        cfg.optim,
        world=world,
        device=device,
        total=total,
        per_epoch=steps_per_epoch(n, cfg.optim.batch_size),
    )
    curve = partial.load(fit, console)
    if fit.step:
        console.print(f"resuming from step {fit.step} of {total} ({partial.path.name})")
    if fit.done:
        return curve
    epoch_batches, loss_of = _batches_and_loss(model, fit, split, cfg, device, world, console)

    def save(curve: list[tuple[int, float]]) -> None:
        if world.main:
            partial.save(fit, curve)

    stem = partial.path.with_name(partial.path.name.removesuffix(".partial.pt"))
    tb = stem.with_name(f"{stem.name}.tb") if cfg.tensorboard else None
    log = MetricsLog(
        stem.with_name(f"{stem.name}.metrics.jsonl"), world.main, tb, fit.step if fit.step else -1
    )
    try:
        return run_fit(fit, epoch_batches, loss_of, cfg, console, curve, save, log)
    finally:
        log.close()


def split_record(cfg: SegConfig, train: Split, val: Split) -> dict:
    """Where a result's frames came from and how their intensities were scaled, for its
    JSON."""
    version, train_name, val_name = cfg.data.resolved()
    return {
        "dataset": cfg.data.dataset,
        "root": cfg.data.root,
        "version": version,
        "train_split": train_name,
        "val_split": val_name,
        "fraction": cfg.data.fraction,
        "train_frames": len(train.frames),
        "train_frames_total": train.total,
        "val_frames": len(val.frames),
        "intensity": {
            "dataset_range": train.intensity_range,
            "pretraining_range": PRETRAINING_INTENSITY_RANGE,
            "factor": intensity_factor(train),
        },
        # The protocol that chose the training frames, and the frames themselves (nuScenes
        # LIDAR_TOP sample_data tokens, SemanticKITTI "SS/NNNNNN", Waymo "<segment>/<time>"):
        # enough to rerun or compare.
        "subset": train.subset,
        "train_tokens": [f.lidar_token for f in train.frames],
    }


def scores(conf: np.ndarray, classes: tuple[str, ...]) -> dict:
    """mIoU, per-class IoU (None where a class never occurs) and the confusion matrix."""
    iou = iou_per_class(conf)
    return {
        "miou": mean_iou(conf),
        "classes": list(classes),
        "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou, strict=True)},
        "confusion": conf.tolist(),
    }


def _output(
    cfg: SegConfig, backbone: str | Path, init: Init, out: str | Path | None, overwrite: bool
) -> Path:
    """The result's path (``out``, else beside the checkpoint); an existing result is refused
    unless ``overwrite``."""
    path = (
        Path(out)
        if out is not None
        else result_path(backbone, cfg.mode, cfg.data.fraction, init, cfg.data.dataset)
    )
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{path} holds a result already: pass --overwrite to replace it (it is kept until "
            "the new one is complete) or --out another file"
        )
    return path


def run_segmentation(
    cfg: SegConfig,
    backbone: str | Path,
    init: Init = "pretrained",
    *,
    out: str | Path | None = None,
    console: Console | None = None,
    overwrite: bool = False,
) -> dict:
    """Train and score one linear probe / fine-tune run; returns (and writes) the result.
    Under torchrun the processes train data-parallel (the global batch split over them) and
    the first one writes the result and the checkpoints. A result already at the output is
    never silently replaced: refused unless ``overwrite`` (the previous file then stays until
    the new one is written whole)."""
    world = init_distributed(device_type(cfg.device))
    console = (console or Console()) if world.main else Console(quiet=True)
    tick = time.perf_counter()
    device = pick_device(cfg.device, world)
    path = _output(cfg, backbone, init, out, overwrite)  # before any work: refused at once
    _, train_name, val_name = cfg.data.resolved()
    train_split = open_split(cfg.data, train_name, fraction=cfg.data.fraction)
    val_split = open_split(cfg.data, val_name, max_frames=cfg.data.max_val_frames)
    torch.manual_seed(cfg.seed)
    net = build_backbone(str(backbone), init, seed=cfg.seed, voxel_size=cfg.voxel_size)
    model = Segmenter(net, len(train_split.classes), frozen=cfg.mode == "linear").to(device)
    n = len(train_split.frames)
    total = total_steps(
        cfg.optim.epochs, steps_per_epoch(n, cfg.optim.batch_size), cfg.optim.max_steps
    )
    what = "linear probe" if cfg.mode == "linear" else f"fine-tune ({cfg.data.fraction:.0%})"
    console.print(
        f"[bold]hilda-eval[/] {what} on {cfg.data.dataset}, {init} backbone {backbone}: {n} of "
        f"{train_split.total} {train_name} frames, {len(val_split.frames)} {val_name} frames, "
        f"{total} steps on {device}" + (f" x {world.size} processes" if world.distributed else "")
    )
    sha = file_sha256(backbone)
    partial = PartialRun(partial_path(path), to_dict(cfg), sha, init)
    with deterministic_mode(cfg.deterministic):  # after build_backbone imported the backend
        curve = _train(model, train_split, cfg, device, world, total, console, partial)
        train_seconds = time.perf_counter() - tick
        conf = evaluate(model, val_split, cfg, device, world)
    result = {
        "protocol": "linear-probe" if cfg.mode == "linear" else "finetune",
        "init": init,
        "backbone": str(backbone),
        "backbone_sha256": sha,
        **split_record(cfg, train_split, val_split),
        **{"steps": total, "device": str(device), "processes": world.size},
        **scores(conf, train_split.classes),
        "loss_curve": curve,
        **{"train_seconds": train_seconds, "seconds": time.perf_counter() - tick},
        "config": to_dict(cfg),
    }
    if world.main:
        write_json(path, result)
        partial.remove()
    barrier()  # every process sees the result before going on (hilda-eval table's resume)
    result["path"] = str(path)
    return result
