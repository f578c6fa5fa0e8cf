"""The DINOv3 teachers: features equal to the official ``get_intermediate_layers(norm=True)``,
official checkpoints (keys converted both ways, exactly), the cache recording the family and
patch size, the trainer taking a DINOv3 cache and refusing a cache of another family.

The reference is written here from the formulas of facebookresearch/dinov3
(``models/vision_transformer.py``, ``layers/rope_position_encoding.py``, ``layers/block.py``,
``layers/attention.py``, ``layers/ffn_layers.py``): patch embedding, [CLS, 4 storage, patches],
axial RoPE on the patch tokens' queries and keys (patch centres normalised per axis to
[-1, 1], periods ``100 ** (2 i / (D_head / 2))``, ``rotate_half`` pairing), pre-norm blocks
with LayerScale, the final LayerNorm on every selected block's output. It shares no code with
transformers or hilda's loader.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import zarr
from typer.testing import CliRunner

from hilda.cli.prep import app as prep_app
from hilda.datasets.synthetic.generate import SyntheticConfig
from hilda.errors import ConfigError
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher
from hilda.teachers import MultiLayerTeacher, build_teacher, dinov3, parse_layers
from tests.pipeline_helpers import build_cache

EPS = 1e-5  # layernormbf16


def layer_norm(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], EPS)


def rope_sin_cos(
    h: int, w: int, head_dim: int, swap: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h w, D_head) sin and cos of the official RoPE at inference (``swap``: x before y,
    a wrong variant that shows the comparison can fail)."""
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    coords = 2.0 * coords - 1.0  # (h w, 2) in [-1, 1]
    if swap:
        coords = coords.flip(-1)
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (h w, 2, D/4)
    angles = angles.flatten(1).tile(2)  # (h w, D)
    return torch.sin(angles).float(), torch.cos(angles).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def reference(
    state: dict, images: torch.Tensor, heads: int, blocks: list[int], swap: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official DINOv3: (B, K, h, w, D) normed patch tokens and (B, K, D) CLS tokens."""
    b = images.shape[0]
    weight = state["patch_embed.proj.weight"]
    dim, patch = weight.shape[0], weight.shape[-1]
    x = F.conv2d(images, weight, state["patch_embed.proj.bias"], stride=patch)  # (B, D, h, w)
    h, w = x.shape[-2:]
    x = x.permute(0, 2, 3, 1).reshape(b, h * w, dim)
    cls = state["cls_token"] + 0 * state["mask_token"]
    storage = state["storage_tokens"]
    x = torch.cat([cls.expand(b, -1, -1), storage.expand(b, -1, -1), x], dim=1)
    prefix = 1 + storage.shape[1]
    head_dim = dim // heads
    sin, cos = rope_sin_cos(h, w, head_dim, swap)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    outputs = []
    for i in range(depth):
        p = f"blocks.{i}."
        y = layer_norm(x, state, f"{p}norm1")
        bias = state[f"{p}attn.qkv.bias"] * state[f"{p}attn.qkv.bias_mask"]
        qkv = (y @ state[f"{p}attn.qkv.weight"].T + bias).reshape(b, -1, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D_head)
        q = torch.cat(
            [q[:, :, :prefix], q[:, :, prefix:] * cos + rotate_half(q[:, :, prefix:]) * sin], 2
        )
        k = torch.cat(
            [k[:, :, :prefix], k[:, :, prefix:] * cos + rotate_half(k[:, :, prefix:]) * sin], 2
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, dim)
        out = out @ state[f"{p}attn.proj.weight"].T + state[f"{p}attn.proj.bias"]
        x = x + state[f"{p}ls1.gamma"] * out
        y = layer_norm(x, state, f"{p}norm2")
        if f"{p}mlp.w1.weight" in state:  # SwiGLU: w3(silu(w1 y) * w2 y)
            a = y @ state[f"{p}mlp.w1.weight"].T + state[f"{p}mlp.w1.bias"]
            g = y @ state[f"{p}mlp.w2.weight"].T + state[f"{p}mlp.w2.bias"]
            y = (F.silu(a) * g) @ state[f"{p}mlp.w3.weight"].T + state[f"{p}mlp.w3.bias"]
        else:
            y = F.gelu(y @ state[f"{p}mlp.fc1.weight"].T + state[f"{p}mlp.fc1.bias"])
            y = y @ state[f"{p}mlp.fc2.weight"].T + state[f"{p}mlp.fc2.bias"]
        x = x + state[f"{p}ls2.gamma"] * y
        if i in blocks:
            outputs.append(layer_norm(x, state, "norm"))
    out = torch.stack(outputs, dim=1)  # (B, K, N, D)
    return out[:, :, prefix:].reshape(b, len(blocks), h, w, dim), out[:, :, 0]


def randomised(arch: str, seed: int = 0) -> torch.nn.Module:
    """A DINOv3 model with non-trivial weights everywhere: LayerScale of order 1 (the hub's
    init of 1e-5 would hide the blocks), random norms and biases, queries and keys large
    enough for peaked attention (where RoPE's positions change the features)."""
    torch.manual_seed(seed)
    model = dinov3.build(arch).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            elif name.endswith("bias") or "token" in name:
                p.normal_(0.0, 0.1)
            elif "q_proj" in name or "k_proj" in name:  # peaked attention: positions matter
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.02)
    return model.requires_grad_(False)


def images(seed: int = 1) -> torch.Tensor:
    """Two normalised images at 224 x 448 (H x W): a 14 x 28 patch grid."""
    return torch.randn(2, 3, 224, 448, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["dinov3_vits16", "dinov3_vits16plus"])
def test_features_equal_the_official_formulas(arch: str) -> None:
    model = randomised(arch)
    size = dinov3.SIZES[arch]
    blocks = list(range(size.depth))
    x = images()
    patches, cls = MultiLayerTeacher(model, blocks)(x)  # (B, K, h, w, D), (B, K, D)
    assert patches.shape == (2, size.depth, 14, 28, size.dim)
    ref_patches, ref_cls = reference(dinov3.hf_to_official(model), x, size.heads, blocks)
    for got, want in ((patches, ref_patches), (cls, ref_cls)):
        cos = F.cosine_similarity(got, want, dim=-1)
        assert float(cos.min()) >= 0.99999, float(cos.min())
        assert float((got - want).abs().max()) <= 1e-4, float((got - want).abs().max())
    # The comparison can fail: RoPE with the axes swapped gives features far below the bound.
    wrong, _ = reference(dinov3.hf_to_official(model), x, size.heads, blocks[-1:], swap=True)
    cos = F.cosine_similarity(patches[:, -1:], wrong, dim=-1)
    assert float(cos.min()) < 0.9999, float(cos.min())


def test_official_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    model = randomised("dinov3_vitb16", seed=2)
    official = dinov3.hf_to_official(model)
    path = tmp_path / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    torch.save(official, path)
    loaded, info = build_teacher(str(path))
    assert (info.family, info.arch, info.patch_size, info.registers) == (
        "dinov3",
        "dinov3_vitb16",
        16,
        4,
    )
    again = dinov3.hf_to_official(loaded)
    assert again.keys() == official.keys()
    assert all(torch.equal(again[k], official[k]) for k in official)
    x = images(3)[:, :, :64, :128]
    a = MultiLayerTeacher(model, parse_layers("last2", 12))(x)
    b = MultiLayerTeacher(loaded, parse_layers("last2", 12))(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_checkpoints_transformers_would_read_differently_are_refused(tmp_path: Path) -> None:
    official = dinov3.hf_to_official(randomised("dinov3_vits16"))
    bad = dict(official)
    bad["blocks.3.attn.qkv.bias_mask"] = torch.ones_like(official["blocks.3.attn.qkv.bias_mask"])
    bad["blocks.3.attn.qkv.bias"] = official["blocks.3.attn.qkv.bias"] + 0.5
    torch.save(bad, tmp_path / "kbias.pth")
    with pytest.raises(ConfigError, match="block 3 has a non-zero key bias"):
        build_teacher(str(tmp_path / "kbias.pth"))
    bad = dict(official)
    bad["rope_embed.periods"] = official["rope_embed.periods"] * 2
    torch.save(bad, tmp_path / "periods.pth")
    with pytest.raises(ConfigError, match="RoPE periods"):
        build_teacher(str(tmp_path / "periods.pth"))


def test_a_saved_pretrained_folder_loads_as_dinov3(tmp_path: Path) -> None:
    model = randomised("dinov3_vits16", seed=4)
    model.save_pretrained(tmp_path / "folder")
    loaded, info = build_teacher(str(tmp_path / "folder"))
    assert (info.family, info.arch, info.patch_size) == ("dinov3", "dinov3_vits16", 16)
    x = images(5)[:, :, :32, :64]
    a = MultiLayerTeacher(model, [10, 11])(x)
    b = MultiLayerTeacher(loaded, [10, 11])(x)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b, strict=True))


def test_extract_teacher_records_the_family_and_grid(
    nusc_cfg: SyntheticConfig, tmp_path: Path
) -> None:
    store = str(tmp_path / "cache.zarr")
    build_cache(nusc_cfg.out, store, stages=("index",))
    with pytest.raises(ConfigError, match="multiples of the teacher's patch size 16"):
        run_teacher(
            TeacherConfig(store=store, teacher="random:dinov3_vits16", image_size=(112, 56)),
            StageOptions(),
        )
    cfg = TeacherConfig(
        store=store, teacher="random:dinov3_vits16", image_size=(128, 64), name="d3"
    )
    run_teacher(cfg, StageOptions())
    group = zarr.open_group(store, mode="r")["teacher/d3"]
    attrs = dict(group.attrs)
    assert (attrs["family"], attrs["patch_size"], attrs["grid"]) == ("dinov3", 16, [4, 8])
    assert group["layer_11"].shape[2:] == (4, 8, 384)
    result = CliRunner().invoke(prep_app, ["info", "--store", store])
    assert result.exit_code == 0 and "dinov3" in result.output


def test_a_cache_of_another_family_is_refused_with_the_command_that_fills_it(
    train_store: str, tmp_path: Path
) -> None:
    from hilda.cli.train import app

    store = tmp_path / "dinov2_only.zarr"
    shutil.copytree(train_store, store)
    root = zarr.open_group(str(store), mode="r+")
    for name in ("dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"):
        del root[f"teacher/{name}"]
    result = CliRunner().invoke(app, ["check", "--config", "dinov3_vits16", "--store", str(store)])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "a DINOv3 dinov3_vits16 teacher" in text and "random:dinov3_vits16" in text
    assert "hilda-prep extract-teacher" in text


def test_a_dinov3_cache_trains_the_tiny_preset_and_the_backbone_evaluates(
    train_store: str, nusc_cfg: SyntheticConfig, tmp_path: Path
) -> None:
    from hilda.engine.config_io import load_config
    from hilda.eval.config import SegConfig
    from hilda.eval.probe import run_segmentation
    from hilda.train.config import TrainConfig
    from hilda.train.loop import train
    from tests.train_helpers import SMALL

    sets = [*SMALL, "data.teacher=dinov3_vits16", "optim.max_steps=2"]
    cfg = load_config(TrainConfig, "tiny_cpu", sets)
    result = train(cfg, train_store, tmp_path / "run")
    assert result.steps == 2 and result.backbone is not None
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["teacher"] == "dinov3_vits16", run["teacher"]
    seg = load_config(
        SegConfig,
        None,
        [
            "data.dataset=synthetic",
            f"data.root={nusc_cfg.out}",
            "data.num_workers=0",
            "optim.epochs=1",
            "device=cpu",
        ],
    )
    probe = run_segmentation(seg, result.backbone, out=tmp_path / "lp.json")
    assert 0.0 <= probe["miou"] <= 1.0 and probe["steps"] >= 1
