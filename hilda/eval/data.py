"""Labelled LiDAR frames for the downstream segmentation runs: the splits a config names,
their label-fraction subsets, and the torch dataset and batches of the fits.

Datasets are reached through their protocol and registry (``hilda.datasets.labelled``): a
split carries its classes and its intensity range, so the rest of ``hilda.eval`` is
dataset-free. Labels are class indices 0..K-1, ``IGNORE`` (-1) for what the benchmark leaves
out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hilda.datasets.io import DatasetError
from hilda.datasets.labelled import IGNORE, LabelledFrame, LabelledSplit, labelled_dataset
from hilda.engine import augment
from hilda.engine.augment import AugmentConfig
from hilda.engine.sampler import sample_seed
from hilda.errors import HildaError
from hilda.eval.config import SegDataConfig
from hilda.store.reader import evenly_spaced

Split = LabelledSplit  # the name the evaluation modules use
__all__ = ["IGNORE", "LabelledFrame", "Split"]


def subset(n: int, fraction: float) -> np.ndarray:
    """Indices of the ``fraction`` of n frames a run uses, in order: every k-th frame from the
    first when the fraction is 1/k (Sec. C.2: "1% subsets by sampling every 100th frame"),
    otherwise round(n * fraction) evenly spaced ones."""
    k = round(1.0 / fraction)
    if abs(k * fraction - 1.0) < 1e-9:
        return np.arange(0, n, k, dtype=np.int64)
    return evenly_spaced(n, fraction)


def scene_subset(scenes: tuple[str, ...], frame_scenes: list[str], fraction: float) -> np.ndarray:
    """SLidR's nuScenes label fractions (``downstream/dataloader_nuscenes.py``): walk the
    split's scenes in table order with a counter incremented before the test and keep a scene,
    with all its keyframes, when the counter is a multiple of k = round(1 / fraction), i.e.
    the k-th, 2k-th, ... scene (1% of the 700 train scenes: 7). Indices into ``frame_scenes``
    (each frame's scene), in order."""
    k = max(1, round(1.0 / fraction))
    kept = {name for i, name in enumerate(scenes, 1) if i % k == 0}
    return np.array([i for i, s in enumerate(frame_scenes) if s in kept], dtype=np.int64)


def read_subset_file(path: str | Path) -> list[str]:
    """The entries of a subset list: a text file (one lidar sample_data token or sweep file
    name a line; blank lines and ``#`` comments skipped) or a ``.npy`` array of them (ScaLR's
    lists)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"subset file {path} does not exist")
    if path.suffix == ".npy":
        try:
            entries = [str(e) for e in np.load(path, allow_pickle=False).ravel()]
        except ValueError as exc:
            raise DatasetError(f"subset file {path}: not an array of strings ({exc})") from None
    else:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        entries = [line for line in lines if line]
    if not entries:
        raise DatasetError(f"subset file {path} lists no frame")
    return entries


def file_subset(split: Split, path: str | Path) -> np.ndarray:
    """Indices of the frames a subset file lists, in split order. An entry names a frame by
    its lidar token, by its sweep's path under the dataset root, or by the sweep's file name;
    an entry that names no frame of the split is an error naming it."""
    names: dict[str, int] = {}
    for i, f in enumerate(split.frames):
        lidar = Path(f.lidar_file)
        keys = {f.lidar_token, f.token, lidar.name, str(lidar)}
        if split.root and lidar.is_relative_to(split.root):
            keys.add(str(lidar.relative_to(split.root)))
        names.update(dict.fromkeys(keys - {""}, i))
    entries = read_subset_file(path)
    missing = [e for e in entries if e not in names]
    if missing:
        raise DatasetError(
            f"subset file {path}: {len(missing)} of {len(entries)} entries name no frame of "
            f"this split (first: {missing[0]!r}); entries are lidar tokens or sweep file names"
        )
    return np.array(sorted({names[e] for e in entries}), dtype=np.int64)


def subset_frames(split: Split, cfg: SegDataConfig, fraction: float) -> Split:
    """The frames of ``split`` a run trains on, by ``cfg``'s subset rule, with the rule
    recorded in ``Split.subset``:
    - ``scenes``: every k-th scene with all its keyframes (``scene_subset``, SLidR's nuScenes
      protocol, the default on nuScenes);
    - ``frames``: every k-th frame in split order (``subset``; SemanticKITTI's default, which is
      SLidR's and ScaLR's ``sorted(paths)[::100]`` for 1%);
    - ``file``: the frames a list names (``file_subset``, e.g. ScaLR's lists)."""
    rule, k = cfg.subset_rule, max(1, round(1.0 / fraction))
    if rule == "file":
        keep = file_subset(split, cfg.subset_file)
        record = {"rule": "file", "file": cfg.subset_file, "sha256": file_sha256(cfg.subset_file)}
    elif fraction >= 1.0:
        return split
    elif rule == "scenes":
        keep = scene_subset(split.scenes, [f.scene for f in split.frames], fraction)
        if not len(keep):
            raise DatasetError(
                f"label fraction {fraction:g} keeps every {k}-th scene of the split, and its "
                f"{len(split.scenes)} scenes hold none: use a larger fraction or "
                "data.subset=frames (every k-th frame)"
            )
        scenes = list(dict.fromkeys(split.frames[i].scene for i in keep))
        record = {"rule": "scenes", "k": k, "scenes": scenes}
    else:
        keep = subset(len(split.frames), fraction)
        one_over_k = abs(k * fraction - 1.0) < 1e-9  # else evenly spaced frames: no k
        record = {"rule": "frames", "k": k if one_over_k else None}
    frames = [split.frames[i] for i in keep]
    return dataclasses.replace(split, frames=frames, subset={"fraction": fraction, **record})


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (a result names the exact checkpoint and subset list it used)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_split(
    cfg: SegDataConfig, split: str, *, fraction: float = 1.0, max_frames: int | None = None
) -> Split:
    """The labelled frames of one split: a ``fraction`` of them (``subset``), at most
    ``max_frames`` (evenly spaced)."""
    if not cfg.root:
        raise HildaError("no dataset root: pass --root (or data.root in the config)")
    full = labelled_dataset(cfg.dataset).open_split(cfg.root, split, cfg.resolved()[0])
    if not full.frames:
        raise DatasetError(f"split {split!r} of {cfg.root} has no frames")
    part = subset_frames(full, cfg, fraction)
    if max_frames is not None and max_frames < len(part.frames):
        keep = evenly_spaced(len(part.frames), max_frames / len(part.frames))
        part = dataclasses.replace(part, frames=[part.frames[i] for i in keep])
    return part


def read_labelled(split: Split, frame: LabelledFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) float32 points (intensities on the files' scale) and (N,) int64 labels in
    0..K-1 / IGNORE of one frame of ``split``, read by its dataset."""
    return labelled_dataset(split.dataset).read(split, frame)


class SegDataset(Dataset):
    """Items are (index, epoch); a training item is augmented by one Table F3 draw seeded by
    (seed, epoch, index), so a run is reproducible whatever the worker count. Intensities are
    multiplied by ``intensity_factor``: the factor that puts the split's intensities on the
    scale the backbone was pre-trained on."""

    def __init__(
        self,
        split: Split,
        augment_cfg: AugmentConfig | None,
        seed: int = 0,
        intensity_factor: float = 1.0,
    ) -> None:
        self.split = split
        self.augment = augment_cfg if augment_cfg is not None and augment_cfg.enabled else None
        self.seed = seed
        self.intensity_factor = intensity_factor

    def __len__(self) -> int:
        return len(self.split.frames)

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        frame = self.split.frames[index]
        points, labels = read_labelled(self.split, frame)
        if self.intensity_factor != 1.0:
            points = points * np.array([1.0, 1.0, 1.0, self.intensity_factor], np.float32)
        if self.augment is not None:
            rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
            d = augment.draw(self.augment, rng)
            points = augment.apply_points(points, d, self.augment)
        return {"index": index, "points": points, "labels": labels}


@dataclass
class SegBatch:
    points: torch.Tensor  # (N, 4) float32, all frames of the batch
    batch: torch.Tensor  # (N,) int64 frame of each point, 0..B-1
    labels: torch.Tensor  # (N,) int64 0..K-1 / IGNORE
    index: torch.Tensor  # (B,) int64 frame index in the split

    def to(self, device: torch.device) -> SegBatch:
        return SegBatch(*(t.to(device, non_blocking=True) for t in vars(self).values()))


def collate_seg(samples: list[dict]) -> SegBatch:
    points = torch.from_numpy(np.concatenate([s["points"] for s in samples]))
    labels = torch.from_numpy(np.concatenate([s["labels"] for s in samples]))
    batch = torch.cat(
        [torch.full((len(s["points"]),), i, dtype=torch.int64) for i, s in enumerate(samples)]
    )
    index = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    return SegBatch(points, batch, labels, index)
