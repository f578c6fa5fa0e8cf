"""Stage 1, ``hilda-prep index``: the index group (frames, poses, calibration) and the points
group (every keyframe sweep, CSR)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import zarr

from hilda.datasets import open_dataset
from hilda.datasets.io import DatasetError, read_lidarseg_labels, read_sweep
from hilda.errors import HildaError
from hilda.pipeline.stages.common import StageOptions, locked_stage, stage_client, write_ragged
from hilda.store.schema import (
    DEFAULT_FRAMES_PER_SHARD,
    INDEX,
    POINTS,
    POINTS_ATTRS,
    POINTS_COLUMNS,
    normalize_store,
)
from hilda.store.writer import (
    done_map,
    index_arrays,
    init_store,
    open_writable,
    prepare_group,
    record_stage,
    stage_config,
    write_index,
)


@dataclass(frozen=True)
class IndexConfig:
    dataset: str
    root: str
    store: str
    version: str = "v1.0-mini"
    split: str = "all"
    keyframe_every: int = 5
    frames_per_shard: int = DEFAULT_FRAMES_PER_SHARD

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", normalize_store(self.store))


def read_sweeps(
    paths: list[str], tokens: list[str], labels: list[str | None]
) -> list[tuple[np.ndarray] | str]:
    """Dask task: per frame its (N, 4) sweep, or the error that names the bad file. A frame's
    per-point label file, when it has one, must hold one label per point: a truncated one is
    found here, at prep, not in a fine-tune's data loader."""
    out: list[tuple[np.ndarray] | str] = []
    for path, token, label_file in zip(paths, tokens, labels, strict=True):
        try:
            points = read_sweep(path, token)
            if label_file:
                read_lidarseg_labels(label_file, len(points), token)
            out.append((points,))
        except DatasetError as exc:
            out.append(str(exc))
    return out


def _open_or_init(cfg: IndexConfig, options: StageOptions) -> zarr.Group:
    """The store to index into: the existing one when it was indexed with this config (a
    resumed run), a new one when there is none or ``--overwrite``; another config is refused."""
    config = {k: v for k, v in asdict(cfg).items() if k != "store"}
    try:
        root = open_writable(cfg.store)
        existing = stage_config(root, INDEX.name)
        if options.overwrite or existing is None:
            raise FileNotFoundError
        if existing != config:
            raise HildaError(
                f"store {cfg.store} was indexed from {existing}, not {config}: use another --out "
                "or --overwrite"
            )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        root = init_store(
            cfg.store, dataset=cfg.dataset, version=cfg.version, split=cfg.split, overwrite=True
        )
        record_stage(root, INDEX.name, config)
    return root


@locked_stage("index")
def run_index(cfg: IndexConfig, options: StageOptions) -> dict[str, int]:
    """The index stage: one row per keyframe (poses, calibration, neighbours, image paths)
    and the keyframes' sweeps."""
    reader = open_dataset(
        cfg.dataset,
        cfg.root,
        version=cfg.version,
        split=cfg.split,  # type: ignore[arg-type]
        keyframe_every=cfg.keyframe_every,
        skip_bad=options.skip_bad,
    )
    frames = reader.frames
    if not frames:
        raise DatasetError(f"no keyframes in {cfg.dataset} {cfg.root} ({cfg.version}, {cfg.split})")
    cameras = list(dict.fromkeys(c.name for f in frames for c in f.cameras))  # first-seen order
    root = _open_or_init(cfg, options)
    dataset_root = os.path.abspath(cfg.root)
    dims = {"F": len(frames), "V": len(cameras)}
    index_attrs = {
        "cameras": cameras,
        "num_frames": len(frames),
        "frames_per_shard": cfg.frames_per_shard,
        "dataset_root": dataset_root,
        "skipped_scenes": dict(sorted(reader.skipped.items())),  # broken links (--skip-bad)
    }
    group = prepare_group(root, INDEX, dims, cfg.frames_per_shard, index_attrs, overwrite=False)
    if not np.all(done_map(group)):
        write_index(group, index_arrays(frames, cameras, dataset_root))

    points = prepare_group(
        root,
        POINTS,
        {**dims, "P": 0},
        cfg.frames_per_shard,
        POINTS_ATTRS,
        overwrite=False,
    )
    paths = [f.lidar_file for f in frames]
    tokens = [f.token for f in frames]
    labels = [f.labels_file for f in frames]
    with stage_client(cfg.store, options.cluster) as client:
        offsets = write_ragged(
            client,
            points,
            store=cfg.store,
            columns=POINTS_COLUMNS,
            compute_fn=read_sweeps,
            compute_args=lambda a, b: (paths[a:b], tokens[a:b], labels[a:b]),
            num_frames=len(frames),
            frames_per_shard=cfg.frames_per_shard,
            skip_bad=options.skip_bad,
            label="points",
        )
    return {
        "frames": len(frames),
        "cameras": len(cameras),
        "points": int(offsets[-1]),
        "skipped": len(points.attrs.get("skipped", {})),
        "damaged scenes": len(reader.skipped),
    }
