"""The teacher as one unit: a ``TeacherSpec`` parsed once, one ``Teacher`` protocol for every
family (the stage has no family branch), one record of a teacher group written and read
through the store, one ``Layers`` type, and the trainer free of prep-time code."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from hilda.errors import ConfigError
from hilda.store.teacher_record import REQUIRED_ATTRS, SIZES, Layers, TeacherInfo, TeacherRecord
from hilda.teachers import Teacher, load_teacher, parse_teacher

HILDA = Path(__file__).resolve().parents[1] / "hilda"


def test_layers_convert_between_what_users_write_blocks_and_offsets() -> None:
    assert Layers.parse("last2", 12).blocks == (10, 11)
    assert Layers.parse("3,-1", 12).blocks == (3, 11)
    layers = Layers.from_offsets({0, 2}, 12)
    assert layers.blocks == (9, 11) and layers.offsets == (0, 2) and layers.block(2) == 9
    assert layers.covering() == "last3" and Layers.last(4) == "last4"
    for bad, message in (("last13", "has 12 blocks"), ("12", r"in \[0, 12\)"), ("x", "lastK")):
        with pytest.raises(ConfigError, match=message):
            Layers.parse(bad, 12)


def _record(**info) -> TeacherRecord:
    base = dict(
        model_id="random:vits14_reg",
        arch="vits14",
        dim=384,
        depth=12,
        registers=4,
        weights_hash="0123456789abcdef",
        random_init=True,
        pos_embed_interpolation="official DINOv2",
    )
    return TeacherRecord(
        teacher=TeacherInfo(**{**base, **info}),
        blocks=(10, 11),
        image_size=(448, 224),
        norm="final LayerNorm",
        codec="int8",
        storage_dtype="int8",
        resize="PIL",
    )


def test_the_record_round_trips_through_the_group_attributes() -> None:
    record = _record()
    attrs = record.to_attrs()
    assert set(REQUIRED_ATTRS) <= set(attrs) and attrs["grid"] == [16, 32]
    assert TeacherRecord.from_attrs(attrs, "t") == record
    assert record.teacher.size == "vits14_reg" and record.int8
    old = {k: v for k, v in attrs.items() if k not in ("family", "patch_size")}
    assert TeacherRecord.from_attrs(old, "t").teacher.family == "dinov2"  # before DINOv3
    with pytest.raises(ConfigError, match=r"c\.zarr: teacher/x/ does not record depth"):
        TeacherRecord.from_attrs(
            {k: v for k, v in attrs.items() if k != "depth"}, "c.zarr: teacher/x/"
        )


def test_a_spec_is_parsed_once_and_unknown_sizes_are_refused() -> None:
    assert parse_teacher("oracle").reads_class_maps
    spec = parse_teacher("random:dinov3_vitb16")
    assert (spec.kind, spec.size, spec.family) == ("random", "dinov3_vitb16", "dinov3")
    assert parse_teacher("/w/dinov2_vits14_pretrain.pth").kind == "official"
    assert parse_teacher("facebook/dinov2-small").kind == "pretrained"
    with pytest.raises(ConfigError, match=r"unknown teacher size 'vitz14'.*vits14, vitb14"):
        parse_teacher("random:vitz14")
    assert all(size.hub.startswith("facebook/") for size in SIZES.values())


@pytest.mark.parametrize("source", ["oracle", "random:vits14", "random:dinov3_vits16"])
def test_every_family_is_one_teacher_protocol(source: str) -> None:
    teacher: Teacher = load_teacher(source, "last2")
    info = teacher.info
    assert teacher.blocks == (info.depth - 2, info.depth - 1)
    p = info.patch_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (2 * p, 3 * p, 3), dtype=np.uint8) for _ in range(2)]
    maps = [rng.integers(0, 5, (2 * p, 3 * p), dtype=np.uint8) for _ in range(2)]
    patches, cls = teacher.to(teacher.device).features(images, maps)
    assert patches.shape == (2, 2, 2, 3, info.dim) and cls.shape == (2, 2, info.dim)
    assert patches.dtype == np.float32 and teacher.needs_class_maps == (source == "oracle")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_trainer_imports_no_prep_time_code_and_no_family_is_chosen_outside() -> None:
    for path in (HILDA / "train").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("hilda.teachers", "hilda.pipeline"))}
        assert not bad, f"{path} imports {bad}"
    stage = (HILDA / "pipeline" / "stages" / "teacher.py").read_text()
    for family_test in ('"oracle"', "ORACLE", "dinov3", "random:"):
        assert family_test not in stage, family_test
    assert not (HILDA / "models" / "teacher.py").exists()
