"""The frozen camera teachers through ``transformers``: loading, multi-layer patch features and
CLS tokens. Two families, behind one interface (``build_teacher`` -> a model and its
``TeacherInfo``; ``MultiLayerTeacher``; ``preprocess``): DINOv2 (patch 14, learned position
embeddings) and DINOv3 (patch 16, RoPE, 4 storage tokens; ``hilda.models.dinov3``). The
pipeline, the cache and the trainer read the family, patch size and grid from ``TeacherInfo``
and the cache attributes and know nothing else family-specific.

Sources (``build_teacher``):
- ``random:vits14`` / ``random:vitb14`` / ... (``_reg`` suffix for 4 registers) and
  ``random:dinov3_vits16`` / ``..._vits16plus`` / ``_vitb16`` / ``_vitl16`` / ``_vith16plus``:
  a randomly initialised model of that size (seeded), for tests and the demo;
- an official facebookresearch checkpoint, ``dinov2_vit*14*_pretrain.pth`` or
  ``dinov3_vit*16*_pretrain_lvd1689m-*.pth`` (keys converted);
- a local directory saved by ``save_pretrained`` (either family);
- a Hugging Face id (``facebook/dinov2-base``, ``facebook/dinov3-vitb16-pretrain-lvd1689m``),
  when cached or online.

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
the loaded model's embeddings, so every source above gets the official resizing without a fork
of transformers.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hilda.errors import ConfigError


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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherInfo:
    model_id: str
    arch: str
    dim: int
    depth: int
    registers: int
    weights_hash: str
    random_init: bool
    pos_embed_interpolation: str  # how positions are encoded at the image size
    family: str = "dinov2"  # dinov2 | dinov3 | oracle
    patch_size: int = PATCH


DINOV3_ROPE = (
    "none: RoPE (official DINOv3: patch centres normalised per axis to [-1, 1], base 100, no "
    "coordinate augmentation at inference)"
)


FAMILY_LABELS = {"dinov2": "DINOv2", "dinov3": "DINOv3", "oracle": "oracle"}


def family_of(arch: str) -> str:
    """The teacher family of a stored ``arch`` name."""
    if arch.startswith("dinov3_"):
        return "dinov3"
    return "oracle" if arch == "oracle" else "dinov2"


def example_source(arch: str) -> str:
    """A teacher source of ``arch`` for messages (the randomly initialised one)."""
    return f"random:{arch}"


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


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict (sorted keys, raw bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- official checkpoint keys <-> transformers keys -------------------------------------------


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


def _dinov3_source(source: str) -> bool:
    return source.startswith("random:dinov3_")


def _build_dinov3(
    source: str, state: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, TeacherInfo]:
    """A DINOv3 teacher from ``random:dinov3_*`` or an official checkpoint's ``state``."""
    from hilda.models import dinov3

    random_init = source.startswith("random:")
    if random_init:
        arch = source.split(":", 1)[1]
        if arch not in dinov3.SIZES:
            raise ConfigError(
                f"unknown teacher size {arch!r} in {source!r}; use one of {sorted(dinov3.SIZES)}"
            )
        torch.manual_seed(0)  # the same random teacher everywhere
        model = dinov3.build(arch)
    else:
        assert state is not None
        arch = dinov3.arch_of(state, source)
        model = dinov3.build(arch)
        model.load_state_dict(dinov3.official_to_hf(state, model, source), strict=True)
    return model, _info(model, source, arch, random_init, "dinov3", DINOV3_ROPE)


def _read_state(source: str) -> dict[str, torch.Tensor]:
    """An official checkpoint's state dict (either family), or a clear error naming it."""
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


def _info(
    model: nn.Module, source: str, arch: str, random_init: bool, family: str, positions: str
) -> TeacherInfo:
    model.eval().requires_grad_(False)
    config = model.config
    return TeacherInfo(
        model_id=source,
        arch=arch,
        dim=int(config.hidden_size),
        depth=int(config.num_hidden_layers),
        registers=int(getattr(config, "num_register_tokens", 0) or 0),
        weights_hash=weights_hash(model),
        random_init=random_init,
        pos_embed_interpolation=positions,
        family=family,
        patch_size=int(config.patch_size),
    )


def build_teacher(source: str) -> tuple[nn.Module, TeacherInfo]:
    """Load the teacher named by ``source`` (see module doc); eval mode, gradients off."""
    from hilda.models import dinov3

    state = _read_state(source) if source.endswith((".pth", ".pt")) else None
    if _dinov3_source(source) or (state is not None and dinov3.is_official_state(state)):
        return _build_dinov3(source, state)
    random_init = source.startswith("random:")
    if random_init:
        arch = source.split(":", 1)[1]
        registers = 4 if arch.endswith("_reg") else 0
        arch = arch.removesuffix("_reg")
        if arch not in SIZES:
            raise ConfigError(
                f"unknown teacher size {arch!r} in {source!r}; use one of {sorted(SIZES)}"
            )
        torch.manual_seed(0)  # the same random teacher everywhere
        model = _model_from_config(_config(arch, registers))
    elif state is not None:
        arch, registers = _arch_of(state, source)
        model = _model_from_config(_config(arch, registers))
        model.load_state_dict(official_to_hf(state, model), strict=True)
    else:
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(source)
            model = AutoModel.from_pretrained(source, config=config)
        except OSError as exc:
            raise ConfigError(
                f"cannot load teacher {source!r}: {exc}. Without network access pass a local "
                "directory, an official dinov2_*_pretrain.pth file, or random:vits14"
            ) from None
        if getattr(model.config, "model_type", "") == "dinov3_vit":
            return _hf_dinov3(model, source)
        dim = model.config.hidden_size
        arch = next((n for n, s in SIZES.items() if s.dim == dim), f"vit-{dim}")
    model.eval().requires_grad_(False)
    how = use_official_pos_interpolation(model)
    return model, _info(model, source, arch, random_init, "dinov2", how.describe())


def _hf_dinov3(model: nn.Module, source: str) -> tuple[nn.Module, TeacherInfo]:
    """A DINOv3 model loaded by transformers (a folder or a hub id): its size by shape."""
    from hilda.models import dinov3

    c = model.config
    if c.use_gated_mlp and c.hidden_act != "silu":
        raise ConfigError(
            f"teacher {source}: a SwiGLU DINOv3 whose config gates with {c.hidden_act!r}; the "
            "official model gates with SiLU (set hidden_act to silu in its config.json)"
        )
    shape = (int(c.hidden_size), int(c.num_hidden_layers), bool(c.use_gated_mlp))
    arch = next(
        (n for n, s in dinov3.SIZES.items() if (s.dim, s.depth, s.swiglu) == shape),
        f"dinov3_vit-{c.hidden_size}",
    )
    return model, _info(model, source, arch, False, "dinov3", DINOV3_ROPE)


def parse_layers(spec: str, depth: int) -> list[int]:
    """``lastK`` or comma-separated block indices (negative counts from the end) -> sorted
    0-based block indices."""
    spec = spec.strip()
    if m := re.fullmatch(r"last(\d+)", spec):
        k = int(m.group(1))
        if not 1 <= k <= depth:
            raise ConfigError(f"--layers {spec}: the teacher has {depth} blocks")
        return list(range(depth - k, depth))
    try:
        blocks = sorted(
            {int(x) % depth if -depth <= int(x) < depth else int(x) for x in spec.split(",")}
        )
    except ValueError:
        raise ConfigError(
            f"--layers must be lastK or block indices like 10,11; got {spec!r}"
        ) from None
    if any(not 0 <= b < depth for b in blocks):
        raise ConfigError(f"--layers {spec}: block indices must be in [0, {depth})")
    return blocks


class MultiLayerTeacher(nn.Module):
    """Patch-grid features and CLS tokens of selected blocks of a DINOv2 or DINOv3 model: the
    official ``get_intermediate_layers(n=blocks, reshape=True, return_class_token=True,
    norm=norm)``."""

    def __init__(self, model: nn.Module, blocks: list[int], norm: bool = True) -> None:
        super().__init__()
        self.model = model
        self.blocks = blocks
        self.norm = norm
        self.patch = int(model.config.patch_size)
        # CLS, then the registers (DINOv2) or storage tokens (DINOv3), then the patches.
        self.skip = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        # The final norm: ``layernorm`` in transformers' DINOv2, ``norm`` in its DINOv3.
        self.final_norm = model.layernorm if hasattr(model, "layernorm") else model.norm

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), H and W multiples of the patch size ->
        patches (B, K, h, w, D) and cls (B, K, D)."""
        b, _, height, width = images.shape
        if height % self.patch or width % self.patch:
            raise ConfigError(f"image size {width}x{height} must be a multiple of {self.patch}")
        out = self.model(pixel_values=images, output_hidden_states=True)
        # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
        tokens = torch.stack([out.hidden_states[i + 1] for i in self.blocks], dim=1)  # (B, K, N, D)
        if self.norm:
            tokens = self.final_norm(tokens)
        h, w = height // self.patch, width // self.patch
        patches = tokens[:, :, self.skip :].reshape(b, len(self.blocks), h, w, -1)
        return patches, tokens[:, :, 0]


def preprocess(
    images: list[np.ndarray] | list[torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Images already at the target size, (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors
    (e.g. decoded on the GPU) -> (B, 3, H, W) ImageNet-normalised on ``device``."""
    if isinstance(images[0], torch.Tensor):
        x = torch.stack(images).to(device).float() / 255.0
    else:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def enable_xformers(model: nn.Module) -> bool:
    """On CUDA, route attention through xformers' memory-efficient kernel (registered with
    transformers' attention interface). Returns False (SDPA stays) when xformers is absent or
    cannot load its CUDA ops."""
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops
        from transformers import AttentionInterface
    except ImportError:
        return False

    def xformers_attention(
        module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_
    ):
        # transformers passes (B, heads, N, Dh); xformers wants (B, N, heads, Dh) and returns it.
        out = xops.memory_efficient_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_bias=None,
            p=dropout if module.training else 0.0,
            scale=scaling,
        )
        return out.contiguous(), None

    AttentionInterface.register("xformers", xformers_attention)
    try:
        model.set_attn_implementation("xformers")
    except (ValueError, AttributeError):
        model.config._attn_implementation = "xformers"
    return True
