"""The DINOv3 ViT teachers (facebookresearch/dinov3, LVD-1689M) through transformers'
``DINOv3ViTModel``: sizes, configs and the official checkpoint keys.

Every hub backbone (``dinov3/hub/backbones.py``) is a ``DinoVisionTransformer`` with patch 16,
4 storage ("register") tokens after the CLS token, axial RoPE (base 100, coordinates of the
patch centres normalised per axis to [-1, 1]: ``normalize_coords="separate"``; the shift,
jitter and rescale augmentations of the coordinates act in training only), LayerScale
initialised at 1e-5, LayerNorm with eps 1e-5 (``layernormbf16``), a qkv bias whose key part is
masked to zero (``mask_k_bias``), and an MLP (S, B, L) or SwiGLU (S+, H+) feed-forward whose
hidden width is ``int(dim x ratio x 2/3)`` rounded up to a multiple of 8.

What the official ``get_intermediate_layers(x, n=blocks, reshape=True,
return_class_token=True, norm=True)`` computes, and how the loaded transformers model is held
to it (checked against an independent implementation of those formulas in
``tests/test_teacher_dinov3.py``):

- token order [CLS, 4 storage, patches (row-major)]: transformers' order too;
- RoPE on the patch tokens' queries and keys only, periods ``base ** (4 i / D_head)``, angles
  ``2 pi x coord / period`` for y then x, tiled twice (``rotate_half`` pairing): transformers'
  ``inv_freq`` and ``get_patches_center_coordinates`` are the same numbers, and the teacher
  runs in eval mode, where transformers applies no coordinate augmentation;
- the masked key bias: transformers has no key bias (``key_bias=False``); the converter
  refuses a checkpoint whose key bias is not masked or zero, instead of dropping it silently;
- ``rope_embed.periods`` of a checkpoint must equal the periods of the config (a checkpoint of
  another RoPE parametrisation is refused);
- the SwiGLU sizes (S+, H+) gate with SiLU (``w3(silu(w1 x) * w2 x)``): transformers gates with
  ``hidden_act``, whose default is GELU, so the config sets ``silu`` (a loaded config that does
  not is refused);
- the final norm of every selected block's output: the ``norm`` LayerNorm, applied by
  ``MultiLayerTeacher`` (transformers' ``last_hidden_state`` is normed only for the last
  block).

The 7B model (no qkv bias, SwiGLU aligned to 64, untied CLS norms) and the SAT-493M ViT-L
(untied local CLS norm, used only in training) are not supported sources here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from hilda.errors import ConfigError
from hilda.store.teacher_record import TeacherInfo
from hilda.teachers.spec import TeacherSpec, read_official_state
from hilda.teachers.vit import model_info

PATCH = 16
STORAGE_TOKENS = 4
ROPE_BASE = 100.0
LAYERSCALE_INIT = 1e-5
NORM_EPS = 1e-5  # layernormbf16


@dataclass(frozen=True)
class DinoV3Size:
    """One hub ViT (``dinov3/hub/backbones.py``)."""

    dim: int
    depth: int
    heads: int
    ffn_ratio: float
    swiglu: bool

    @property
    def hidden(self) -> int:
        """The feed-forward's hidden width: ``dim x ratio``, for SwiGLU x 2/3 rounded up to 8
        (``SwiGLUFFN(align_to=8)``)."""
        width = int(self.dim * self.ffn_ratio)
        if not self.swiglu:
            return width
        d = int(width * 2 / 3)
        return d + (-d % 8)


SIZES: dict[str, DinoV3Size] = {
    "dinov3_vits16": DinoV3Size(dim=384, depth=12, heads=6, ffn_ratio=4, swiglu=False),
    "dinov3_vits16plus": DinoV3Size(dim=384, depth=12, heads=6, ffn_ratio=6, swiglu=True),
    "dinov3_vitb16": DinoV3Size(dim=768, depth=12, heads=12, ffn_ratio=4, swiglu=False),
    "dinov3_vitl16": DinoV3Size(dim=1024, depth=24, heads=16, ffn_ratio=4, swiglu=False),
    "dinov3_vith16plus": DinoV3Size(dim=1280, depth=32, heads=20, ffn_ratio=6, swiglu=True),
}


def config(arch: str):
    """transformers' ``DINOv3ViTConfig`` of a hub size."""
    from transformers import DINOv3ViTConfig

    if arch not in SIZES:
        raise ConfigError(f"unknown DINOv3 size {arch!r}; use one of {sorted(SIZES)}")
    size = SIZES[arch]
    return DINOv3ViTConfig(
        patch_size=PATCH,
        hidden_size=size.dim,
        intermediate_size=size.hidden,
        num_hidden_layers=size.depth,
        num_attention_heads=size.heads,
        num_register_tokens=STORAGE_TOKENS,
        rope_theta=ROPE_BASE,
        layerscale_value=LAYERSCALE_INIT,
        layer_norm_eps=NORM_EPS,
        query_bias=True,
        key_bias=False,  # the official key bias is masked to zero
        value_bias=True,
        proj_bias=True,
        mlp_bias=True,
        use_gated_mlp=size.swiglu,
        # The official MLP is exact GELU, its SwiGLU gates with SiLU; transformers gates with
        # ``hidden_act`` (default gelu), so it must be set.
        hidden_act="silu" if size.swiglu else "gelu",
        image_size=224,
    )


def build(arch: str) -> nn.Module:
    from transformers import DINOv3ViTModel

    return DINOv3ViTModel(config(arch))


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """(D_head / 4,) the official ``RopePositionEmbedding`` periods: base ** (2 i / (D/2))."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def is_official_state(state: dict[str, torch.Tensor]) -> bool:
    """An official DINOv3 ViT state dict (storage tokens and RoPE periods)."""
    return "storage_tokens" in state or "rope_embed.periods" in state


def arch_of(state: dict[str, torch.Tensor], path: str) -> str:
    """The hub size of an official state dict, from its width, depth and feed-forward."""
    dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    swiglu = "blocks.0.mlp.w1.weight" in state
    for name, size in SIZES.items():
        if (size.dim, size.depth, size.swiglu) == (dim, depth, swiglu):
            return name
    raise ConfigError(
        f"{path}: a DINOv3 checkpoint of width {dim}, depth {depth} "
        f"({'SwiGLU' if swiglu else 'MLP'}) matches no supported size ({', '.join(SIZES)})"
    )


def _block_pairs(swiglu: bool) -> list[tuple[str, str]]:
    """(official suffix, transformers suffix) of one block, besides the fused qkv."""
    pairs = [
        ("norm1", "norm1"),
        ("attn.proj", "attention.o_proj"),
        ("ls1.gamma", "layer_scale1.lambda1"),
        ("norm2", "norm2"),
        ("ls2.gamma", "layer_scale2.lambda1"),
    ]
    if swiglu:  # w3(silu(w1 x) * w2 x) = down(silu(gate x) * up x)
        return [
            *pairs,
            ("mlp.w1", "mlp.gate_proj"),
            ("mlp.w2", "mlp.up_proj"),
            ("mlp.w3", "mlp.down_proj"),
        ]
    return [*pairs, ("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj")]


def official_to_hf(
    state: dict[str, torch.Tensor], model: nn.Module, path: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """An official DINOv3 ViT state dict in ``model``'s (transformers) keys; refuses what
    the transformers model would compute differently (a key bias that is not masked, RoPE
    periods of another parametrisation)."""
    cfg = model.config
    swiglu = bool(cfg.use_gated_mlp)
    dim = int(cfg.hidden_size)
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state.get("mask_token", torch.zeros(1, dim)).reshape(1, 1, dim),
        "embeddings.register_tokens": state["storage_tokens"],
        "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    if "rope_embed.periods" in state:
        expected = rope_periods(dim // int(cfg.num_attention_heads), float(cfg.rope_theta))
        if not torch.allclose(state["rope_embed.periods"].float(), expected, rtol=1e-6):
            raise ConfigError(
                f"{path}: its RoPE periods are not base-{cfg.rope_theta:g} periods; only the "
                "hub models' parametrisation is supported"
            )
    for i in range(int(cfg.num_hidden_layers)):
        src, dst = f"blocks.{i}.", f"model.layer.{i}."
        for off, hf in _block_pairs(swiglu):
            if off.endswith("gamma"):  # LayerScale: a bare parameter
                out[f"{dst}{hf}"] = state[f"{src}{off}"]
                continue
            for kind in ("weight", "bias"):
                out[f"{dst}{hf}.{kind}"] = state[f"{src}{off}.{kind}"]
        q, k, v = state[f"{src}attn.qkv.weight"].chunk(3, dim=0)
        out[f"{dst}attention.q_proj.weight"] = q
        out[f"{dst}attention.k_proj.weight"] = k
        out[f"{dst}attention.v_proj.weight"] = v
        bias = state[f"{src}attn.qkv.bias"]
        mask = state.get(f"{src}attn.qkv.bias_mask")
        if mask is not None:
            bias = bias * mask.to(bias.dtype)
        qb, kb, vb = bias.chunk(3, dim=0)
        if kb.abs().max() > 0:
            raise ConfigError(
                f"{path}: block {i} has a non-zero key bias; the hub models mask it "
                "(mask_k_bias) and transformers' DINOv3 has none"
            )
        out[f"{dst}attention.q_proj.bias"] = qb
        out[f"{dst}attention.v_proj.bias"] = vb
    return out


def hf_to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``official_to_hf``: the hub's keys, the masked key bias as zeros with its
    ``bias_mask``, and the RoPE periods (to export, and to test the loader)."""
    state = model.state_dict()
    cfg = model.config
    dim = int(cfg.hidden_size)
    out: dict[str, torch.Tensor] = {
        "cls_token": state["embeddings.cls_token"],
        "storage_tokens": state["embeddings.register_tokens"],
        "mask_token": state["embeddings.mask_token"].reshape(1, dim),
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": rope_periods(dim // int(cfg.num_attention_heads), cfg.rope_theta),
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for i in range(int(cfg.num_hidden_layers)):
        src, dst = f"model.layer.{i}.", f"blocks.{i}."
        for off, hf in _block_pairs(bool(cfg.use_gated_mlp)):
            if off.endswith("gamma"):
                out[f"{dst}{off}"] = state[f"{src}{hf}"]
                continue
            for kind in ("weight", "bias"):
                out[f"{dst}{off}.{kind}"] = state[f"{src}{hf}.{kind}"]
        a = f"{src}attention."
        out[f"{dst}attn.qkv.weight"] = torch.cat(
            [state[f"{a}{n}_proj.weight"] for n in ("q", "k", "v")]
        )
        qb, vb = state[f"{a}q_proj.bias"], state[f"{a}v_proj.bias"]
        out[f"{dst}attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])
        mask = torch.ones(3 * dim, dtype=qb.dtype)
        mask[dim : 2 * dim] = 0
        out[f"{dst}attn.qkv.bias_mask"] = mask
    return out


FAMILY = "dinov3"
MODEL_TYPES = ("dinov3_vit",)  # transformers' config.model_type
ROPE = (
    "none: RoPE (official DINOv3: patch centres normalised per axis to [-1, 1], base 100, no "
    "coordinate augmentation at inference)"
)


def load(
    spec: TeacherSpec, state: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, TeacherInfo]:
    """A DINOv3 of ``spec``: ``random:<size>`` (seeded) or an official checkpoint's
    ``state``."""
    if spec.kind == "random":
        arch = spec.size or ""
        torch.manual_seed(0)  # the same random teacher everywhere
        model = build(arch)
    else:
        state = state if state is not None else read_official_state(spec.source)
        arch = arch_of(state, spec.source)
        model = build(arch)
        model.load_state_dict(official_to_hf(state, model, spec.source), strict=True)
    return model, model_info(model, spec.source, arch, spec.kind == "random", FAMILY, ROPE)


def from_transformers(model: nn.Module, source: str) -> tuple[nn.Module, TeacherInfo]:
    """A DINOv3 loaded by transformers (a folder or a hub id): its size by shape."""
    c = model.config
    if c.use_gated_mlp and c.hidden_act != "silu":
        raise ConfigError(
            f"teacher {source}: a SwiGLU DINOv3 whose config gates with {c.hidden_act!r}; the "
            "official model gates with SiLU (set hidden_act to silu in its config.json)"
        )
    shape = (int(c.hidden_size), int(c.num_hidden_layers), bool(c.use_gated_mlp))
    arch = next(
        (n for n, s in SIZES.items() if (s.dim, s.depth, s.swiglu) == shape),
        f"dinov3_vit-{c.hidden_size}",
    )
    return model, model_info(model, source, arch, False, FAMILY, ROPE)
