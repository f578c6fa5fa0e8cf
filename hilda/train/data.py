"""Training data from the hilda-prep cache: the compatibility check, the (t-1, t0) sample
index, a torch Dataset reading one sample's arrays, the resumable distributed sampler and the
collate that builds the sparse batch. It reads the cache through ``hilda.store.reader.CacheReader``.

A sample is keyframe t0 with its previous keyframe t-1 (both distilled) and the t+1 occupancy
of t0 (the diffusion target). Frames without t-1, without a t+1 target, or skipped by a stage
are not samples; they are counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from hilda.engine import augment
from hilda.engine.sampler import sample_seed
from hilda.errors import ConfigError, HildaError
from hilda.geometry import ego_compensate
from hilda.models.grid import QuantizedGrid
from hilda.store import INDEX, OCCUPANCY, POINTMAPS, POINTS
from hilda.store.reader import (
    CacheMismatchError,
    CacheReader,
    Pairs,
    Reads,
    TeacherGroup,
    evenly_spaced,
)
from hilda.store.teacher_record import FAMILY_LABELS, SIZES, Layers
from hilda.train.config import TrainConfig
from hilda.train.needs import CacheNeeds, cache_needs


@dataclass(frozen=True)
class CacheInfo:
    """What the trainer needs to know of a cache that passed ``check_cache``."""

    store: str
    cameras: int
    teacher_group: TeacherGroup | None = None
    blocks: dict[int, int] = field(default_factory=dict)  # offset from last -> stored block
    occupancy_grid: int = 0
    occupancy_cell: float = 0.0

    @property
    def teacher(self) -> str | None:
        """The teacher group's name under teacher/."""
        return self.teacher_group.name if self.teacher_group else None

    @property
    def teacher_dim(self) -> int:
        return self.teacher_group.dim if self.teacher_group else 0


def check_cache(store: str, cfg: TrainConfig) -> CacheInfo:
    """Check the cache against the config before anything trains; every mismatch is a
    CacheMismatchError naming the hilda-prep command that fixes it."""
    needs = cache_needs(cfg)
    groups = [INDEX, POINTS]
    groups += [POINTMAPS] if needs.pointmaps else []
    groups += [OCCUPANCY] if needs.occupancy else []
    reader = CacheReader(store, groups)
    info: dict = {"store": reader.store, "cameras": len(reader.cameras)}
    if needs.teacher:
        info.update(_check_teacher(reader, cfg))
        groups.append(info["teacher_group"].path)
    reader.check_files(groups)  # nothing read that was not written: sizes, every shard
    if needs.occupancy:
        info.update(_check_occupancy(reader, needs))
    return CacheInfo(**info)


def _check_occupancy(reader: CacheReader, needs: CacheNeeds) -> dict:
    occ, store = reader.occupancy_attrs(), reader.store
    grid = occ["grid"][0] if isinstance(occ["grid"], list) else occ["grid"]
    cell = float(occ["cell"])
    if grid != needs.grid or abs(cell - needs.cell) > 1e-6:
        raise CacheMismatchError(
            f"{store}: occupancy/ is {grid}x{grid} cells of {cell} m, the config wants "
            f"{needs.grid} cells of {needs.cell:g} m (bev_stride x voxel_size): run "
            f"`hilda-prep build-occupancy --store {store} --grid {needs.grid} "
            f"--cell {needs.cell:g} --overwrite` or set model.bev_grid / model.bev_stride"
        )
    return {"occupancy_grid": int(grid), "occupancy_cell": cell}


def _label(size: str) -> str:
    """The family label of a teacher size (``SIZES``), for messages."""
    return FAMILY_LABELS[SIZES[size].family] if size in SIZES else "teacher of size"


def _check_teacher(reader: CacheReader, cfg: TrainConfig) -> dict:
    store, arch = reader.store, cfg.data.teacher_arch
    t = reader.teacher(cfg.data.teacher, arch)
    # A DINOv2 size with registers is its own teacher: vits14_reg is not vits14 (size_name).
    if arch is not None and t.info.size != arch:
        raise CacheMismatchError(
            f"{store}: {t.path}/ holds {t.info.model_id} (a {t.info.label} {t.info.size}, patch "
            f"{t.info.patch_size}), the config distils a {_label(arch)} {arch} teacher: run "
            f"`hilda-prep extract-teacher --store {store} --teacher <a {_label(arch)} {arch}, "
            f"e.g. random:{arch} or its public weights> --layers lastK --name {arch}` or pick "
            "the preset of that teacher"
        )
    if (
        t.info.family == "dinov2"
        and t.info.pos_embed_interpolation.startswith("transformers")
        and not t.info.registers
    ):
        raise CacheMismatchError(
            f"{store}: {t.path}/ was extracted with transformers' position-embedding "
            "resizing, which differs from the official DINOv2 features (hilda now reproduces "
            f"the official ones): run `hilda-prep extract-teacher --store {store} --teacher "
            f"{t.info.model_id} --layers {Layers.last(len(t.blocks))} --overwrite`"
        )
    offsets = [*cfg.teacher_offsets, *([0] if cfg.loss.cls else [])]  # Eq. 2: the last block
    layers = Layers.from_offsets(set(offsets), t.depth)
    wanted = {k: layers.block(k) for k in dict.fromkeys(offsets)}  # offset -> block
    missing = sorted(b for b in layers.blocks if b not in t.blocks)
    if missing:
        raise CacheMismatchError(
            f"{store}: {t.path}/ holds blocks {list(t.blocks)} of {t.depth}, the config "
            f"distils blocks {list(layers.blocks)} (missing {missing}): run `hilda-prep "
            f"extract-teacher --store {store} --teacher {t.info.model_id} --layers "
            f"{layers.covering()} --overwrite`"
        )
    return {"teacher_group": t, "blocks": wanted}


def teacher_means(info: CacheInfo, frames: np.ndarray, count: int) -> dict[int, np.ndarray]:
    """{offset: (D,) float64} mean of each distilled teacher block's features where LiDAR
    points land (bilinear at the pairs' uv, as Eq. 1 samples them), over ``count`` of
    ``frames`` spread evenly. The mean over pairs, not over all patches: sky and the image
    edges hold no points, and an all-patch mean would leave a constant in the targets."""
    from hilda.models.grid import sample_grid  # torch-side; imported here to keep data light

    reader = CacheReader(info.store, [POINTMAPS])
    teacher = info.teacher_group
    pick = frames[evenly_spaced(len(frames), count / max(1, len(frames)))]
    sizes = reader.image_sizes()
    totals = {k: np.zeros(info.teacher_dim) for k in info.blocks}
    n = 0
    for f in pick.tolist():
        blocks = [reader.teacher_block_reads(teacher, b, f) for b in info.blocks.values()]
        pairs, *grids = reader.gather(reader.pairs_reads(f), *blocks)
        if len(pairs.cam) == 0:
            continue
        cam, uv = torch.from_numpy(pairs.cam), torch.from_numpy(pairs.uv)
        size = torch.from_numpy(sizes[f].astype(np.float32))  # (V, 2)
        for offset, values in zip(info.blocks, grids, strict=True):  # (V, h, w, D)
            sampled = sample_grid(torch.from_numpy(values.astype(np.float32)), cam, uv, size)
            totals[offset] += sampled.double().sum(dim=0).numpy()
        n += len(pairs.cam)
    if n == 0:
        raise CacheMismatchError(f"{info.store}: no point-pixel pairs to centre the teacher on")
    return {k: v / n for k, v in totals.items()}


@dataclass(frozen=True)
class SampleIndex:
    frames: np.ndarray  # (S,) t0 frame of each sample
    prev: np.ndarray  # (S,) its t-1 frame
    excluded: dict[str, int]  # reason -> frames


def sample_index(store: str, info: CacheInfo, needs_occupancy: bool) -> SampleIndex:
    """The (t-1, t0) samples of the cache, and why the other frames are not samples."""
    reader = CacheReader(store, [])
    prev = reader.prev().astype(np.int64)
    counts = np.diff(reader.point_offsets())
    skipped = reader.skipped_frames(info.teacher)
    valid = reader.occupancy_valid().astype(bool) if needs_occupancy else None
    excluded = {"no t-1": 0, "no t+1": 0, "skipped or empty": 0}
    frames, prevs = [], []
    for f in range(len(prev)):
        p = int(prev[f])
        if p < 0:
            excluded["no t-1"] += 1
        elif valid is not None and not valid[f]:
            excluded["no t+1"] += 1
        elif {f, p} & skipped or counts[f] == 0 or counts[p] == 0:
            excluded["skipped or empty"] += 1
        else:
            frames.append(f)
            prevs.append(p)
    return SampleIndex(np.asarray(frames, np.int64), np.asarray(prevs, np.int64), excluded)


def subsample_per_image(cam: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices keeping at most ``cap`` uniformly drawn pairs of each camera."""
    keep = []
    for c in np.unique(cam):
        rows = np.flatnonzero(cam == c)
        keep.append(rows if len(rows) <= cap else rng.choice(rows, cap, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class CacheDataset(Dataset):
    """One sample's arrays, read from the store in one round trip (``CacheReader.gather``).
    Items are (index, epoch) pairs from ``ResumableSampler``. The reader reopens its handles
    once per worker process."""

    def __init__(self, cfg: TrainConfig, info: CacheInfo, samples: SampleIndex) -> None:
        self.cfg = cfg
        self.info = info
        self.samples = samples
        self._reader: CacheReader | None = None

    def __len__(self) -> int:
        return len(self.samples.frames)

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:  # the store was checked by check_cache
            self._reader = CacheReader(self.info.store, [])
        return self._reader

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        f, p = int(self.samples.frames[index]), int(self.samples.prev[index])
        seed = sample_seed(self.cfg.run.seed, epoch, index)
        try:
            return self._sample(index, f, p, seed)
        except HildaError:
            raise
        except Exception as exc:  # a corrupt chunk: name the frames and the store
            raise HildaError(
                f"{self.info.store}: cannot read sample {index} (frames t0={f}, t-1={p}): {exc}"
            ) from exc

    def _reads(self, f: int, p: int) -> list[Reads]:
        """Every read of a sample: sweeps, pairs, teacher blocks and CLS of t-1 and t0, the
        t+1 target of t0."""
        r, cfg, t = self.reader, self.cfg, self.info.teacher_group
        reads = [r.points_reads(p), r.points_reads(f)]
        if cfg.needs_teacher:
            for frame in (p, f):
                reads.append(r.pairs_reads(frame))
                reads += [
                    r.teacher_block_reads(t, b, frame, as_stored=True)
                    for b in self.info.blocks.values()
                ]
                reads.append(r.cls_reads(t, frame, t.depth - 1))
        if cfg.needs_occupancy:
            reads.append(r.occupancy_reads(f))
        return reads

    def _sample(self, index: int, f: int, p: int, seed: int) -> dict:
        cfg, reader = self.cfg, self.reader
        values = iter(reader.gather(*self._reads(f, p)))
        before, now = next(values), next(values)
        if cfg.data.align_history:  # the t-1 sweep in the t0 LiDAR frame
            e2g, l2e = reader.ego_to_global(), reader.lidar_to_ego()
            before[:, :3] = ego_compensate(before, l2e[p], e2g[p], l2e[f], e2g[f])
        d = augment.draw(cfg.data.augment, np.random.default_rng(seed))
        clouds = [
            augment.apply_points(before, d, cfg.data.augment, stream=0),
            augment.apply_points(now, d, cfg.data.augment, stream=1),
        ]
        for frame, cloud in zip((p, f), clouds, strict=True):
            if not np.isfinite(cloud).all():
                raise HildaError(f"{self.info.store}: frame {frame} has non-finite points")
        out: dict = {"index": index, "frame": f, "prev": p, "seed": seed, "points": clouds}
        if cfg.needs_teacher:
            rng = np.random.default_rng([seed, 2])
            out.update(pairs=[], grids=[], cls=[])
            for _ in (p, f):
                out["pairs"].append(self._subsample(next(values), rng))
                # Grids travel to the device as stored (float16, or int8 with its scales) and
                # are dequantised and sampled there in float32.
                out["grids"].append({k: _travel(next(values)) for k in self.info.blocks})
                out["cls"].append(next(values))  # (V, D) of the last block
            sizes = reader.image_sizes()
            out["image_size"] = [sizes[p].astype(np.float32), sizes[f].astype(np.float32)]
        if cfg.needs_occupancy:
            out["target"] = augment.apply_grid(next(values), d, self.info.occupancy_cell)
        return out

    def _subsample(self, pairs: Pairs, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cap = self.cfg.data.max_pairs_per_image
        if cap is not None:
            pairs = pairs.take(subsample_per_image(pairs.cam, cap, rng))
        return {"point": pairs.point, "cam": pairs.cam, "uv": pairs.uv}


@dataclass
class Batch:
    """B samples = 2B clouds: cloud c < B is sample c's t-1 sweep, cloud B + c its t0 sweep.
    Images are numbered cloud * V + camera."""

    points: torch.Tensor  # (N, 4) float32, augmented, t0 LiDAR frame
    cloud: torch.Tensor  # (N,) int64 in [0, 2B)
    seeds: torch.Tensor  # (B,) int64 per-sample seeds
    frames: torch.Tensor  # (B,) int64 t0 frames
    pair_point: torch.Tensor | None = None  # (Q,) int64 rows of ``points``
    pair_image: torch.Tensor | None = None  # (Q,) int64 in [0, 2B V)
    pair_uv: torch.Tensor | None = None  # (Q, 2) float32 pixels
    image_size: torch.Tensor | None = None  # (2B V, 2) float32 (W, H)
    # offset -> (2B V, h, w, D) float16, or int8 with scales (a QuantizedGrid)
    grids: dict[int, torch.Tensor | QuantizedGrid] = field(default_factory=dict)
    teacher_cls: torch.Tensor | None = None  # (2B, V, D)
    target: torch.Tensor | None = None  # (B, H, W) float32 in {0, 1}

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    def to(self, device: torch.device) -> Batch:
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
        }
        moved["grids"] = {k: v.to(device, non_blocking=True) for k, v in self.grids.items()}
        return Batch(**moved)


def collate(samples: list[dict]) -> Batch:
    """Samples -> one sparse batch of 2B clouds (t-1 sweeps first, then t0)."""
    if not samples:
        raise ConfigError("empty batch")
    order = [(s, 0) for s in samples] + [(s, 1) for s in samples]  # cloud c -> (sample, sweep)
    clouds = [s["points"][k] for s, k in order]
    sizes = [len(c) for c in clouds]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    batch = Batch(
        points=torch.from_numpy(np.concatenate(clouds)),
        cloud=torch.repeat_interleave(torch.arange(len(clouds)), torch.tensor(sizes)),
        seeds=torch.tensor([s["seed"] for s in samples], dtype=torch.int64),
        frames=torch.tensor([s["frame"] for s in samples], dtype=torch.int64),
    )
    if "pairs" in samples[0]:
        views = len(samples[0]["cls"][0])
        pairs = [s["pairs"][k] for s, k in order]
        batch.pair_point = torch.from_numpy(
            np.concatenate([q["point"] + start for q, start in zip(pairs, starts, strict=True)])
        )
        batch.pair_image = torch.from_numpy(
            np.concatenate([q["cam"] + c * views for c, q in enumerate(pairs)])
        )
        batch.pair_uv = torch.from_numpy(np.concatenate([q["uv"] for q in pairs]))
        batch.image_size = torch.from_numpy(np.concatenate([s["image_size"][k] for s, k in order]))
        batch.grids = {
            off: _collate_grids([s["grids"][k][off] for s, k in order])
            for off in samples[0]["grids"][0]
        }
        batch.teacher_cls = torch.from_numpy(np.stack([s["cls"][k] for s, k in order]))
    if "target" in samples[0]:
        batch.target = torch.from_numpy(np.stack([s["target"] for s in samples])).float()
    return batch


def _travel(grid: np.ndarray | tuple) -> np.ndarray | tuple:
    """A grid as it travels to the device: int8 + scales as stored, float as float16."""
    return grid if isinstance(grid, tuple) else grid.astype(np.float16, copy=False)


def _collate_grids(
    grids: list[np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> torch.Tensor | QuantizedGrid:
    """Per-cloud (V, h, w, D) grids -> (2B V, h, w, D): float16 as one tensor, int8 with its
    channel (V, D) and token (V, h, w) scales as a QuantizedGrid."""
    if isinstance(grids[0], tuple):
        values, channel, token = (np.concatenate(parts) for parts in zip(*grids, strict=True))
        return QuantizedGrid(
            torch.from_numpy(values), torch.from_numpy(channel), torch.from_numpy(token)
        )
    return torch.from_numpy(np.concatenate(grids))
