"""The DINOv2 teacher family (facebookresearch/dinov2) through transformers: sizes with and
without registers, configs, the official position-embedding interpolation, the official
checkpoint keys both ways, and ``load`` of a ``TeacherSpec`` of this family.

DINOv2:
The features equal the official implementation's (facebookresearch/dinov2,
``DinoVisionTransformer.get_intermediate_layers(norm=True)``), not transformers' own: the
output of each selected block with the final LayerNorm applied (``norm=False`` keeps the raw
block output), CLS and register tokens stripped, reshaped to the (h, w) patch grid. The one
place where transformers computes something else is the resizing of the 37 x 37 position
embeddings to another patch grid: transformers interpolates bicubically to the exact grid,
while the official code passes a scale factor ``(h0 + offset) / 37`` (offset 0.1, no
antialias, for the models without registers; offset 0 and antialias for the register models),
which moves the sampling positions. ``use_official_pos_interpolation`` replaces the method on
the loaded model's embeddings, so every source gets the official resizing without a fork
of transformers.
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hilda.errors import ConfigError
from hilda.store.teacher_record import TeacherInfo
from hilda.teachers.spec import TeacherSpec, read_official_state
from hilda.teachers.vit import model_info


@dataclass(frozen=True)
class ViTSize:
    """One official DINOv2 size (dinov2/models/vision_transformer.py: vit_small ... vit_giant2)."""

    dim: int
    depth: int
    heads: int
    swiglu: bool  # ViT-g's SwiGLU feed-forward


SIZES: dict[str, ViTSize] = {
    "vits14": ViTSize(dim=384, depth=12, heads=6, swiglu=False),
    "vitb14": ViTSize(dim=768, depth=12, heads=12, swiglu=False),
    "vitl14": ViTSize(dim=1024, depth=24, heads=16, swiglu=False),
    "vitg14": ViTSize(dim=1536, depth=40, heads=24, swiglu=True),
}

PATCH = 14
NATIVE_IMAGE = 518  # official pos_embed covers 37 x 37 patches


def _config(arch: str, registers: int):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    size = SIZES[arch]
    kwargs = dict(
        hidden_size=size.dim,
        num_hidden_layers=size.depth,
        num_attention_heads=size.heads,
        image_size=NATIVE_IMAGE,
        patch_size=PATCH,
        layerscale_value=1e-5,
        use_swiglu_ffn=size.swiglu,
        mlp_ratio=4,
    )
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
    return Dinov2Config(**kwargs)


def _model_from_config(config) -> nn.Module:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    cls = Dinov2WithRegistersModel if getattr(config, "num_register_tokens", 0) else Dinov2Model
    return cls(config)


@dataclass(frozen=True)
class PosInterpolation:
    """How the official code resizes the position embeddings (``interpolate_offset``,
    ``interpolate_antialias`` of ``DinoVisionTransformer``)."""

    offset: float
    antialias: bool

    def describe(self) -> str:
        return (
            f"official DINOv2: bicubic, scale_factor (grid + {self.offset}) / 37, "
            f"antialias={self.antialias}"
        )


# The hub's settings: ``dinov2_vit*14`` and ``dinov2_vit*14_reg`` (backbones.py).
POS_NO_REGISTERS = PosInterpolation(offset=0.1, antialias=False)
POS_REGISTERS = PosInterpolation(offset=0.0, antialias=True)


def pos_interpolation(registers: int) -> PosInterpolation:
    return POS_REGISTERS if registers else POS_NO_REGISTERS


def official_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], how: PosInterpolation
) -> torch.Tensor:
    """The official ``interpolate_pos_encoding``: pos_embed (1, 1 + M * M, D) with the CLS
    position first -> (1, 1 + h0 * w0, D) for a grid of (h0, w0) patches, in float32."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ConfigError(f"position embeddings of {n} patches do not form a square grid")
    h0, w0 = grid
    if (h0, w0) == (m, m):  # the native grid: used as is (the official early return)
        return pos_embed.float()
    pos = pos_embed.float()
    dim = pos.shape[-1]
    patch = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    if how.offset:
        # A scale factor, not a size: with recompute_scale_factor unset, torch maps output
        # pixel i to input (i + 0.5) / scale - 0.5, so the offset shifts every sample.
        resize = {"scale_factor": ((h0 + how.offset) / m, (w0 + how.offset) / m)}
    else:
        resize = {"size": (h0, w0)}
    patch = F.interpolate(patch, mode="bicubic", antialias=how.antialias, **resize)
    if patch.shape[-2:] != (h0, w0):
        raise ConfigError(f"interpolated position grid {tuple(patch.shape[-2:])} != {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)  # (1, h0 w0, D)
    return torch.cat([pos[:, :1], patch], dim=1)


def _official_interpolate_pos_encoding(
    self: nn.Module, embeddings: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Drop-in for transformers' ``Dinov2*Embeddings.interpolate_pos_encoding(embeddings,
    height, width)`` (pixel sizes) that resizes as the official code does."""
    grid = (height // PATCH, width // PATCH)
    return official_pos_embed(self.position_embeddings, grid, self.pos_interpolation).to(
        embeddings.dtype
    )


def use_official_pos_interpolation(model: nn.Module) -> PosInterpolation:
    """Make a transformers DINOv2 model resize its position embeddings as the official code
    does for its kind (with or without registers). A bound method on the embeddings
    instance: ``copy.deepcopy`` and pickling rebind it to the copy."""
    emb = model.embeddings
    how = pos_interpolation(int(getattr(model.config, "num_register_tokens", 0) or 0))
    emb.pos_interpolation = how
    emb.interpolate_pos_encoding = types.MethodType(_official_interpolate_pos_encoding, emb)
    return how


def _attention_names(model: nn.Module) -> tuple[str, str, str, str]:
    """(q, k, v, out) parameter prefixes inside a block: transformers 5 vs 4 naming."""
    keys = model.state_dict().keys()
    if any(".attention.q_proj." in k for k in keys):
        return "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"
    return (
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
    )


def _block_map(model: nn.Module, swiglu: bool) -> list[tuple[str, str]]:
    """(official suffix, transformers suffix) pairs for one block, besides the fused qkv."""
    _, _, _, out = _attention_names(model)
    pairs = [
        ("norm1", "norm1"),
        ("attn.proj", out),
        ("ls1.gamma", "layer_scale1.lambda1"),
        ("norm2", "norm2"),
        ("ls2.gamma", "layer_scale2.lambda1"),
    ]
    if not swiglu:
        return [*pairs, ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    if _split_swiglu(model):  # w12 is split into gate / up by official_to_hf itself
        return [*pairs, ("mlp.w3", "mlp.down_proj")]
    return [*pairs, ("mlp.w12", "mlp.weights_in"), ("mlp.w3", "mlp.weights_out")]


def _split_swiglu(model: nn.Module) -> bool:
    """transformers >= 5 keeps SwiGLU's fused input layer (official ``w12``, whose output halves
    are the gate and the value) as two layers, ``gate_proj`` and ``up_proj``."""
    return any(".mlp.gate_proj." in k for k in model.state_dict())


def _is_swiglu(state: dict[str, torch.Tensor]) -> bool:
    return any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in state)


def _num_blocks(state: dict[str, torch.Tensor], pattern: str) -> int:
    """Transformer blocks in a state dict whose block keys match ``pattern`` (index group)."""
    return 1 + max(int(m.group(1)) for key in state if (m := re.match(pattern, key)))


def official_to_hf(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert an official DINOv2 state dict to ``model``'s (transformers) keys."""
    swiglu = any(".mlp.w12." in k for k in state)
    q, k, v, _ = _attention_names(model)
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    out["embeddings.mask_token"] = state.get("mask_token", torch.zeros_like(state["cls_token"][0]))
    if "register_tokens" in state:
        out["embeddings.register_tokens"] = state["register_tokens"]
    for i in range(_num_blocks(state, r"blocks\.(\d+)\.")):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for off, hf in _block_map(model, swiglu):
            for kind in ("weight", "bias", ""):
                key = f"{src}{off}.{kind}" if kind else f"{src}{off}"
                if key in state:
                    out[f"{dst}{hf}.{kind}" if kind else f"{dst}{hf}"] = state[key]
        for kind in ("weight", "bias"):
            qkv = state[f"{src}attn.qkv.{kind}"]
            for name, part in zip((q, k, v), qkv.chunk(3, dim=0), strict=True):
                out[f"{dst}{name}.{kind}"] = part
            if swiglu and _split_swiglu(model):
                gate, up = state[f"{src}mlp.w12.{kind}"].chunk(2, dim=0)
                out[f"{dst}mlp.gate_proj.{kind}"], out[f"{dst}mlp.up_proj.{kind}"] = gate, up
    return out


def hf_to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``official_to_hf`` (to export, and to test the loader)."""
    state = model.state_dict()
    swiglu = _is_swiglu(state)
    q, k, v, _ = _attention_names(model)
    out = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "mask_token": state["embeddings.mask_token"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    if "embeddings.register_tokens" in state:
        out["register_tokens"] = state["embeddings.register_tokens"]
    for i in range(_num_blocks(state, r"encoder\.layer\.(\d+)\.")):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for off, hf in _block_map(model, swiglu):
            for kind in ("weight", "bias", ""):
                key = f"{src}{hf}.{kind}" if kind else f"{src}{hf}"
                if key in state:
                    out[f"{dst}{off}.{kind}" if kind else f"{dst}{off}"] = state[key]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state[f"{src}{n}.{kind}"] for n in (q, k, v)])
            if swiglu and _split_swiglu(model):
                halves = [state[f"{src}mlp.{n}.{kind}"] for n in ("gate_proj", "up_proj")]
                out[f"{dst}mlp.w12.{kind}"] = torch.cat(halves)
    return out


def _arch_of(state: dict[str, torch.Tensor], path: str) -> tuple[str, int]:
    dim = int(state["cls_token"].shape[-1])
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    for name, size in SIZES.items():
        if size.dim == dim and len(blocks) == size.depth:
            return name, registers
    raise ConfigError(f"{path}: a DINOv2 checkpoint of width {dim} matches no ViT-S/B/L/g size")


FAMILY = "dinov2"
MODEL_TYPES = ("dinov2", "dinov2_with_registers")  # transformers' config.model_type


def is_official_state(state: dict[str, torch.Tensor]) -> bool:
    return "cls_token" in state and "pos_embed" in state


def load(
    spec: TeacherSpec, state: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, TeacherInfo]:
    """A DINOv2 of ``spec``: ``random:<size>`` (seeded) or an official checkpoint's
    ``state``; positions resized as the official code does."""
    if spec.kind == "random":
        size = spec.size or ""
        arch, registers = size.removesuffix("_reg"), 4 if size.endswith("_reg") else 0
        torch.manual_seed(0)  # the same random teacher everywhere
        model = _model_from_config(_config(arch, registers))
    else:
        state = state if state is not None else read_official_state(spec.source)
        arch, registers = _arch_of(state, spec.source)
        model = _model_from_config(_config(arch, registers))
        model.load_state_dict(official_to_hf(state, model), strict=True)
    return from_transformers(model, spec.source, arch, spec.kind == "random")


def from_transformers(
    model: nn.Module, source: str, arch: str | None = None, random_init: bool = False
) -> tuple[nn.Module, TeacherInfo]:
    """A transformers DINOv2 (built here, or a folder / hub id) with the official position
    interpolation, and its record; its size by width when not given."""
    if arch is None:
        dim = model.config.hidden_size
        arch = next((n for n, s in SIZES.items() if s.dim == dim), f"vit-{dim}")
    how = use_official_pos_interpolation(model)
    return model, model_info(model, source, arch, random_init, FAMILY, how.describe())
