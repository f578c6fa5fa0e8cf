"""What a ``teacher/<name>/`` group records about its features, defined once: the teacher
(``TeacherInfo``: which model, of which family and size, with which weights), how its
features were extracted (blocks, image size, norm) and how they are stored (codec). The stage
writes ``TeacherRecord.to_attrs()``, every reader gets ``TeacherRecord.from_attrs()``, and
the schema's required attributes and ``hilda-prep info``'s summary are derived from it.

``Layers`` is the one form of a teacher's block choice, converting between what users write
(``last2``, ``10,11``), the absolute block numbers the store records, and the offsets from
the last block the trainer's losses name (0 = the last block).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from hilda.errors import ConfigError

# Display names of the ``family`` values a group records.
FAMILY_LABELS = {"dinov2": "DINOv2", "dinov3": "DINOv3", "oracle": "oracle"}


# The teacher sizes (the ``arch`` a group records, a config's ``data.teacher_arch``), each
# with its family and public weights: the one table (``hilda.teachers`` builds them; the
# trainer names them in its messages).
@dataclass(frozen=True)
class Size:
    """A teacher size: its family and its public weights (a Hugging Face id)."""

    family: str
    hub: str


SIZES: dict[str, Size] = {
    "vits14": Size("dinov2", "facebook/dinov2-small"),
    "vitb14": Size("dinov2", "facebook/dinov2-base"),
    "vitl14": Size("dinov2", "facebook/dinov2-large"),
    "vitg14": Size("dinov2", "facebook/dinov2-giant"),
    "vits14_reg": Size("dinov2", "facebook/dinov2-with-registers-small"),
    "vitb14_reg": Size("dinov2", "facebook/dinov2-with-registers-base"),
    "vitl14_reg": Size("dinov2", "facebook/dinov2-with-registers-large"),
    "vitg14_reg": Size("dinov2", "facebook/dinov2-with-registers-giant"),
    "dinov3_vits16": Size("dinov3", "facebook/dinov3-vits16-pretrain-lvd1689m"),
    "dinov3_vits16plus": Size("dinov3", "facebook/dinov3-vits16plus-pretrain-lvd1689m"),
    "dinov3_vitb16": Size("dinov3", "facebook/dinov3-vitb16-pretrain-lvd1689m"),
    "dinov3_vitl16": Size("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
    "dinov3_vith16plus": Size("dinov3", "facebook/dinov3-vith16plus-pretrain-lvd1689m"),
}


DEFAULT_LAYERS = "last2"  # the teacher blocks a stage extracts when none are named


def family_of(attrs: dict[str, Any]) -> str:
    """A group's family; groups written before DINOv3 record none: a DINOv2 ViT or the
    oracle."""
    return str(attrs.get("family", "oracle" if attrs.get("arch") == "oracle" else "dinov2"))


def size_name(arch: str, family: str, registers: int) -> str:
    """The size name configs use (``data.teacher_arch``): a DINOv2 with registers is its own
    size, ``vits14_reg`` (stored as arch ``vits14`` with 4 registers)."""
    return f"{arch}_reg" if family == "dinov2" and registers else arch


@dataclass(frozen=True)
class TeacherInfo:
    """A loaded teacher: what the store records of the model itself."""

    model_id: str  # the source as the user gave it (hub id, folder, file, random:<size>)
    arch: str  # its size, e.g. vits14 (registers counted apart), dinov3_vitb16, oracle
    dim: int
    depth: int
    registers: int
    weights_hash: str
    random_init: bool
    pos_embed_interpolation: str  # how positions are encoded at the image size
    family: str = "dinov2"  # dinov2 | dinov3 | oracle
    patch_size: int = 14

    @property
    def size(self) -> str:
        """The size name a config's ``data.teacher_arch`` uses (``size_name``)."""
        return size_name(self.arch, self.family, self.registers)

    @property
    def label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)


@dataclass(frozen=True)
class TeacherRecord:
    """A teacher group's provenance (its attributes)."""

    teacher: TeacherInfo
    blocks: tuple[int, ...]  # stored block numbers (0-based), in ``cls``'s K order
    image_size: tuple[int, int]  # (W, H) fed to the teacher
    norm: str
    codec: str
    storage_dtype: str
    resize: str

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) patches."""
        w, h = self.image_size
        return h // self.teacher.patch_size, w // self.teacher.patch_size

    @property
    def int8(self) -> bool:
        return self.storage_dtype == "int8"

    def to_attrs(self) -> dict[str, Any]:
        """The group's attributes (flat, JSON), as every store since schema 1 holds them."""
        return {
            **dataclasses.asdict(self.teacher),
            "blocks": list(self.blocks),
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "norm": self.norm,
            "codec": self.codec,
            "storage_dtype": self.storage_dtype,
            "resize": self.resize,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> TeacherRecord:
        """Read back ``to_attrs``; groups written before DINOv3 record no family (a DINOv2
        ViT or the oracle) nor patch size (14)."""
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ConfigError(
                f"{where} does not record {', '.join(missing)}; rebuild it with `hilda-prep "
                "extract-teacher --overwrite`"
            )
        arch = str(attrs["arch"])
        info = TeacherInfo(
            model_id=str(attrs["model_id"]),
            arch=arch,
            dim=int(attrs["dim"]),
            depth=int(attrs["depth"]),
            registers=int(attrs.get("registers", 0) or 0),
            weights_hash=str(attrs["weights_hash"]),
            random_init=bool(attrs.get("random_init", False)),
            pos_embed_interpolation=str(attrs.get("pos_embed_interpolation", "")),
            family=family_of(attrs),
            patch_size=int(attrs.get("patch_size", 14)),
        )
        width, height = (int(v) for v in attrs["image_size"])
        return cls(
            teacher=info,
            blocks=tuple(int(b) for b in attrs["blocks"]),
            image_size=(width, height),
            norm=str(attrs["norm"]),
            codec=str(attrs["codec"]),
            storage_dtype=str(attrs["storage_dtype"]),
            resize=str(attrs.get("resize", "")),
        )


# What a complete teacher group must record (the schema checks them).
REQUIRED_ATTRS = (
    "model_id",
    "arch",
    "weights_hash",
    "blocks",
    "image_size",
    "dim",
    "depth",
    "norm",
    "codec",
    "storage_dtype",
)
# What ``hilda-prep info`` prints of a teacher group.
SUMMARY_ATTRS = (
    "model_id",
    "family",
    "patch_size",
    "grid",
    "random_init",
    "weights_hash",
    "blocks",
    "image_size",
    "dim",
    "norm",
    "codec",
)


@dataclass(frozen=True)
class Layers:
    """A choice of a teacher's blocks: ``blocks`` are 0-based numbers of a ``depth``-block
    teacher, sorted."""

    blocks: tuple[int, ...]
    depth: int

    @classmethod
    def parse(cls, spec: str, depth: int) -> Layers:
        """``lastK`` or comma-separated block numbers (negative count from the end)."""
        spec = spec.strip()
        if m := re.fullmatch(r"last(\d+)", spec):
            k = int(m.group(1))
            if not 1 <= k <= depth:
                raise ConfigError(f"--layers {spec}: the teacher has {depth} blocks")
            return cls(tuple(range(depth - k, depth)), depth)
        try:
            numbers = {int(x) for x in spec.split(",")}
        except ValueError:
            raise ConfigError(
                f"--layers must be lastK or block indices like 10,11; got {spec!r}"
            ) from None
        blocks = sorted(b % depth if -depth <= b < 0 else b for b in numbers)
        if any(not 0 <= b < depth for b in blocks):
            raise ConfigError(f"--layers {spec}: block indices must be in [0, {depth})")
        return cls(tuple(blocks), depth)

    @classmethod
    def from_offsets(cls, offsets: set[int] | tuple[int, ...], depth: int) -> Layers:
        """The blocks that offsets from the last block (0 = the last) name."""
        return cls(tuple(sorted(depth - 1 - k for k in offsets)), depth)  # ascending blocks

    def block(self, offset: int) -> int:
        """The block number of an offset from the last block (0 = the last)."""
        return self.depth - 1 - offset

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sorted(self.depth - 1 - b for b in self.blocks))

    @staticmethod
    def last(k: int) -> str:
        """What a user writes for the last ``k`` blocks."""
        return f"last{k}"

    def covering(self) -> str:
        """The ``lastK`` choice that holds every one of these blocks."""
        return self.last(self.depth - min(self.blocks))
