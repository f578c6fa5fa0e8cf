"""What a user names as the teacher (``--teacher``), parsed once into a ``TeacherSpec``, and
the one table of teacher sizes with their public weights.

Sources: ``oracle``; ``random:<size>`` (a randomly initialised model of a size in ``SIZES``,
only ever when named); an official facebookresearch checkpoint (a ``.pth`` / ``.pt`` file:
DINOv2 ``dinov2_vit*14*_pretrain.pth``, DINOv3 ``dinov3_vit*16*_pretrain_lvd1689m-*.pth``);
a folder saved by ``save_pretrained`` or a Hugging Face id. The family of the last two is
read from the file or the model's config when it is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hilda.errors import ConfigError
from hilda.store.teacher_record import SIZES

if TYPE_CHECKING:
    import torch


ORACLE = "oracle"

TEACHER_CHOICES = (
    "a Hugging Face id (e.g. facebook/dinov2-small), a folder saved by save_pretrained, an "
    "official dinov2_*_pretrain.pth / dinov3_*_pretrain_lvd1689m-*.pth checkpoint, "
    "random:<size> for a randomly initialised teacher (sizes: "
    + ", ".join(SIZES)
    + "), or oracle (synthetic worlds)"
)

Kind = Literal["oracle", "random", "official", "pretrained"]


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed ``--teacher``."""

    source: str  # as the user wrote it: the store records it as the model id
    kind: Kind  # oracle | random (random:<size>) | official (.pth) | pretrained (folder, hub id)
    size: str | None = None  # random: the size

    @property
    def reads_class_maps(self) -> bool:
        """Its features come from the images' class maps (the oracle): synthetic worlds only."""
        return self.kind == "oracle"

    @property
    def family(self) -> str | None:
        """Known before loading for ``oracle`` and ``random:<size>``; read from the weights
        (official, pretrained) when they are loaded."""
        if self.kind == "oracle":
            return ORACLE
        return SIZES[self.size].family if self.size else None


def parse_teacher(source: str) -> TeacherSpec:
    """The ``TeacherSpec`` of what a user wrote; an unknown ``random:`` size is an error
    listing the known ones."""
    source = source.strip()
    if not source:
        raise ConfigError(f"--teacher is empty: {TEACHER_CHOICES}")
    if source == ORACLE:
        return TeacherSpec(source, "oracle")
    if source.startswith("random:"):
        size = source.split(":", 1)[1]
        if size not in SIZES:
            raise ConfigError(
                f"unknown teacher size {size!r} in {source!r}; use one of {', '.join(SIZES)}"
            )
        return TeacherSpec(source, "random", size)
    if source.endswith((".pth", ".pt")):
        return TeacherSpec(source, "official")
    return TeacherSpec(source, "pretrained")


def hub_source(size: str) -> str:
    """The public weights of a teacher size, or an error listing the known sizes."""
    if size not in SIZES:
        raise ConfigError(
            f"data.teacher_arch={size!r} is no known teacher size: use one of "
            f"{', '.join(SIZES)}, or pass --teacher"
        )
    return SIZES[size].hub


def read_official_state(source: str) -> dict[str, torch.Tensor]:
    """An official checkpoint's state dict (either family), or a clear error naming it."""
    import torch

    if not os.path.isfile(source):
        raise ConfigError(f"teacher checkpoint {source} does not exist")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or refused by weights_only
        raise ConfigError(
            f"teacher checkpoint {source} cannot be read as an official DINOv2/DINOv3 "
            f"state dict: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"teacher checkpoint {source} holds no state dict")
    return state
