"""The frozen camera teachers, prep-time code (``hilda-prep extract-teacher``): one ``Teacher``
protocol, implemented once per family, chosen from a ``TeacherSpec`` parsed once from what
the user wrote (``hilda.teachers.spec``).

- ``dinov2``: DINOv2 (patch 14, learned positions, official interpolation), with and without
  registers; ``dinov3``: DINOv3 (patch 16, RoPE, storage tokens); both are ``ViTTeacher``s
  (``vit``): transformers models whose features equal the official
  ``get_intermediate_layers(norm=True)``;
- ``oracle``: known-semantics features of the synthetic world's class maps.

What the store records of a teacher is ``hilda.store.teacher_record.TeacherInfo``; the
trainer reads it from the store and imports nothing of this package.

Adding a family: one module with ``FAMILY``, ``MODEL_TYPES`` (transformers' model types it
loads, if any), ``is_official_state(state)``, ``load(spec, state)`` and
``from_transformers(model, source)``, its sizes in ``spec.SIZES``, and one entry in
``FAMILIES`` below.
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import numpy as np
import torch
from torch import nn

from hilda.errors import ConfigError
from hilda.store.teacher_record import FAMILY_LABELS, Layers, TeacherInfo
from hilda.teachers import dinov2, dinov3, oracle
from hilda.teachers.spec import (
    SIZES,
    TEACHER_CHOICES,
    TeacherSpec,
    parse_teacher,
    read_official_state,
)
from hilda.teachers.vit import MultiLayerTeacher, ViTTeacher, enable_xformers, preprocess

# The ViT families, by name: what a random size, an official checkpoint and a transformers
# model of each are loaded with.
FAMILIES: dict[str, ModuleType] = {"dinov2": dinov2, "dinov3": dinov3}


class Teacher(Protocol):
    """Patch grids and CLS tokens of the chosen blocks of camera images."""

    info: TeacherInfo
    blocks: tuple[int, ...]  # block numbers (0-based), in the K order of the outputs
    needs_class_maps: bool  # reads each image's class map beside it (the oracle)
    device: torch.device  # where it runs, and where its images are decoded

    def to(self, device: torch.device) -> Teacher: ...

    def features(
        self, images: list[np.ndarray] | list[torch.Tensor], class_maps: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """images (H, W, 3) uint8 at the teacher's size -> patches (B, K, h, w, D) and cls
        (B, K, D), float32."""


def _pretrained(spec: TeacherSpec) -> tuple[nn.Module, TeacherInfo]:
    """A folder or a hub id, through transformers; its family by its config's model type."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(spec.source)
        model = AutoModel.from_pretrained(spec.source, config=config)
    except OSError as exc:
        raise ConfigError(
            f"cannot load teacher {spec.source!r}: {exc}. Without network access pass a local "
            "directory, an official dinov2_*_pretrain.pth file, or random:<size>"
        ) from None
    kind = getattr(model.config, "model_type", "")
    family = next((f for f in FAMILIES.values() if kind in f.MODEL_TYPES), None)
    if family is None:
        raise ConfigError(f"teacher {spec.source!r} is a {kind!r} model, not DINOv2 or DINOv3")
    return family.from_transformers(model, spec.source)


def build_teacher(source: str | TeacherSpec) -> tuple[nn.Module, TeacherInfo]:
    """The ViT of ``source`` (see ``hilda.teachers.spec``) and its record; eval mode,
    gradients off."""
    spec = parse_teacher(source) if isinstance(source, str) else source
    if spec.kind == "oracle":
        raise ConfigError("the oracle teacher is no ViT (use load_teacher)")
    if spec.kind == "random":
        return FAMILIES[spec.family or ""].load(spec)
    if spec.kind == "pretrained":
        return _pretrained(spec)
    state = read_official_state(spec.source)
    family = next((f for f in FAMILIES.values() if f.is_official_state(state)), None)
    if family is None:
        raise ConfigError(
            f"teacher checkpoint {spec.source} holds neither an official DINOv2 nor a DINOv3 "
            "state dict"
        )
    return family.load(spec, state)


def teacher_info(source: str | TeacherSpec) -> TeacherInfo:
    """What the store records of the teacher ``source`` (loads a ViT's weights to hash them)."""
    spec = parse_teacher(source) if isinstance(source, str) else source
    if spec.kind == "oracle":
        return oracle.oracle_info()
    return build_teacher(spec)[1]


def load_teacher(source: str | TeacherSpec, layers: str, norm: bool = True) -> Teacher:
    """The ``Teacher`` of ``source`` on its ``layers`` (``lastK`` or block numbers)."""
    spec = parse_teacher(source) if isinstance(source, str) else source
    if spec.kind == "oracle":
        info = oracle.oracle_info()
        return oracle.OracleTeacher(oracle.OracleSpec(), Layers.parse(layers, info.depth).blocks)
    model, info = build_teacher(spec)
    return ViTTeacher(model, info, Layers.parse(layers, info.depth), norm)


def parse_layers(spec: str, depth: int) -> list[int]:
    """``lastK`` or block numbers -> sorted 0-based block numbers (``Layers.parse``)."""
    return list(Layers.parse(spec, depth).blocks)


__all__ = [
    "FAMILIES",
    "FAMILY_LABELS",
    "SIZES",
    "TEACHER_CHOICES",
    "Layers",
    "MultiLayerTeacher",
    "Teacher",
    "TeacherInfo",
    "TeacherSpec",
    "ViTTeacher",
    "build_teacher",
    "enable_xformers",
    "load_teacher",
    "parse_layers",
    "parse_teacher",
    "preprocess",
    "teacher_info",
]
