"""RankMe of a backbone's point features on cached frames (CleverDistiller Sec. 3.3): a
label-free proxy of how informative pre-trained features are, computed after pre-training
and before any labels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from hilda.atomic import write_json
from hilda.eval.cache import read_points
from hilda.eval.metrics import rankme
from hilda.eval.segment import Init, build_backbone, frame_features

LAYER_NAMES = ("L", "L-1", "L-2", "L-3")  # student layers F_L, F_{L-1}, ...


def backbone_rankme(
    backbone: str | Path,
    store: str,
    *,
    init: Init = "pretrained",
    frames: int | None = 16,
    max_points: int = 25_600,
    seed: int = 0,
    out: str | Path | None = None,
    voxel_size: float | None = None,
) -> dict:
    """RankMe of each student layer's point features over ``max_points`` points drawn
    uniformly from ``frames`` frames evenly spread over the cache (RankMe's paper uses 25,600
    embeddings). ``voxel_size``: for a checkpoint that records none. Writes the result next
    to the checkpoint (``<stem>.rankme[.random-init].json``) or to ``out``."""
    tick = time.perf_counter()
    net = build_backbone(str(backbone), init, seed=seed, voxel_size=voxel_size)
    indices, clouds = read_points(store, frames)
    rng = np.random.default_rng(seed)
    per_frame = max(1, max_points // len(clouds))
    chosen: list[list[torch.Tensor]] = [[] for _ in LAYER_NAMES]
    for cloud in clouds:
        feats = frame_features(net, cloud, layers=tuple(range(len(LAYER_NAMES))))
        rows = torch.from_numpy(rng.choice(len(cloud), min(per_frame, len(cloud)), False))
        for k, f in enumerate(feats):
            chosen[k].append(f[rows])
    scores = {}
    for name, parts in zip(LAYER_NAMES, chosen, strict=True):
        z = torch.cat(parts)  # (P, C_l)
        scores[name] = {"rankme": rankme(z), "dim": int(z.shape[1])}
    result = {
        "backbone": str(backbone),
        "init": init,
        "store": store,
        "frames": indices,
        "points": int(sum(len(p) for p in chosen[0])),
        "layers": scores,
        "rankme": scores["L"]["rankme"],
        "seconds": time.perf_counter() - tick,
    }
    if out is None:
        b = Path(backbone)
        suffix = ".random-init" if init == "random" else ""
        out = b.with_name(f"{b.stem}.rankme{suffix}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    result["path"] = str(out)
    return result
