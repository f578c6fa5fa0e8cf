"""Write records: what each stage wrote, so that nothing is read that was not written.

Zarr reads an absent chunk file as its fill value, and it writes no file at all for a shard
whose values are all fill. A shard file deleted or lost after its stage finished therefore
reads as zeros without an error, and presence alone cannot tell a lost file from an all-fill
one. So each unit of work records, when it is done, the storage keys it covers with the size
and CRC-32 of each file (``None``: zarr wrote no file, all fill):

* a per-frame stage group (teacher, occupancy): one record per frame shard, in its row of
  the ``written (S,)`` string array (one chunk a shard, so a shard writes only its own
  record, as with ``done``);
* a ragged group (points, pointmaps): one record per row shard, in ``rows_written (R,)``;
* arrays the driver writes whole (the index, a ragged group's offsets): one record in the
  group's ``written`` attribute.

The reader compares a shard's file sizes with its record the first time a process reads it
(``RecordGuard``); ``hilda-prep validate`` compares every file's size, and with ``--deep``
its CRC-32. A group built before records existed has none; it is read as before and
``validate`` says so.

The record is JSON ``{key: [nbytes, crc32] | null}``, keys relative to the group
(``layer_11/c/3/0/0/0/0``). CRC-32 (zlib) and not a cryptographic hash: the record guards
against lost, truncated and damaged files, not against someone forging one, and zlib's
CRC-32 runs at disk speed (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from hilda.errors import HildaError

RECORD = "written"  # (S,) str per frame shard; also the attribute of driver-written arrays
ROWS_RECORD = "rows_written"  # (R,) str per row shard of a ragged group
# Arrays that are bookkeeping, not data: a lost chunk of one reads as "not done" or "not
# recorded", which every reader already refuses.
BOOKKEEPING = frozenset({"done", "rows_done", RECORD, ROWS_RECORD, "shard_stats"})

Entry = list[int] | None  # [nbytes, crc32], or None: no file (all fill)
Record = dict[str, Entry]


class DamagedShardError(HildaError):
    """A shard's files differ from what its stage recorded (missing, truncated, damaged)."""


# -- the pure part: which storage keys a range of rows covers ------------------------------


def cell_grid(shape: Sequence[int], outer: Sequence[int]) -> tuple[int, ...]:
    """Number of storage cells (shard files, or chunk files when unsharded) per axis."""
    return tuple(max(1, math.ceil(n / c)) if c else 1 for n, c in zip(shape, outer, strict=True))


def cells_along(outer0: int, lo: int, hi: int) -> range:
    """The axis-0 cells that hold rows [lo, hi) (empty when the range is)."""
    if hi <= lo:
        return range(0)
    return range(lo // outer0, (hi - 1) // outer0 + 1)


def cell_keys(arr: zarr.Array, cells: Iterable[int]) -> list[str]:
    """Storage keys (relative to the array) of the given axis-0 cells, across every cell of
    the other axes."""
    outer = tuple(arr.metadata.chunk_grid.chunk_shape)  # the shard shape when sharded
    grid = cell_grid(arr.shape, outer)
    rest = itertools.product(*(range(n) for n in grid[1:]))
    tails = list(rest)
    return [arr.metadata.encode_chunk_key((c, *t)) for c in cells for t in tails]


def data_arrays(group: zarr.Group) -> list[str]:
    """The group's data arrays (sorted), bookkeeping left out."""
    return sorted(name for name in group.array_keys() if name not in BOOKKEEPING)


def keys_of_rows(group: zarr.Group, names: Iterable[str], lo: int, hi: int) -> list[str]:
    """Group-relative storage keys of rows [lo, hi) of the named arrays."""
    keys = []
    for name in names:
        arr = group[name]
        cells = cells_along(int(arr.metadata.chunk_grid.chunk_shape[0]), lo, hi)
        keys += [f"{name}/{k}" for k in cell_keys(arr, cells)]
    return keys


def keys_of_arrays(group: zarr.Group, names: Iterable[str]) -> list[str]:
    """Group-relative storage keys of every cell of the named arrays."""
    keys = []
    for name in names:
        arr = group[name]
        cells = range(cell_grid(arr.shape, arr.metadata.chunk_grid.chunk_shape)[0])
        keys += [f"{name}/{k}" for k in cell_keys(arr, cells)]
    return keys


# -- the I/O edge -------------------------------------------------------------------------


def _store_key(group: zarr.Group, key: str) -> str:
    return f"{group.path}/{key}" if group.path else key


async def _entry(store: Any, key: str) -> Entry:
    buf = await store.get(key, prototype=default_buffer_prototype())
    if buf is None:
        return None
    data = buf.to_bytes()
    return [len(data), zlib.crc32(data)]


async def _size(store: Any, key: str) -> int | None:
    try:
        return int(await store.getsize(key))
    except FileNotFoundError:
        return None


async def _all(coros: list) -> list:
    return list(await asyncio.gather(*coros))


def describe(group: zarr.Group, keys: Sequence[str]) -> Record:
    """Each key's file as written now: [nbytes, crc32], or None when there is none."""
    store = group.store
    entries = sync(_all([_entry(store, _store_key(group, k)) for k in keys]))
    return dict(zip(keys, entries, strict=True))


def sizes(group: zarr.Group, keys: Sequence[str]) -> dict[str, int | None]:
    """Each key's file size now (None: no file)."""
    store = group.store
    found = sync(_all([_size(store, _store_key(group, k)) for k in keys]))
    return dict(zip(keys, found, strict=True))


def describe_rows(
    store: str, path: str, lo: int, hi: int, names: Sequence[str] | None = None
) -> Record:
    """The record of rows [lo, hi) of the named arrays of group ``path`` (every data array
    when None): a worker's, right after it wrote them (the files are in the page cache)."""
    group = zarr.open_group(store, path=path, mode="r")
    names = data_arrays(group) if names is None else names
    return describe(group, keys_of_rows(group, names, lo, hi))


def describe_whole(group: zarr.Group, names: Iterable[str]) -> Record:
    """The record of every cell of the named arrays (the driver's whole writes)."""
    return describe(group, keys_of_arrays(group, names))


def record_array(group: zarr.Group, name: str, units: int) -> zarr.Array:
    """The group's record array ``name`` with one string per unit, created when missing or
    sized for another number of units."""
    if name not in group or group[name].shape[0] != units:
        group.create_array(
            name, shape=(max(1, units),), dtype=str, chunks=(1,), fill_value="", overwrite=True
        )
    return group[name]


def put_record(group: zarr.Group, name: str, unit: int, record: Record) -> None:
    """Unit ``unit``'s record (its own chunk of ``name``), before its done flag."""
    text = np.array([json.dumps(record, sort_keys=True)], dtype=object)
    group[name][unit : unit + 1] = text


def put_whole_record(group: zarr.Group, record: Record) -> None:
    group.attrs[RECORD] = record


def read_records(array: zarr.Array) -> list[Record | None]:
    return [json.loads(str(t)) if str(t) else None for t in np.asarray(array[:])]


# -- checking -----------------------------------------------------------------------------


def compare(record: Record, found: dict[str, int | None]) -> list[str]:
    """What differs between a record and the files' sizes now, one phrase per file."""
    out = []
    for key, entry in record.items():
        size = found.get(key)
        if entry is None:
            if size is not None:
                out.append(f"{key} exists ({size} bytes) but was written as all fill (no file)")
        elif size is None:
            out.append(f"{key} is missing (written: {entry[0]} bytes)")
        elif size != entry[0]:
            out.append(f"{key} is {size} bytes, written {entry[0]}")
    return out


def compare_content(record: Record, now: Record) -> list[str]:
    """What differs in content (sizes first, then CRC-32)."""
    out = compare(record, {k: (None if v is None else v[0]) for k, v in now.items()})
    for key, entry in record.items():
        got = now.get(key)
        if entry is not None and got is not None and got[0] == entry[0] and got[1] != entry[1]:
            out.append(f"{key} is damaged (CRC-32 {got[1]:08x}, written {entry[1]:08x})")
    return out


@dataclass(frozen=True)
class Damage:
    """One damaged unit of a group: its shard (or row shard) and what is wrong."""

    group: str
    unit: str  # "shard 3", "row shard 0", "whole arrays"
    problems: tuple[str, ...]

    def line(self, command: str) -> str:
        return (
            f"{self.group}/ {self.unit}: {'; '.join(self.problems)}; rebuild {self.group}/ "
            f"with `{command} --overwrite` (and the options it was built with)"
        )


def group_units(group: zarr.Group) -> list[tuple[str, Record | None]]:
    """Every recorded unit of the group: (label, record); None where a finished unit has no
    record. Empty for a group built before records existed."""
    units: list[tuple[str, Record | None]] = []
    if RECORD in group.attrs:
        units.append(("whole arrays", dict(group.attrs[RECORD])))
    for name, label in ((RECORD, "shard"), (ROWS_RECORD, "row shard")):
        if name in group.array_keys():
            done = _done_of(group, name)
            for i, rec in enumerate(read_records(group[name])):
                if rec is not None or done[i]:
                    units.append((f"{label} {i}", rec))
    return units


def _done_of(group: zarr.Group, record: str) -> np.ndarray:
    name = "done" if record == RECORD else "rows_done"
    n = group[record].shape[0]
    if name not in group:
        return np.zeros(n, dtype=bool)
    done = np.asarray(group[name][:], dtype=bool)
    return done if len(done) == n else np.zeros(n, dtype=bool)


def has_records(group: zarr.Group) -> bool:
    return RECORD in group.attrs or any(n in group.array_keys() for n in (RECORD, ROWS_RECORD))


def check_group(group: zarr.Group, deep: bool = False) -> list[Damage]:
    """Every damaged unit of a group (sizes, and with ``deep`` the CRC-32 of every file)."""
    damage = []
    units = group_units(group)
    # Sizes: every file of the group in one round of concurrent requests (one a unit would
    # cost a round trip each: 1k shards at 34k frames). Content: a unit at a time (memory).
    found = {} if deep else sizes(group, sorted({k for _, rec in units for k in rec or {}}))
    for label, record in units:
        if record is None:
            damage.append(Damage(group.path, label, ("finished but has no write record",)))
            continue
        if deep:
            problems = compare_content(record, describe(group, sorted(record)))
        else:
            problems = compare(record, found)
        if problems:
            damage.append(Damage(group.path, label, tuple(problems)))
    return damage


class RecordGuard:
    """The reader's check: the first read of a storage cell in this process compares the
    files of the cell's unit (its frame shard, row shard, or the driver's whole arrays)
    with their record; a unit that differs, or that has no record though its group has
    records, raises ``DamagedShardError`` naming the group, the shard and the command that
    rebuilds it. A group without records (built before them) is read unchecked."""

    def __init__(self, root: zarr.Group, where: str, command: Callable[[str], str]) -> None:
        self._root = root
        self._where = where
        self._command = command  # group path -> the hilda-prep command that builds it
        self._checked: set[tuple[str, int | str]] = set()
        self._groups: dict[str, tuple[Record, zarr.Array | None]] = {}

    def _records(self, group: str) -> tuple[Record, zarr.Array | None]:
        """The group's whole-array record ({} if none) and its per-unit record array."""
        if group not in self._groups:
            g = self._root[group]
            names = set(g.array_keys())
            name = ROWS_RECORD if ROWS_RECORD in names else RECORD if RECORD in names else None
            self._groups[group] = (dict(g.attrs.get(RECORD, {})), g[name] if name else None)
        return self._groups[group]

    def check(self, arr: zarr.Array, lo: int, hi: int) -> None:
        """Rows [lo, hi) of ``arr`` are as their stage wrote them."""
        group, _, name = arr.path.rpartition("/")
        whole, units = self._records(group)
        prefix = f"{name}/"
        own = {k: v for k, v in whole.items() if k.startswith(prefix)}
        if own:
            if (group, name) not in self._checked:
                self._fail_if(group, "whole arrays", own)
                self._checked.add((group, name))
            return
        if units is None:
            return
        outer0 = int(arr.metadata.chunk_grid.chunk_shape[0])
        label = "row shard" if units.basename == ROWS_RECORD else "shard"
        todo = [u for u in cells_along(outer0, lo, hi) if (group, u) not in self._checked]
        if not todo:
            return
        # The units' records in one read and their files' sizes in one round of requests: a
        # whole-array read (the loader's start-up) touches every shard of the group.
        a, b = todo[0], min(todo[-1] + 1, units.shape[0])
        texts = [str(t) for t in np.asarray(units[a:b])] if b > a else []
        records = {u: (json.loads(texts[u - a]) if u < b and texts[u - a] else None) for u in todo}
        keys = sorted({k for rec in records.values() for k in rec or {}})
        found = sizes(self._root[group], keys)
        for unit in todo:
            self._fail_if(group, f"{label} {unit}", records[unit], found)
            self._checked.add((group, unit))

    def _fail_if(
        self, group: str, label: str, record: Record | None, found: dict | None = None
    ) -> None:
        if record is None:
            problems = ["it has no write record (unfinished, or its record is lost)"]
        else:
            found = sizes(self._root[group], sorted(record)) if found is None else found
            problems = compare(record, found)
        if problems:
            damage = Damage(group, label, tuple(problems))
            raise DamagedShardError(f"{self._where}: {damage.line(self._command(group))}")
