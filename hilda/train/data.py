"""Training data from the hilda-prep cache: the compatibility check, the (t-1, t0) sample
index, a torch Dataset reading one sample's arrays, the resumable distributed sampler and the
collate that builds the sparse batch. The only trainer module that touches Zarr.

A sample is keyframe t0 with its previous keyframe t-1 (both distilled) and the t+1 occupancy
of t0 (the diffusion target). Frames without t-1, without a t+1 target, or skipped by a stage
are not samples; they are counted and reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, DistributedSampler

from hilda.data_schemas.store import SCHEMA, SCHEMA_VERSION, normalize_store
from hilda.data_schemas.validate import validate_store
from hilda.errors import ConfigError, HildaError
from hilda.models.teacher import SIZES
from hilda.pipeline.ops import codecs
from hilda.pipeline.ops.occupancy import ego_compensate, unpack
from hilda.train import augment
from hilda.train.config import TrainConfig

STAGE_COMMANDS = {
    "index": "hilda-prep index",
    "points": "hilda-prep index",
    "pointmaps": "hilda-prep build-pointmaps",
    "occupancy": "hilda-prep build-occupancy",
    "teacher": "hilda-prep extract-teacher",
}


class CacheMismatchError(HildaError):
    """The cache cannot feed this config; the message says which hilda-prep command fixes it."""


@dataclass(frozen=True)
class CacheInfo:
    store: str
    cameras: int
    teacher: str | None  # group name under teacher/
    teacher_dim: int
    blocks: dict[int, int] = field(default_factory=dict)  # offset from last -> stored block
    cls_index: int = -1  # index of the last block's CLS in ``cls`` (F, V, K, D)
    codec_int8: bool = False
    occupancy_grid: int = 0
    occupancy_cell: float = 0.0


def _require_complete(root: zarr.Group, group: str, store: str) -> None:
    command = STAGE_COMMANDS[group.split("/")[0]]
    if group not in root:
        raise CacheMismatchError(
            f"{store}: the cache has no {group}/; run `{command} --store {store}` first"
        )
    g = root[group]
    if "done" in g:
        done = np.asarray(g["done"][:], dtype=bool)
        if not done.all():
            raise CacheMismatchError(
                f"{store}: {group}/ is incomplete ({int(done.sum())} of {len(done)} shards); "
                f"rerun `{command} --store {store}` to finish it"
            )


def open_cache(store: str, groups: list[str]) -> tuple[str, zarr.Group]:
    """(normalised store, root) of a cache of this schema whose ``groups`` are complete and
    valid; otherwise a CacheMismatchError naming the hilda-prep command that fixes it."""
    store = normalize_store(store)
    try:
        root = zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise CacheMismatchError(
            f"no cache at {store}: build it with `hilda-prep index --out {store} ...`"
        ) from None
    attrs = dict(root.attrs)
    if attrs.get("schema") != SCHEMA or attrs.get("schema_version") != SCHEMA_VERSION:
        raise CacheMismatchError(
            f"{store} is schema {attrs.get('schema')!r} version {attrs.get('schema_version')}, "
            f"this trainer reads {SCHEMA!r} version {SCHEMA_VERSION}: rebuild it with "
            f"`hilda-prep index --overwrite --out {store} ...` and the later stages"
        )
    for group in groups:
        _require_complete(root, group, store)
    validate_store(store, require=groups)
    return store, root


def check_cache(store: str, cfg: TrainConfig) -> CacheInfo:
    """Check the cache against the config before anything trains; every mismatch is a
    CacheMismatchError naming the hilda-prep command that fixes it."""
    needs_occupancy = cfg.loss.aux in ("diffusion", "simple")
    groups = ["index", "points"]
    groups += ["pointmaps"] if cfg.needs_teacher else []
    groups += ["occupancy"] if needs_occupancy else []
    store, root = open_cache(store, groups)

    info: dict = {"store": store, "cameras": len(root["index"].attrs["cameras"])}
    info.update(teacher=None, teacher_dim=0)
    if cfg.needs_teacher:
        info.update(_check_teacher(root, store, cfg))
    if needs_occupancy:
        occ = dict(root["occupancy"].attrs)
        grid = occ["grid"][0] if isinstance(occ["grid"], list) else occ["grid"]
        cell = float(occ["cell"])
        want_cell = cfg.model.bev_stride * cfg.model.voxel.voxel_size
        if grid != cfg.model.bev_grid or abs(cell - want_cell) > 1e-6:
            raise CacheMismatchError(
                f"{store}: occupancy/ is {grid}x{grid} cells of {cell} m, the config wants "
                f"{cfg.model.bev_grid} cells of {want_cell:g} m (bev_stride x voxel_size): run "
                f"`hilda-prep build-occupancy --store {store} --grid {cfg.model.bev_grid} "
                f"--cell {want_cell:g} --overwrite` or set model.bev_grid / model.bev_stride"
            )
        info.update(occupancy_grid=int(grid), occupancy_cell=cell)
    return CacheInfo(**info)


def _check_teacher(root: zarr.Group, store: str, cfg: TrainConfig) -> dict:
    names = sorted(root["teacher"].group_keys()) if "teacher" in root else []
    hint = f"`hilda-prep extract-teacher --store {store} --teacher ... --layers lastK`"
    if not names:
        raise CacheMismatchError(f"{store}: the cache has no teacher features; run {hint}")
    if cfg.data.teacher is None:
        arch = cfg.data.teacher_arch
        fits = [n for n in names if arch is None or root[f"teacher/{n}"].attrs.get("arch") == arch]
        if len(fits) > 1:
            raise CacheMismatchError(
                f"{store} holds several teachers ({', '.join(fits)}): set data.teacher=NAME"
            )
        name = fits[0] if fits else names[0]  # none of that arch: the arch check below says so
    elif cfg.data.teacher not in names:
        raise CacheMismatchError(
            f"{store}: no teacher/{cfg.data.teacher}/ (present: {', '.join(names)}); run {hint} "
            f"--name {cfg.data.teacher}"
        )
    else:
        name = cfg.data.teacher
    _require_complete(root, f"teacher/{name}", store)
    t = dict(root[f"teacher/{name}"].attrs)
    arch = t.get("arch")
    if cfg.data.teacher_arch is not None and arch != cfg.data.teacher_arch:
        raise CacheMismatchError(
            f"{store}: teacher/{name}/ holds {t.get('model_id')} ({arch}), the config distils "
            f"a {cfg.data.teacher_arch} teacher: run `hilda-prep extract-teacher --store {store} "
            f"--teacher <a {cfg.data.teacher_arch} DINOv2> --layers lastK` or pick the preset "
            "of that teacher"
        )
    depth = t.get("depth", SIZES[arch][1] if arch in SIZES else None)
    if depth is None:
        raise CacheMismatchError(f"{store}: teacher/{name}/ has unknown arch {arch!r}")
    if str(t.get("pos_embed_interpolation", "")).startswith("transformers") and not t.get(
        "registers"
    ):
        raise CacheMismatchError(
            f"{store}: teacher/{name}/ was extracted with transformers' position-embedding "
            "resizing, which differs from the official DINOv2 features (hilda now reproduces "
            f"the official ones): run `hilda-prep extract-teacher --store {store} --teacher "
            f"{t.get('model_id')} --layers last{len(t['blocks'])} --overwrite`"
        )
    stored = list(t["blocks"])
    wanted = {k: depth - 1 - k for k in cfg.teacher_offsets}
    if cfg.loss.cls:
        wanted.setdefault(0, depth - 1)
    missing = sorted(b for b in wanted.values() if b not in stored)
    if missing:
        k = max(depth - b for b in wanted.values())
        raise CacheMismatchError(
            f"{store}: teacher/{name}/ holds blocks {stored} of {depth}, the config distils "
            f"blocks {sorted(wanted.values())} (missing {missing}): run `hilda-prep "
            f"extract-teacher --store {store} --teacher {t.get('model_id')} --layers last{k} "
            "--overwrite`"
        )
    return {
        "teacher": name,
        "teacher_dim": int(t["dim"]),
        "blocks": wanted,
        "cls_index": stored.index(depth - 1),
        "codec_int8": t.get("storage_dtype") == "int8",
    }


def evenly_spaced(n: int, fraction: float) -> np.ndarray:
    """Indices of round(n * fraction) (at least 1) of 0..n-1, spread evenly (sorted)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, round(n * fraction)))
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


def read_teacher_block(
    get: Callable[[str], zarr.Array], info: CacheInfo, block: int, index: int | tuple[int, int]
) -> np.ndarray:
    """Patch features of teacher ``block`` at ``index`` (a frame -> (V, h, w, D), or
    (frame, camera) -> (h, w, D)) as stored (float16 / bitround) or decoded from int8 to
    float32. ``get`` opens an array by path (a cached handle or ``root.__getitem__``)."""
    g = f"teacher/{info.teacher}/layer_{block}"
    values = np.asarray(get(g)[index])
    if info.codec_int8:
        scales = (np.asarray(get(f"{g}_scale")[index]), np.asarray(get(f"{g}_token_scale")[index]))
        values = codecs.decode(values, scales)
    return values


def teacher_means(info: CacheInfo, frames: np.ndarray, count: int) -> dict[int, np.ndarray]:
    """{offset: (D,) float64} mean of each distilled teacher block's features where LiDAR
    points land (bilinear at the pairs' uv, as Eq. 1 samples them), over ``count`` of
    ``frames`` spread evenly. The mean over pairs, not over all patches: sky and the image
    edges hold no points, and an all-patch mean would leave a constant in the targets."""
    from hilda.train.losses import sample_grid  # torch-side; imported here to keep data light

    root = zarr.open_group(info.store, mode="r")
    pick = frames[evenly_spaced(len(frames), count / max(1, len(frames)))]
    offsets = np.asarray(root["pointmaps/offsets"][:])
    sizes = np.asarray(root["index/image_size"][:])
    totals = {k: np.zeros(info.teacher_dim) for k in info.blocks}
    n = 0
    for f in pick.tolist():
        a, b = int(offsets[f]), int(offsets[f + 1])
        if a == b:
            continue
        cam = torch.from_numpy(np.asarray(root["pointmaps/cam"][a:b], np.int64))
        uv = torch.from_numpy(np.asarray(root["pointmaps/uv"][a:b], np.float32))
        size = torch.from_numpy(sizes[f].astype(np.float32))  # (V, 2)
        for offset, block in info.blocks.items():
            values = read_teacher_block(root.__getitem__, info, block, f)  # (V, h, w, D)
            sampled = sample_grid(torch.from_numpy(values.astype(np.float32)), cam, uv, size)
            totals[offset] += sampled.double().sum(dim=0).numpy()
        n += b - a
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
    root = zarr.open_group(normalize_store(store), mode="r")
    prev = np.asarray(root["index/prev"][:], dtype=np.int64)
    offsets = np.asarray(root["points/offsets"][:])
    counts = np.diff(offsets)
    skipped: set[int] = set()
    groups = ["points", "pointmaps", "occupancy"]
    groups += [f"teacher/{info.teacher}"] if info.teacher else []
    for g in groups:
        if g in root:
            skipped |= {int(k) for k in dict(root[g].attrs).get("skipped", {})}
    valid = np.asarray(root["occupancy/valid"][:], bool) if needs_occupancy else None
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's randomness (augmentation, diffusion noise): a function of the
    run seed, the epoch and the sample alone, so it does not depend on the worker, the
    process layout or a resume."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0])


def subsample_per_image(cam: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices keeping at most ``cap`` uniformly drawn pairs of each camera."""
    keep = []
    for c in np.unique(cam):
        rows = np.flatnonzero(cam == c)
        keep.append(rows if len(rows) <= cap else rng.choice(rows, cap, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class CacheDataset(Dataset):
    """One sample's arrays, read from the store. Items are (index, epoch) pairs from
    ``ResumableSampler``. The store is opened lazily, once per worker process."""

    def __init__(self, cfg: TrainConfig, info: CacheInfo, samples: SampleIndex) -> None:
        self.cfg = cfg
        self.info = info
        self.samples = samples
        self._root: zarr.Group | None = None
        self._small: dict[str, np.ndarray] = {}
        self._arrays: dict[str, zarr.Array] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.samples.frames)

    @property
    def root(self) -> zarr.Group:
        self._open()
        return self._root

    def _open(self) -> None:
        """Open the store once per worker process (a forked worker must not reuse the
        parent's handles), with its small per-frame arrays."""
        if self._root is None or self._pid != os.getpid():
            self._root = zarr.open_group(self.info.store, mode="r")
            self._pid = os.getpid()
            # Small per-frame arrays, read once per worker: each Zarr read costs milliseconds
            # whatever its size, and a sample would otherwise make a dozen of them.
            names = ["points/offsets", "index/lidar_to_ego", "index/ego_to_global"]
            if self.cfg.needs_teacher:
                names += ["pointmaps/offsets", "index/image_size"]
            self._small = {n: np.asarray(self._root[n][:]) for n in names}
            self._arrays = {}

    def _points(self, f: int) -> np.ndarray:
        a, b = (int(x) for x in self._small["points/offsets"][f : f + 2])
        return np.asarray(self._array("points/data")[a:b], dtype=np.float32)  # (N, 4)

    def _pairs(self, f: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        a, b = (int(x) for x in self._small["pointmaps/offsets"][f : f + 2])
        pairs = {
            "point": np.asarray(self._array("pointmaps/point")[a:b], np.int64),
            "cam": np.asarray(self._array("pointmaps/cam")[a:b], np.int64),
            "uv": np.asarray(self._array("pointmaps/uv")[a:b], np.float32),
        }
        cap = self.cfg.data.max_pairs_per_image
        if cap is not None:
            keep = subsample_per_image(pairs["cam"], cap, rng)
            pairs = {k: v[keep] for k, v in pairs.items()}
        return pairs

    def _array(self, name: str) -> zarr.Array:
        """Array handles are opened once per worker (opening one reads its metadata)."""
        if name not in self._arrays:
            self._arrays[name] = self.root[name]
        return self._arrays[name]

    def _teacher(self, f: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """{offset: (V, h, w, D) float16}, CLS (V, D) float32 of the last block."""
        grids = {}
        for offset, block in self.info.blocks.items():
            values = read_teacher_block(self._array, self.info, block, f)
            # float16 travels to the device as stored; sampling there is in float32.
            grids[offset] = values.astype(np.float16, copy=False)
        cls_tokens = self._array(f"teacher/{self.info.teacher}/cls")
        cls = np.asarray(cls_tokens[f, :, self.info.cls_index], np.float32)
        return grids, cls  # cls (V, D)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        f, p = int(self.samples.frames[index]), int(self.samples.prev[index])
        seed = sample_seed(self.cfg.run.seed, epoch, index)
        try:
            return self._read(index, f, p, seed)
        except HildaError:
            raise
        except Exception as exc:  # a corrupt chunk: name the frames and the store
            raise HildaError(
                f"{self.info.store}: cannot read sample {index} (frames t0={f}, t-1={p}): {exc}"
            ) from exc

    def _read(self, index: int, f: int, p: int, seed: int) -> dict:
        cfg = self.cfg
        self._open()
        now, before = self._points(f), self._points(p)
        if cfg.data.align_history:  # the t-1 sweep in the t0 LiDAR frame
            e2g, l2e = self._small["index/ego_to_global"], self._small["index/lidar_to_ego"]
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
            out["pairs"] = [self._pairs(p, rng), self._pairs(f, rng)]
            teach = [self._teacher(p), self._teacher(f)]
            out["grids"] = [t[0] for t in teach]
            out["cls"] = [t[1] for t in teach]
            sizes = self._small["index/image_size"]
            out["image_size"] = [sizes[p].astype(np.float32), sizes[f].astype(np.float32)]
        if cfg.loss.aux in ("diffusion", "simple"):
            target = unpack(np.asarray(self._array("occupancy/bev")[f]))  # (H, W) bool
            out["target"] = augment.apply_grid(target, d, self.info.occupancy_cell)
        return out


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) and can start mid-epoch (resume)."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # samples of this rank's epoch list to skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


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
    grids: dict[int, torch.Tensor] = field(default_factory=dict)  # offset -> (2B V, h, w, D)
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
            off: torch.from_numpy(np.concatenate([s["grids"][k][off] for s, k in order]))
            for off in samples[0]["grids"][0]
        }
        batch.teacher_cls = torch.from_numpy(np.stack([s["cls"][k] for s, k in order]))
    if "target" in samples[0]:
        batch.target = torch.from_numpy(np.stack([s["target"] for s in samples])).float()
    return batch
