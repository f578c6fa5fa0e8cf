"""The teacher's own linear probe at the LiDAR points: the ceiling a student distilled from it
can approach.

Each LiDAR point that a camera sees gets the teacher feature the trainer's Eq. 1 target would
be (the last cached block sampled bilinearly at the pair's uv; a point seen by several cameras
takes its first pair), and its lidarseg label. The Sec. C.2 head (BatchNorm1d + Linear) trains
on the training cache's points with the linear-probe schedule and is scored on the validation
cache's points: mIoU over the points the cameras see, not over whole sweeps as the student's
probe is.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.console import Console

from hilda.errors import HildaError
from hilda.eval.config import SegConfig
from hilda.eval.data import CLASSES, IGNORE, Split, open_split, read_labelled
from hilda.eval.metrics import confusion, iou_per_class, mean_iou
from hilda.eval.probe import feature_batches, fit, optimizer_for, seg_loss
from hilda.eval.segment import SegmentationHead
from hilda.train.config import DataConfig, DistillPair, LossConfig, TrainConfig
from hilda.train.config_io import to_dict
from hilda.train.data import check_cache, read_teacher_block
from hilda.train.losses import sample_grid


def labelled_teacher_points(
    store: str, split: Split, teacher: str | None = None
) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """(teacher group, [(n_i, D) float16 features], [(n_i,) int64 labels]) of every frame of
    the cache that has camera-visible points; its frames must be in ``split``."""
    cfg = TrainConfig(
        data=DataConfig(teacher=teacher),
        loss=LossConfig(distill=(DistillPair((0,), 0),), cls=False, aux="none"),
    )
    info = check_cache(store, cfg)
    root = zarr.open_group(info.store, mode="r")
    by_token = {f.token: f for f in split.frames}
    tokens = np.asarray(root["index/token"][:])
    pm_offsets = np.asarray(root["pointmaps/offsets"][:])
    pt_offsets = np.asarray(root["points/offsets"][:])
    feats, labels = [], []
    for f, token in enumerate(tokens):
        a, b = int(pm_offsets[f]), int(pm_offsets[f + 1])
        if a == b:
            continue  # skipped frame, or no point in any camera
        frame = by_token.get(str(token))
        if frame is None:
            raise HildaError(
                f"{info.store}: frame {f} ({token}) is not a labelled frame of the split"
            )
        _, frame_labels = read_labelled(frame, split.lut)
        if len(frame_labels) != pt_offsets[f + 1] - pt_offsets[f]:
            raise HildaError(
                f"{info.store}: frame {f} ({token}) holds another sweep than its labels"
            )
        point = np.asarray(root["pointmaps/point"][a:b], np.int64)
        first = np.unique(point, return_index=True)[1]  # each point's first pair
        cam = torch.from_numpy(np.asarray(root["pointmaps/cam"][a:b], np.int64)[first])
        uv = torch.from_numpy(np.asarray(root["pointmaps/uv"][a:b], np.float32)[first])
        grid = read_teacher_block(root.__getitem__, info, info.blocks[0], f)  # (V, h, w, D)
        size = torch.from_numpy(np.asarray(root["index/image_size"][f], np.float32))  # (V, 2)
        grid = torch.from_numpy(np.asarray(grid, np.float32))
        feats.append(sample_grid(grid, cam, uv, size).to(torch.float16))  # (n, D)
        labels.append(torch.from_numpy(frame_labels[point[first]]))
    if not feats:
        raise HildaError(f"{info.store}: no frame has camera-visible points")
    return str(info.teacher), feats, labels


def run_teacher_probe(
    cfg: SegConfig,
    train_store: str,
    val_store: str,
    *,
    teacher: str | None = None,
    out: str | Path | None = None,
    console: Console | None = None,
) -> dict:
    """Train the head on ``train_store``'s visible points, score ``val_store``'s; returns (and
    writes) the result."""
    console = console or Console()
    tick = time.perf_counter()
    version, train_name, val_name = cfg.data.resolved()
    name, train_x, train_y = labelled_teacher_points(
        train_store, open_split(cfg.data, train_name), teacher
    )
    _, val_x, val_y = labelled_teacher_points(val_store, open_split(cfg.data, val_name), name)
    torch.manual_seed(cfg.seed)
    head = SegmentationHead(train_x[0].shape[1], len(CLASSES))
    total = cfg.optim.epochs * math.ceil(len(train_x) / min(cfg.optim.batch_size, len(train_x)))
    total = min(total, cfg.optim.max_steps or total)
    groups = [{"params": list(head.parameters()), "lr": cfg.optim.lr * cfg.optim.head_lr_mult}]
    optimizer, scheduler = optimizer_for(groups, cfg, total)
    console.print(
        f"[bold]hilda-eval[/] teacher probe, teacher/{name}: {len(train_x)} {train_name} frames, "
        f"{len(val_x)} {val_name} frames, {total} steps"
    )

    def loss_of(batch: tuple) -> torch.Tensor:
        head.train()
        return seg_loss(head(batch[0]), batch[1])

    device = torch.device("cpu")
    batches = feature_batches(train_x, train_y, cfg, device)
    curve = fit(loss_of, batches, optimizer, scheduler, total, cfg, console)
    head.eval()
    conf = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    with torch.no_grad():
        for x, y in zip(val_x, val_y, strict=True):
            pred = head(x.float()).argmax(dim=1).numpy()
            conf += confusion(pred, y.numpy(), len(CLASSES), IGNORE)
    result = {
        "protocol": "teacher-linear-probe",
        "teacher": name,
        "train_store": train_store,
        "val_store": val_store,
        "version": version,
        "train_points": int(sum(len(y) for y in train_y)),
        "val_points": int(sum(len(y) for y in val_y)),
        "steps": total,
        "miou": mean_iou(conf),
        "iou": {
            c: (None if np.isnan(v) else float(v))
            for c, v in zip(CLASSES, iou_per_class(conf), strict=True)
        },
        "confusion": conf.tolist(),
        "loss_curve": curve,
        "seconds": time.perf_counter() - tick,
        "config": to_dict(cfg),
    }
    path = Path(out) if out else Path(f"{train_store.rstrip('/')}.teacher-{name}.linear-probe.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    result["path"] = str(path)
    return result
