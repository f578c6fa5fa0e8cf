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

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from hilda.atomic import write_json
from hilda.datasets.labelled import labelled_dataset
from hilda.engine.config_io import to_dict
from hilda.engine.distributed import World
from hilda.engine.fit import Fit
from hilda.engine.loop import StepLoss
from hilda.engine.optim import steps_per_epoch, total_steps
from hilda.errors import HildaError
from hilda.eval.config import SegConfig
from hilda.eval.data import IGNORE, Split, open_split, read_labelled
from hilda.eval.metrics import confusion
from hilda.eval.probe import feature_epoch, run_fit, scores, seg_loss
from hilda.eval.segment import SegmentationHead
from hilda.models.grid import sample_grid
from hilda.store import INDEX, POINTMAPS, POINTS
from hilda.store.reader import CacheReader


def labelled_teacher_points(
    store: str, split: Split, teacher: str | None = None
) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """(teacher group, [(n_i, D) float16 features], [(n_i,) int64 labels]) of every frame of
    the cache that has camera-visible points; its frames must be in ``split``."""
    reader = CacheReader(store, [INDEX, POINTS, POINTMAPS])
    t = reader.teacher(teacher)
    block = t.depth - 1
    if block not in t.blocks:
        raise HildaError(f"{reader.store}: {t.path}/ does not hold its last block")
    by_token = {f.token: f for f in split.frames}
    pair_offsets, sizes = reader.pair_offsets(), reader.image_sizes()
    feats, labels = [], []
    for f, token in enumerate(reader.tokens()):
        if pair_offsets[f + 1] == pair_offsets[f]:
            continue  # skipped frame, or no point in any camera
        frame = by_token.get(str(token))
        if frame is None:
            raise HildaError(
                f"{reader.store}: frame {f} ({token}) is not a labelled frame of the split"
            )
        _, frame_labels = read_labelled(split, frame)
        if len(frame_labels) != reader.point_count(f):
            raise HildaError(
                f"{reader.store}: frame {f} ({token}) holds another sweep than its labels"
            )
        pairs, grid = reader.gather(
            reader.pairs_reads(f), reader.teacher_block_reads(t, block, f)
        )  # grid (V, h, w, D)
        first = np.unique(pairs.point, return_index=True)[1]  # each point's first pair
        cam, uv = torch.from_numpy(pairs.cam[first]), torch.from_numpy(pairs.uv[first])
        size = torch.from_numpy(sizes[f].astype(np.float32))  # (V, 2)
        grid = torch.from_numpy(np.asarray(grid, np.float32))
        feats.append(sample_grid(grid, cam, uv, size).to(torch.float16))  # (n, D)
        labels.append(torch.from_numpy(frame_labels[pairs.point[first]]))
    if not feats:
        raise HildaError(f"{reader.store}: no frame has camera-visible points")
    return t.name, feats, labels


def _confusion(
    head: SegmentationHead, feats: list[torch.Tensor], labels: list[torch.Tensor], classes: int
) -> np.ndarray:
    """(K, K) confusion matrix of the head's predictions over every frame's points."""
    head.eval()
    conf = np.zeros((classes, classes), dtype=np.int64)
    with torch.no_grad():
        for x, y in zip(feats, labels, strict=True):
            pred = head(x.float()).argmax(dim=1).numpy()  # (n,)
            conf += confusion(pred, y.numpy(), classes, IGNORE)
    return conf


def _fit_head(
    cfg: SegConfig,
    train_x: list[torch.Tensor],
    train_y: list[torch.Tensor],
    num_classes: int,
    console: Console,
) -> tuple[SegmentationHead, list[tuple[int, float]], int]:
    """The head trained on the cached teacher features through the engine's loop (one
    process on the CPU); with its loss curve and step count."""
    torch.manual_seed(cfg.seed)
    head = SegmentationHead(train_x[0].shape[1], num_classes)
    per_epoch = steps_per_epoch(len(train_x), cfg.optim.batch_size)
    total = total_steps(cfg.optim.epochs, per_epoch, cfg.optim.max_steps)
    world, device = World(), torch.device("cpu")  # a head on cached features: one process
    fit = Fit.build(
        head,
        lambda: [{"params": list(head.parameters()), "lr": cfg.optim.lr * cfg.optim.head_lr_mult}],
        cfg.optim,
        world=world,
        device=device,
        total=total,
        per_epoch=per_epoch,
    )

    def loss_of(batch: tuple) -> StepLoss:
        head.train()
        return StepLoss(seg_loss(head(batch[0]), batch[1]), samples=len(batch[2]))

    def epoch_batches(epoch: int, start: int) -> Iterator[tuple]:
        return feature_epoch(train_x, train_y, cfg, world, device, epoch, start)

    return head, run_fit(fit, epoch_batches, loss_of, cfg, console), total


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
    dataset = labelled_dataset(cfg.data.dataset)
    if not dataset.has_cameras:
        raise HildaError(
            "the teacher probe reads the camera features of a hilda-prep cache of nuScenes "
            f"frames; {dataset.label} has no camera images"
        )
    version, train_name, val_name = cfg.data.resolved()
    train_split, val_split = open_split(cfg.data, train_name), open_split(cfg.data, val_name)
    name, train_x, train_y = labelled_teacher_points(train_store, train_split, teacher)
    _, val_x, val_y = labelled_teacher_points(val_store, val_split, name)
    classes = train_split.classes
    console.print(
        f"[bold]hilda-eval[/] teacher probe, teacher/{name}: {len(train_x)} {train_name} frames, "
        f"{len(val_x)} {val_name} frames"
    )
    head, curve, total = _fit_head(cfg, train_x, train_y, len(classes), console)
    result = {
        "protocol": "teacher-linear-probe",
        "teacher": name,
        "train_store": train_store,
        "val_store": val_store,
        "version": version,
        "train_points": int(sum(len(y) for y in train_y)),
        "val_points": int(sum(len(y) for y in val_y)),
        "steps": total,
        **scores(_confusion(head, val_x, val_y, len(classes)), classes),
        "loss_curve": curve,
        "seconds": time.perf_counter() - tick,
        "config": to_dict(cfg),
    }
    path = Path(out) if out else Path(f"{train_store.rstrip('/')}.teacher-{name}.linear-probe.json")
    write_json(path, result)
    result["path"] = str(path)
    return result
