"""Reading a hilda cache: the one place that knows the store's paths on the read side.

``CacheReader`` opens a store, checks its schema and that the groups it needs are complete and
valid, picks a teacher group, and reads per-frame arrays through typed accessors. The trainer's
dataset, the teacher centring, the evaluation, the figures and the benchmarks all read through
it; ``hilda.store.schema`` is the layout it reads.

Every Zarr read costs a few milliseconds whatever its size (a round trip through Zarr's event
loop), so the reader (1) opens each array once per process and keeps it, (2) reads the small
per-frame arrays (offsets, poses, image sizes) whole, once per process, and (3) can gather any
number of reads into one round trip (``gather``), which is how a training sample is read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from hilda.errors import ConfigError, HildaError
from hilda.store import codecs
from hilda.store.codecs import unpack
from hilda.store.schema import (
    INDEX,
    OCCUPANCY,
    PATH_ARRAYS,
    POINTS,
    SCHEMA,
    SCHEMA_VERSION,
    GroupSpec,
    dataset_file,
    normalize_store,
    stage_command,
    teacher_path,
)
from hilda.store.teacher_record import TeacherInfo, TeacherRecord, family_of, size_name
from hilda.store.validate import file_problems, validate_store
from hilda.store.written import DamagedShardError, RecordGuard, data_arrays

Group = GroupSpec | str  # a group of the layout, or its path (``teacher/<name>``)


def _path(group: Group) -> str:
    return group if isinstance(group, str) else group.name


class CacheMismatchError(HildaError):
    """The cache cannot serve this use; the message says which hilda-prep command fixes it."""


@dataclass(frozen=True)
class TeacherGroup:
    """One complete ``teacher/<name>/`` group and its record."""

    name: str
    record: TeacherRecord

    @property
    def info(self) -> TeacherInfo:
        return self.record.teacher

    @property
    def blocks(self) -> tuple[int, ...]:
        """Stored block numbers (0-based), in ``cls``'s K order."""
        return self.record.blocks

    @property
    def depth(self) -> int:
        return self.info.depth

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def int8(self) -> bool:
        """Stored with the int8 codec (decoded on read)."""
        return self.record.int8

    @property
    def path(self) -> str:
        """Where it lives in the store (for messages)."""
        return teacher_path(self.name)

    def cls_index(self, block: int) -> int:
        """Index of ``block``'s CLS token in ``cls`` (F, V, K, D)."""
        return self.blocks.index(block)


@dataclass(frozen=True)
class Pairs:
    """A frame's point-pixel pairs."""

    point: np.ndarray  # (Q,) int64 rows of the frame's points
    cam: np.ndarray  # (Q,) int64 camera
    uv: np.ndarray  # (Q, 2) float32 pixels of the original image

    def take(self, rows: np.ndarray) -> Pairs:
        return Pairs(self.point[rows], self.cam[rows], self.uv[rows])


def _size_of(attrs: dict) -> str:
    """A group's teacher size as configs name it (``vits14_reg`` with registers)."""
    registers = int(attrs.get("registers", 0) or 0)
    return size_name(str(attrs.get("arch")), family_of(attrs), registers)


class CacheReader:
    """A hilda cache opened for reading. ``require`` lists the groups that must be complete
    (``teacher/<name>`` is checked by ``teacher()``). Handles are reopened in a forked
    process (a DataLoader worker must not reuse its parent's)."""

    def __init__(self, store: str, require: Sequence[Group] = (INDEX, POINTS)) -> None:
        self.store = normalize_store(store)
        self._attrs_cache: dict[str, str] = {}
        self._pid = -1
        root = self.root
        attrs = dict(root.attrs)
        if attrs.get("schema") != SCHEMA or attrs.get("schema_version") != SCHEMA_VERSION:
            raise CacheMismatchError(
                f"{self.store} is schema {attrs.get('schema')!r} version "
                f"{attrs.get('schema_version')}, this hilda reads {SCHEMA!r} version "
                f"{SCHEMA_VERSION}: rebuild it with `hilda-prep index --overwrite --out "
                f"{self.store} ...` and the later stages"
            )
        for group in require:
            self.require(group)
        validate_store(self.store, require=[_path(g) for g in require])
        self.cameras: list[str] = list(root["index"].attrs["cameras"])
        self.frames = int(root["index/token"].shape[0])

    # -- the store and its groups -------------------------------------------------------------

    @property
    def root(self) -> zarr.Group:
        if self._pid != os.getpid():
            try:
                self._root = zarr.open_group(self.store, mode="r")
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                raise CacheMismatchError(
                    f"no cache at {self.store}: build it with `hilda-prep index --out "
                    f"{self.store} ...`"
                ) from None
            self._pid = os.getpid()
            self._arrays: dict[str, zarr.Array] = {}
            self._small: dict[str, np.ndarray] = {}
            self._guard = RecordGuard(self._root, self.store, stage_command)
        return self._root

    def attrs(self, group: Group) -> dict[str, Any]:
        return dict(self.root[_path(group)].attrs)

    def occupancy_attrs(self) -> dict[str, Any]:
        """How the occupancy targets were built (grid, cell, range, horizon, ground rule)."""
        return self.attrs(OCCUPANCY)

    def teacher_attrs(self, name: str) -> dict[str, Any]:
        """Provenance of teacher group ``name`` (model, blocks, image size, codec, ...)."""
        return self.attrs(teacher_path(name))

    def require(self, group: Group) -> None:
        """``group`` exists and every shard of it is complete, or a CacheMismatchError naming
        the command that builds it."""
        group = _path(group)
        command = stage_command(group)
        if group not in self.root:
            raise CacheMismatchError(
                f"{self.store}: the cache has no {group}/; run `{command} --store "
                f"{self.store}` first"
            )
        g = self.root[group]
        if "done" in g:
            done = np.asarray(g["done"][:], dtype=bool)
            if not done.all():
                raise CacheMismatchError(
                    f"{self.store}: {group}/ is incomplete ({int(done.sum())} of {len(done)} "
                    f"shards); rerun `{command} --store {self.store}` to finish it"
                )

    def check_files(self, groups: Sequence[Group]) -> None:
        """Every file of ``groups`` is present with the size its stage recorded, or one
        DamagedShardError listing every damaged shard (``hilda.store.written``)."""
        lines = file_problems(self.root, [_path(g) for g in groups])
        if lines:
            listed = "\n".join(f"  - {line}" for line in lines)
            raise DamagedShardError(
                f"{self.store}: {len(lines)} damaged shards (read as zeros otherwise):\n{listed}"
            )

    def skipped(self, group: str) -> set[int]:
        """Frames a stage recorded as bad (``--skip-bad``)."""
        if group not in self.root:
            return set()
        return {int(k) for k in self.attrs(group).get("skipped", {})}

    # -- teachers -----------------------------------------------------------------------------

    def teacher_names(self) -> list[str]:
        return sorted(self.root["teacher"].group_keys()) if "teacher" in self.root else []

    def teacher(self, name: str | None = None, arch: str | None = None) -> TeacherGroup:
        """The teacher group ``name``, or the only one (of ``arch`` when given); complete."""
        names = self.teacher_names()
        hint = f"`hilda-prep extract-teacher --store {self.store} --teacher ... --layers lastK`"
        if not names:
            raise CacheMismatchError(f"{self.store}: the cache has no teacher features; run {hint}")
        if name is None:
            fits = [
                n for n in names if arch is None or _size_of(self.attrs(f"teacher/{n}")) == arch
            ]
            if len(fits) > 1:
                raise CacheMismatchError(
                    f"{self.store} holds several teachers ({', '.join(fits)}): choose one "
                    "(data.teacher=NAME, --teacher NAME)"
                )
            name = fits[0] if fits else names[0]  # none of that arch: the caller says so
        elif name not in names:
            raise CacheMismatchError(
                f"{self.store}: no teacher/{name}/ (present: {', '.join(names)}); run {hint} "
                f"--name {name}"
            )
        self.require(f"teacher/{name}")
        where = f"{self.store}: teacher/{name}/"
        try:
            record = TeacherRecord.from_attrs(self.attrs(f"teacher/{name}"), where)
        except ConfigError as exc:
            raise CacheMismatchError(str(exc)) from None
        return TeacherGroup(name, record)

    # -- small per-frame arrays ---------------------------------------------------------------

    def _whole(self, name: str) -> np.ndarray:
        """A small per-frame array of ``SMALL``, read whole once per process."""
        self.root  # noqa: B018 (reopen in a forked process)
        if name not in self._small:
            self._small[name] = np.asarray(self._checked(name)[:])
        return self._small[name]

    def point_offsets(self) -> np.ndarray:
        """(F+1,) int64: frame f's points are rows [o[f], o[f+1]) of ``points/data``."""
        return self._whole("points/offsets")

    def pair_offsets(self) -> np.ndarray:
        """(F+1,) int64: frame f's point-pixel pairs are rows [o[f], o[f+1])."""
        return self._whole("pointmaps/offsets")

    def prev(self) -> np.ndarray:
        """(F,) the previous keyframe of each frame (-1: none)."""
        return self._whole("index/prev")

    def lidar_to_ego(self) -> np.ndarray:
        """(F, 4, 4) float64."""
        return self._whole("index/lidar_to_ego")

    def ego_to_global(self) -> np.ndarray:
        """(F, 4, 4) float64 at the LiDAR timestamp."""
        return self._whole("index/ego_to_global")

    def image_sizes(self) -> np.ndarray:
        """(F, V, 2) int32 (width, height) of every original image."""
        return self._whole("index/image_size")

    def occupancy_valid(self) -> np.ndarray:
        """(F,) bool: the frame has a t+1 occupancy target."""
        return self._whole("occupancy/valid")

    def skipped_frames(self, teacher: str | None = None) -> set[int]:
        """Frames any stage (and teacher group ``teacher``) recorded as bad."""
        groups = ["points", "pointmaps", "occupancy"]
        groups += [f"teacher/{teacher}"] if teacher else []
        return set().union(*(self.skipped(g) for g in groups))

    def index(self) -> dict[str, np.ndarray]:
        """Every ``index/`` array, whole (calibration and poses of every frame); the file path
        arrays as paths (joined to the dataset root they are stored relative to)."""
        group = self.root["index"]
        out = {}
        for name in data_arrays(group):
            self._guard.check(group[name], 0, group[name].shape[0])
            out[name] = np.asarray(group[name][:])
        resolve = np.vectorize(lambda p: dataset_file(self.dataset_root, str(p)), otypes=[object])
        for name in PATH_ARRAYS:
            if name in out and out[name].size:
                out[name] = resolve(out[name])
        return out

    def token(self, f: int) -> str:
        return str(self._checked("index/token", f, f + 1)[f])

    def tokens(self) -> np.ndarray:
        return np.asarray(self._checked("index/token")[:])

    def image_path(self, f: int, v: int) -> str:
        stored = self._checked("index/image_path", f, f + 1)[f, v]
        return dataset_file(self.dataset_root, str(stored))

    @property
    def dataset_root(self) -> str:
        """The dataset root the index's file paths are relative to (read once)."""
        if "dataset_root" not in self._attrs_cache:
            self._attrs_cache["dataset_root"] = str(self.root["index"].attrs["dataset_root"])
        return self._attrs_cache["dataset_root"]

    def point_count(self, f: int) -> int:
        offsets = self.point_offsets()
        return int(offsets[f + 1] - offsets[f])

    def _array(self, name: str) -> zarr.Array:
        self.root  # noqa: B018 (reopen in a forked process)
        if name not in self._arrays:  # opening an array reads its metadata: once
            self._arrays[name] = self._root[name]
        return self._arrays[name]

    def _checked(self, name: str, lo: int = 0, hi: int | None = None) -> zarr.Array:
        """Array ``name`` once rows [lo, hi) (all by default) are checked against their
        write record (``hilda.store.written.RecordGuard``)."""
        arr = self._array(name)
        self._guard.check(arr, lo, arr.shape[0] if hi is None else hi)
        return arr

    # -- per-frame reads ----------------------------------------------------------------------
    # Each ``*_reads`` method lists (array, selection) reads and a function that assembles their
    # results; ``gather`` runs the reads of any number of them in one round trip.

    def points_reads(self, f: int) -> Reads:
        a, b = (int(x) for x in self.point_offsets()[f : f + 2])
        return Reads(
            [(self._array("points/data"), slice(a, b))],
            lambda r: np.asarray(r[0], np.float32),  # (N, 4)
        )

    def pairs_reads(self, f: int) -> Reads:
        a, b = (int(x) for x in self.pair_offsets()[f : f + 2])
        names = ("pointmaps/point", "pointmaps/cam", "pointmaps/uv")
        return Reads(
            [(self._array(n), slice(a, b)) for n in names],
            lambda r: Pairs(
                np.asarray(r[0], np.int64), np.asarray(r[1], np.int64), np.asarray(r[2], np.float32)
            ),
        )

    def teacher_block_reads(
        self,
        teacher: TeacherGroup,
        block: int,
        index: int | tuple[int, int],
        as_stored: bool = False,
    ) -> Reads:
        """Patch features of ``block`` at a frame ((V, h, w, D)) or (frame, camera) ((h, w,
        D)): float16 as stored, or float32 decoded from int8. ``as_stored``: int8 grids stay
        as stored, (values (..., h, w, D) int8, channel scale (..., D), token scale (..., h,
        w)), for the training device to dequantise (``hilda.models.grid.QuantizedGrid``)."""
        g = f"teacher/{teacher.name}/layer_{block}"
        if not teacher.int8:
            return Reads([(self._array(g), index)], lambda r: np.asarray(r[0]))
        names = (g, f"{g}_scale", f"{g}_token_scale")
        if as_stored:
            return Reads(
                [(self._array(n), index) for n in names],
                lambda r: tuple(np.asarray(x) for x in r),
            )
        return Reads(
            [(self._array(n), index) for n in names],
            lambda r: codecs.decode(np.asarray(r[0]), (np.asarray(r[1]), np.asarray(r[2]))),
        )

    def cls_reads(self, teacher: TeacherGroup, f: int, block: int) -> Reads:
        sel = (f, slice(None), teacher.cls_index(block))
        arr = self._array(f"teacher/{teacher.name}/cls")
        return Reads([(arr, sel)], lambda r: np.asarray(r[0], np.float32))  # (V, D)

    def occupancy_reads(self, f: int) -> Reads:
        arr = self._array("occupancy/bev")
        return Reads([(arr, f)], lambda r: unpack(np.asarray(r[0])))  # (H, W) bool

    def gather(self, *reads: Reads) -> list[Any]:
        """Run every read of ``reads`` in one round trip; their assembled results in order."""
        flat = [item for r in reads for item in r.items]
        for arr, sel in flat:
            self._guard.check(arr, *_rows(sel))
        values = sync(_gather([arr.async_array.getitem(sel) for arr, sel in flat]))
        out, i = [], 0
        for r in reads:
            out.append(r.assemble(values[i : i + len(r.items)]))
            i += len(r.items)
        return out

    def points(self, f: int) -> np.ndarray:
        return self.gather(self.points_reads(f))[0]

    def pairs(self, f: int) -> Pairs:
        return self.gather(self.pairs_reads(f))[0]

    def teacher_block(
        self, teacher: TeacherGroup, block: int, index: int | tuple[int, int]
    ) -> np.ndarray:
        return self.gather(self.teacher_block_reads(teacher, block, index))[0]

    def cls(self, teacher: TeacherGroup, f: int, block: int) -> np.ndarray:
        return self.gather(self.cls_reads(teacher, f, block))[0]

    def occupancy(self, f: int) -> np.ndarray:
        return self.gather(self.occupancy_reads(f))[0]


@dataclass(frozen=True)
class Reads:
    """Reads of one value: (array, selection) items and how to assemble their results."""

    items: list[tuple[zarr.Array, Any]]
    assemble: Any  # Callable[[list[np.ndarray]], value]


def _rows(selection: Any) -> tuple[int, int]:
    """Axis-0 rows [lo, hi) a read's selection touches (a frame, a row slice, or a tuple
    led by one)."""
    first = selection[0] if isinstance(selection, tuple) else selection
    if isinstance(first, slice):
        return int(first.start or 0), int(first.stop)
    return int(first), int(first) + 1


async def _gather(coros: list) -> list:
    return list(await asyncio.gather(*coros))


def evenly_spaced(n: int, fraction: float) -> np.ndarray:
    """Indices of round(n * fraction) (at least 1) of 0..n-1, spread evenly (sorted)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, round(n * fraction)))
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


class PointsBlock:
    """The points of frames [f0, f1), read from the store in one contiguous slice (a task's
    frames are contiguous, so this is one read instead of one per frame)."""

    def __init__(self, root: zarr.Group, f0: int, f1: int) -> None:
        self.f0 = f0
        group = root[POINTS.name]
        self.offsets = np.asarray(group["offsets"][f0 : f1 + 1])
        self.data = np.asarray(group["data"][self.offsets[0] : self.offsets[-1]])

    def count(self, f: int) -> int:
        """Points of frame f."""
        i = f - self.f0
        return int(self.offsets[i + 1] - self.offsets[i])

    def frame(self, f: int) -> np.ndarray:
        """(N, 4) float32 points of frame f."""
        i = f - self.f0
        return self.data[self.offsets[i] - self.offsets[0] : self.offsets[i + 1] - self.offsets[0]]


# -- the stages' reads (an open root group, one frame shard at a time) ---------------------------


@dataclass(frozen=True)
class IndexInfo:
    num_frames: int
    frames_per_shard: int
    cameras: list[str]
    dataset_root: str


def open_store(store: str) -> zarr.Group:
    """The store's root group, read-only."""
    return zarr.open_group(store, mode="r")


def index_info(root: zarr.Group) -> IndexInfo:
    attrs = root[INDEX.name].attrs
    return IndexInfo(
        num_frames=int(attrs["num_frames"]),
        frames_per_shard=int(attrs["frames_per_shard"]),
        cameras=list(attrs["cameras"]),
        dataset_root=str(attrs["dataset_root"]),
    )


def read_index(
    root: zarr.Group, fields: Sequence[str], f0: int = 0, f1: int | None = None
) -> dict[str, np.ndarray]:
    """Index arrays ``fields`` (names of ``INDEX``'s arrays) of frames [f0, f1); the file
    paths (``PATH_ARRAYS``) resolved against the index's dataset root ("" = no file)."""
    group = root[INDEX.name]
    base = str(group.attrs["dataset_root"])
    resolve = np.vectorize(lambda p: dataset_file(base, str(p)), otypes=[object])
    out = {}
    for name in fields:
        INDEX.array(name)  # KeyError naming the group for an unknown field
        values = np.asarray(group[name][f0:f1])
        out[name] = resolve(values) if name in PATH_ARRAYS and values.size else values
    return out


def read_offsets(root: zarr.Group, spec: GroupSpec) -> np.ndarray:
    """(F+1,) row offsets of a ragged group (``POINTS``, ``POINTMAPS``)."""
    return np.asarray(root[spec.name]["offsets"][:])


def read_valid(root: zarr.Group) -> np.ndarray:
    """(F,) bool: the frames with a t+1 occupancy target."""
    return np.asarray(root[OCCUPANCY.name]["valid"][:], dtype=bool)
