"""What DINOv2 and DINOv3 share as transformers ViTs: the multi-layer features of chosen
blocks (the official ``get_intermediate_layers``), ImageNet preprocessing, the weights hash,
xformers attention, and ``ViTTeacher``, the ``Teacher`` both families are."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from hilda.errors import ConfigError
from hilda.store.teacher_record import Layers, TeacherInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_hash(model: nn.Module) -> str:
    """sha256 over the state dict (sorted keys, raw bytes), first 16 hex digits."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_info(
    model: nn.Module, source: str, arch: str, random_init: bool, family: str, positions: str
) -> TeacherInfo:
    """A loaded transformers ViT's record (eval mode and gradients off from here on)."""
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


class ViTTeacher:
    """A DINOv2 or DINOv3 model as a ``Teacher``: the chosen blocks' patch grids and CLS
    tokens of ImageNet-normalised images, in bf16 autocast on CUDA."""

    needs_class_maps = False

    def __init__(self, model: nn.Module, info: TeacherInfo, layers: Layers, norm: bool) -> None:
        self.info = info
        self.blocks = layers.blocks
        self.net = MultiLayerTeacher(model, list(layers.blocks), norm)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> ViTTeacher:
        self.net = self.net.to(device)
        self.device = device
        if device.type == "cuda":
            enable_xformers(self.net.model)
        return self

    def features(
        self, images: list[np.ndarray] | list[torch.Tensor], class_maps: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """images at the teacher's size -> patches (B, K, h, w, D), cls (B, K, D) float32."""
        del class_maps  # a ViT sees the images only
        batch = preprocess(images, self.device)
        on_cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            patches, cls = self.net(batch)  # (B, K, h, w, D), (B, K, D)
        return patches.float().cpu().numpy(), cls.float().cpu().numpy()
