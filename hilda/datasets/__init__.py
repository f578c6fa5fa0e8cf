"""Dataset readers: raw nuScenes / Argoverse 2 (and the synthetic world written in their
formats) -> canonical ``Frame`` records. Nothing downstream knows which dataset it reads."""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from hilda.data_schemas.records import Frame
from hilda.errors import ConfigError

DatasetName = Literal["nuscenes", "av2"]


class FrameReader(Protocol):
    frames: list[Frame]
    has_labels: bool
    skipped: dict[str, str]  # scene (or log) -> why part of it was left out (skip_bad)


def open_dataset(
    dataset: DatasetName,
    root: str,
    *,
    version: str = "v1.0-mini",
    split: str = "all",
    keyframe_every: int = 5,
    skip_bad: bool = False,
) -> FrameReader:
    """Reader of one split: nuScenes (``version``, ``split`` in all/devkit splits) or AV2
    (``split`` folder under ``root``, a keyframe every ``keyframe_every`` sweeps; AV2 has no
    "all" folder, so the CLIs' default ``all`` reads ``train``). ``skip_bad``: a nuScenes scene
    whose sample links are broken keeps its reachable samples and is recorded in
    ``skipped`` instead of failing."""
    if dataset == "nuscenes":
        from hilda.datasets.nuscenes_reader import NuScenesReader, NuScenesSource

        return NuScenesReader(
            NuScenesSource(root=root, version=version, split=split, skip_bad=skip_bad)
        )
    if dataset == "av2":
        from hilda.datasets.av2_reader import AV2Reader, AV2Source

        split = "train" if split == "all" else split

        return AV2Reader(AV2Source(root=root, split=split, keyframe_every=keyframe_every))
    raise ConfigError(f"unknown dataset {dataset!r}: use 'nuscenes' or 'av2'")


def neighbour_stats(frames: list[Frame]) -> dict[str, int]:
    """How many frames have a previous / next keyframe, and how many have both."""
    prev = np.array([f.prev is not None for f in frames], dtype=bool)
    nxt = np.array([f.next is not None for f in frames], dtype=bool)
    return {
        "frames": len(frames),
        "with_prev": int(prev.sum()),
        "with_next": int(nxt.sum()),
        "with_both": int((prev & nxt).sum()),
    }
