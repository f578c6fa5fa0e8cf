"""``validate_store``: check a Zarr cache against the layout of ``store.py``.

Every later stage calls this before it reads or writes. It collects every violation and
reports them in one message, so a user fixes a store in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import zarr

from hilda.errors import HildaError
from hilda.store.schema import (
    INDEX,
    ROOT_ATTRS,
    SCHEMA,
    SCHEMA_VERSION,
    STAGE_GROUPS,
    GroupSpec,
    is_half_made,
    normalize_store,
    num_shards,
    stage_command,
    teacher_group,
)
from hilda.store.written import check_group, has_records

Files = Literal["off", "sizes", "deep"]


class StoreValidationError(HildaError):
    """The store does not match the cache layout; ``problems`` lists every violation."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"store {path} is not a valid hilda cache ({len(problems)} problems):\n{lines}"
        )


def _dtype_name(arr: Any) -> str:
    dt = np.dtype(arr.dtype)
    if dt.kind in ("O", "T", "U"):
        return "str"
    return dt.name


def _check_array(
    arr: Any,
    path: str,
    aspec: Any,
    group: str,
    dims: dict[str, int],
    free: dict[str, int],
    problems: list[str],
) -> None:
    """An array's dtype and shape against its spec; symbols not fixed by ``dims`` (``free``)
    must agree between the arrays of one group."""
    if _dtype_name(arr) != aspec.dtype:
        problems.append(f"array {path}: dtype {_dtype_name(arr)}, expected {aspec.dtype}")
    shape = tuple(arr.shape)
    if len(shape) != len(aspec.shape):
        problems.append(f"array {path}: {len(shape)} dims {shape}, expected {aspec.shape}")
        return
    for axis, (got, want) in enumerate(zip(shape, aspec.shape, strict=True)):
        if isinstance(want, int) or want in ("F", "F+1", "V"):
            expect = (
                want if isinstance(want, int) else (dims["F"] + 1 if want == "F+1" else dims[want])
            )
            if got != expect:
                what = "frames count mismatch: " if want in ("F", "F+1") else ""
                problems.append(
                    f"array {path}: {what}axis {axis} is {got}, expected {want}={expect}"
                )
        elif free.setdefault(want, got) != got:
            problems.append(
                f"array {path}: axis {axis} is {got}, but {want}={free[want]} elsewhere in {group}/"
            )


def _check_group(
    root: zarr.Group, spec: GroupSpec, dims: dict[str, int], problems: list[str]
) -> None:
    try:
        group = root[spec.name]
    except KeyError:
        problems.append(f"group {spec.name}/ is missing")
        return
    if not isinstance(group, zarr.Group):
        problems.append(f"{spec.name} is an array, expected a group")
        return
    if is_half_made(group):
        problems.append(
            f"group {spec.name}/ is half-made (its creation was cut short): rerun "
            f"`{stage_command(spec.name)}` to rebuild it"
        )
        return
    attrs = dict(group.attrs)
    for key in spec.required_attrs:
        if key not in attrs:
            problems.append(f"{spec.name}/ lacks the attribute {key!r}")
    free: dict[str, int] = {}  # free symbols must agree between the arrays of one group
    names = [a.name for a in spec.arrays]
    if spec.has_completion_map:
        names.append("done")
    for name in names:
        path = f"{spec.name}/{name}"
        try:
            arr = group[name]
        except KeyError:
            problems.append(f"array {path} is missing")
            continue
        if name == "done":
            expected = (num_shards(dims["F"], dims["frames_per_shard"]),)
            if _dtype_name(arr) != "bool" or tuple(arr.shape) != expected:
                problems.append(
                    f"array {path}: completion map must be bool {expected}, "
                    f"got {_dtype_name(arr)} {tuple(arr.shape)}"
                )
            continue
        _check_array(arr, path, spec.array(name), spec.name, dims, free, problems)


def validate_store(
    path: str,
    *,
    require: Iterable[str] = ("index",),
    dataset: str | None = None,
    teacher: str | None = None,
    rebuild: str | None = None,
    files: Files = "off",
    files_of: Iterable[str] | None = None,
) -> zarr.Group:
    """Check the store at ``path`` (a folder or any fsspec URL zarr accepts).

    ``require`` names the groups that must exist (e.g. ``("index", "points")`` before the
    point-map stage); every other known group is checked when present. ``dataset`` refuses a
    store built from another dataset; ``teacher`` requires ``teacher/<teacher>``; ``rebuild``
    names a group the caller is about to (re)build, which is not checked.
    ``files`` also compares the groups' files with their write records
    (``hilda.store.written``): "sizes" their presence and sizes, "deep" their CRC-32 too,
    for the groups ``files_of`` names (every present group when None).
    Returns the opened root group (read-only). Raises ``StoreValidationError`` listing every
    violation.
    """
    path = normalize_store(path)
    try:
        root = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreValidationError(str(path), [f"no Zarr group at {path} ({exc})"]) from None
    except ValueError as exc:  # json.JSONDecodeError: a truncated or edited zarr.json
        raise StoreValidationError(
            str(path), [f"the store's metadata ({path}/zarr.json) is not valid JSON: {exc}"]
        ) from None
    problems = _root_problems(dict(root.attrs), dataset)
    require = set(require)
    dims = _index_dims(root)
    if dims:
        _check_group(root, INDEX, dims, problems)
        _check_stage_groups(root, dims, require, teacher, problems, rebuild)
    elif "index" in require:
        problems.append("group index/ is missing: run `hilda-prep index` first")
    if files != "off" and not problems:
        groups = stored_groups(root) if files_of is None else list(files_of)
        problems += file_problems(root, [g for g in groups if g != rebuild], files == "deep")
    if problems:
        raise StoreValidationError(str(path), problems)
    return root


def stored_groups(root: zarr.Group) -> list[str]:
    """Paths of every stage group the store holds (teacher groups one by one)."""
    groups = [spec.name for spec in STAGE_GROUPS if spec.name in root]
    if "teacher" in root:
        groups += [f"teacher/{name}" for name in sorted(root["teacher"].group_keys())]
    return groups


def file_problems(root: zarr.Group, groups: Iterable[str], deep: bool = False) -> list[str]:
    """One line per damaged unit (shard, row shard) of the groups, every one of them."""
    lines = []
    for path in groups:
        if path in root:
            for damage in check_group(root[path], deep=deep):
                lines.append(damage.line(stage_command(path)))
    return lines


def unrecorded_groups(root: zarr.Group) -> list[str]:
    """Groups built before write records existed: their files cannot be checked."""
    return [path for path in stored_groups(root) if not has_records(root[path])]


def _root_problems(attrs: dict, dataset: str | None) -> list[str]:
    problems = [f"root lacks the attribute {key!r}" for key in ROOT_ATTRS if key not in attrs]
    if attrs.get("schema", SCHEMA) != SCHEMA:
        problems.append(f"schema is {attrs.get('schema')!r}, expected {SCHEMA!r}")
    if "schema_version" in attrs and attrs["schema_version"] != SCHEMA_VERSION:
        problems.append(
            f"schema_version is {attrs['schema_version']}, this hilda reads {SCHEMA_VERSION}: "
            "rebuild the store with `hilda-prep index --overwrite`"
        )
    if dataset is not None and attrs.get("dataset") not in (None, dataset):
        problems.append(f"store was built from dataset {attrs.get('dataset')!r}, not {dataset!r}")
    return problems


def _index_dims(root: zarr.Group) -> dict[str, int]:
    """F, V and frames_per_shard from index/'s attrs (empty without index/)."""
    if "index" not in root:
        return {}
    index_attrs = dict(root["index"].attrs)
    cameras = index_attrs.get("cameras")
    dims = {
        "F": int(index_attrs.get("num_frames", -1)),
        "V": len(cameras) if isinstance(cameras, list) else -1,
        "frames_per_shard": int(index_attrs.get("frames_per_shard", 1)),
    }
    if dims["F"] < 0:
        try:
            dims["F"] = int(root["index/timestamp"].shape[0])
        except KeyError:
            dims["F"] = 0
    return dims


def _check_stage_groups(
    root: zarr.Group,
    dims: dict[str, int],
    require: set[str],
    teacher: str | None,
    problems: list[str],
    rebuild: str | None = None,
) -> None:
    """Every stage group present (and each required one exists), every teacher group, but
    ``rebuild``."""
    for spec in STAGE_GROUPS[1:]:
        if spec.name == rebuild:
            continue
        if spec.name in root:
            _check_group(root, spec, dims, problems)
        elif spec.name in require:
            problems.append(f"group {spec.name}/ is missing: run its `hilda-prep` stage first")
    teachers = root["teacher"] if "teacher" in root else None
    names = list(teachers.group_keys()) if teachers is not None else []
    for name in names:
        if f"teacher/{name}" == rebuild:
            continue
        if is_half_made(teachers[name]):
            problems.append(
                f"group teacher/{name}/ is half-made (its creation was cut short): rerun "
                f"`{stage_command('teacher')}` to rebuild it"
            )
            continue
        blocks = dict(teachers[name].attrs).get("blocks")
        if not isinstance(blocks, list):
            problems.append(f"teacher/{name}/ lacks the attribute 'blocks'")
            continue
        dtype = dict(teachers[name].attrs).get("storage_dtype", "float16")
        _check_group(root, teacher_group(name, blocks, dtype), dims, problems)
    if teacher is not None and teacher not in names:
        problems.append(
            f"teacher/{teacher}/ is missing (present: {names or 'none'}): "
            "run `hilda-prep extract-teacher` first"
        )
