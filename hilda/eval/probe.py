"""Linear probing and fine-tuning on labelled LiDAR frames (HilDA Sec. 4.1, C.2, D.1):
nuScenes-lidarseg (16 classes) or SemanticKITTI (19 classes).

``run_segmentation`` trains the Sec. C.2 head (and, fine-tuning, the backbone) with
cross-entropy on the training frames, then scores every point of the validation frames:
mIoU and per-class IoU from one confusion matrix. The result is a JSON file next to the
checkpoint (or at ``out``) holding the metrics, the loss curve, the intensity scaling, the
checkpoint's SHA-256 and the resolved config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from hilda.atomic import write_json
from hilda.determinism import deterministic_mode
from hilda.engine.config_io import to_dict
from hilda.engine.distributed import World, pick_device
from hilda.engine.optim import build_optimizer, build_scheduler, steps_per_epoch, total_steps
from hilda.engine.sampler import ResumableSampler
from hilda.eval.config import SegConfig
from hilda.eval.data import (
    IGNORE,
    INTENSITY_RANGE,
    SegBatch,
    SegDataset,
    Split,
    collate_seg,
    file_sha256,
    open_split,
)
from hilda.eval.metrics import confusion, iou_per_class, mean_iou
from hilda.eval.partial import FitState, PartialRun, partial_path
from hilda.eval.segment import Init, Segmenter, build_backbone

# hilda pre-trains on nuScenes and AV2 sweeps, whose intensities are both 0-255: the scale a
# pre-trained backbone's input features were learned on.
PRETRAINING_INTENSITY_RANGE = INTENSITY_RANGE["nuscenes"]


def result_name(mode: str, fraction: float, init: Init, dataset: str = "nuscenes") -> str:
    """A run's JSON file name after its protocol, e.g. ``linear-probe.json``,
    ``finetune-1pct.random-init.json``, ``semantickitti.finetune-1pct.json``."""
    name = "linear-probe" if mode == "linear" else f"finetune-{fraction * 100:g}pct"
    prefix = "semantickitti." if dataset == "semantickitti" else ""
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
    0-1 remission x 255; 1 for nuScenes), so the input features mean the same on both."""
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
    if not bool((labels != IGNORE).any()):  # every point ignored: nothing to learn here
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def _optimizer(model: Segmenter, cfg: SegConfig, total: int):
    groups = [
        {"params": list(model.head.parameters()), "lr": cfg.optim.lr * cfg.optim.head_lr_mult}
    ]
    if not model.frozen:
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.optim.lr})
    return optimizer_for(groups, cfg, total)


def optimizer_for(groups: list[dict], cfg: SegConfig, total: int):
    """AdamW over parameter ``groups`` (each with its peak ``lr``) and a OneCycle schedule of
    ``total`` steps."""
    optimizer = build_optimizer(groups, cfg.optim.weight_decay)
    return optimizer, build_scheduler(optimizer, total, cfg.optim)


def _cached_batches(
    model: Segmenter,
    split: Split,
    cfg: SegConfig,
    device: torch.device,
    console: Console,
    start: int = 0,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, features (N, C), labels (N,)) batches over the frozen backbone's features of
    every training frame, computed once; from step ``start`` on."""
    feats, labels = [], []
    model.eval()
    dataset = SegDataset(split, None, intensity_factor=intensity_factor(split))
    with torch.no_grad():
        for b in _loader(dataset, 1, cfg.data.num_workers):
            b = b.to(device)
            feats.append(model.features(b.points, b.batch).to("cpu", torch.float16))
            labels.append(b.labels.cpu())
    console.print(f"cached frozen features of {len(feats)} training frames")
    return feature_batches(feats, labels, cfg, device, start)


def _start(samples: int, size: int, start: int) -> tuple[int, int]:
    """(epoch, sample offset in it) of optimiser step ``start`` (0-based) of ``size``-frame
    batches over ``samples`` frames an epoch."""
    epoch, batch = divmod(start, steps_per_epoch(samples, size))
    return epoch, batch * size


def feature_batches(
    feats: list[torch.Tensor],
    labels: list[torch.Tensor],
    cfg: SegConfig,
    device: torch.device,
    start: int = 0,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, features (N, C), labels (N,)) batches of ``optim.batch_size`` frames, in an
    order seeded by (seed, epoch), over per-frame features computed once; from step
    ``start`` on."""
    n, size = len(feats), min(cfg.optim.batch_size, len(feats))
    epoch, offset = _start(n, size, start)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for i in range(offset, n, size):
            rows = order[i : i + size].tolist()
            x = torch.cat([feats[r] for r in rows]).to(device, torch.float32)
            y = torch.cat([labels[r] for r in rows]).to(device)
            yield epoch, x, y
        epoch, offset = epoch + 1, 0


def _online_batches(
    split: Split, cfg: SegConfig, device: torch.device, start: int = 0
) -> Iterator[tuple[int, SegBatch]]:
    """(epoch, batch) of augmented frames in the sampler's (seed, epoch) order, from step
    ``start`` on."""
    dataset = SegDataset(split, cfg.augment, cfg.seed, intensity_factor(split))
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=cfg.seed)
    size = min(cfg.optim.batch_size, len(dataset))
    epoch, sampler.start = _start(len(dataset), size, start)
    while True:
        sampler.set_epoch(epoch)
        for b in _loader(dataset, size, cfg.data.num_workers, sampler):
            yield epoch, b.to(device)
        epoch, sampler.start = epoch + 1, 0


def fit(
    loss_of: Callable[[tuple], torch.Tensor],
    batches: Iterator[tuple],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    total: int,
    cfg: SegConfig,
    console: Console,
    state: FitState | None = None,
    save: Callable[[FitState], None] | None = None,
) -> list[tuple[int, float]]:
    """Optimiser steps up to ``total`` over ``batches`` of (epoch, *batch), continuing
    ``state`` (steps done, curve so far; ``batches`` must start after them); returns the loss
    curve (every ``log_every`` steps), shows progress, and hands the state to ``save`` every
    ``checkpoint_every`` steps and after the last."""
    state = state or FitState()
    curve = state.curve
    progress = Progress(
        TextColumn(f"[bold]{cfg.mode}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(cfg.mode, total=total, completed=state.step, status="")
        for step, (epoch, *batch) in zip(range(state.step + 1, total + 1), batches, strict=False):
            loss = loss_of(tuple(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step} (epoch {epoch})")
            if step % cfg.log_every == 0 or step == total:
                curve.append((step, value))
                if not console.is_terminal:
                    console.print(f"{cfg.mode} step {step}/{total} epoch {epoch} loss {value:.4f}")
            progress.update(task, completed=step, status=f"loss {value:.4f}")
            state.step = step
            # The last step is saved too: a failure while scoring keeps the trained weights.
            every = cfg.checkpoint_every
            if save is not None and every and (step % every == 0 or step == total):
                save(state)
    return curve


def evaluate(model: Segmenter, split: Split, cfg: SegConfig, device: torch.device) -> np.ndarray:
    """(K, K) confusion matrix over every point of the split's frames."""
    model.eval()
    k = len(split.classes)
    conf = np.zeros((k, k), dtype=np.int64)
    dataset = SegDataset(split, None, intensity_factor=intensity_factor(split))
    with torch.no_grad():
        for b in _loader(dataset, 1, cfg.data.num_workers):
            b = b.to(device)
            pred = model(b.points, b.batch).argmax(dim=1)  # (N,)
            conf += confusion(pred.cpu().numpy(), b.labels.cpu().numpy(), k, IGNORE)
    return conf


def _train(
    model: Segmenter,
    split: Split,
    cfg: SegConfig,
    device: torch.device,
    total: int,
    console: Console,
    partial: PartialRun,
) -> list[tuple[int, float]]:
    """``total`` steps of the head (linear probe) or of everything (fine-tune), resumed from
    ``partial``'s checkpoint when there is one; the loss curve."""
    optimizer, scheduler = _optimizer(model, cfg, total)
    state = partial.load(model, optimizer, scheduler)
    if state.step:
        console.print(f"resuming from step {state.step} of {total} ({partial.path.name})")
    if state.step >= total:
        return state.curve
    batches = (
        _cached_batches(model, split, cfg, device, console, state.step)
        if cfg.cache_features
        else _online_batches(split, cfg, device, state.step)
    )

    def loss_of(batch: tuple) -> torch.Tensor:
        model.train()
        if cfg.cache_features:
            x, y = batch
            return seg_loss(model.head(x), y)
        (b,) = batch
        return seg_loss(model(b.points, b.batch), b.labels)

    def save(s: FitState) -> None:
        partial.save(s, model, optimizer, scheduler)

    curve = fit(loss_of, batches, optimizer, scheduler, total, cfg, console, state, save)
    batches.close()  # stops a DataLoader mid-epoch (its workers) now, not at garbage collection
    return curve


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
        # LIDAR_TOP sample_data tokens, SemanticKITTI "SS/NNNNNN"): enough to rerun or compare.
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


def run_segmentation(
    cfg: SegConfig,
    backbone: str | Path,
    init: Init = "pretrained",
    *,
    out: str | Path | None = None,
    console: Console | None = None,
) -> dict:
    """Train and score one linear probe / fine-tune run; returns (and writes) the result."""
    console = console or Console()
    tick = time.perf_counter()
    device = pick_device(cfg.device, World())
    _, train_name, val_name = cfg.data.resolved()
    train_split = open_split(cfg.data, train_name, fraction=cfg.data.fraction)
    val_split = open_split(cfg.data, val_name, max_frames=cfg.data.max_val_frames)
    torch.manual_seed(cfg.seed)
    net = build_backbone(str(backbone), init, seed=cfg.seed)
    model = Segmenter(net, len(train_split.classes), frozen=cfg.mode == "linear").to(device)
    n = len(train_split.frames)
    total = total_steps(
        cfg.optim.epochs, steps_per_epoch(n, cfg.optim.batch_size), cfg.optim.max_steps
    )
    what = "linear probe" if cfg.mode == "linear" else f"fine-tune ({cfg.data.fraction:.0%})"
    console.print(
        f"[bold]hilda-eval[/] {what} on {cfg.data.dataset}, {init} backbone {backbone}: {n} of "
        f"{train_split.total} {train_name} frames, {len(val_split.frames)} {val_name} frames, "
        f"{total} steps on {device}"
    )
    if out is None:
        path = result_path(backbone, cfg.mode, cfg.data.fraction, init, cfg.data.dataset)
    else:
        path = Path(out)
    sha = file_sha256(backbone)
    partial = PartialRun(partial_path(path), to_dict(cfg), sha, init)
    with deterministic_mode(cfg.deterministic):  # after build_backbone imported the backend
        curve = _train(model, train_split, cfg, device, total, console, partial)
        train_seconds = time.perf_counter() - tick
        conf = evaluate(model, val_split, cfg, device)
    result = {
        "protocol": "linear-probe" if cfg.mode == "linear" else "finetune",
        "init": init,
        "backbone": str(backbone),
        "backbone_sha256": sha,
        **split_record(cfg, train_split, val_split),
        "steps": total,
        "device": str(device),
        **scores(conf, train_split.classes),
        "loss_curve": curve,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - tick,
        "config": to_dict(cfg),
    }
    write_json(path, result)
    partial.remove()
    result["path"] = str(path)
    return result
