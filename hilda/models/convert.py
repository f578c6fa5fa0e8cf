"""Weight conversion between the MinkowskiEngine and spconv layouts of either student, the
backbone checkpoint format, and the export of a PTv3 student for Pointcept.

Both backends build the same modules under the same names (``hilda.models.student``,
``hilda.models.ptv3``); only the convolution tensors differ:

- MinkowskiEngine: ``<name>.kernel`` (K^3, in, out), or (in, out) for K = 1; bias (1, out).
  Kernel offset (i, j, k) (x, y, z, each 0..K-1) is row i + K j + K^2 k.
- spconv: ``<name>.weight`` (out, K, K, K, in) indexed [out, i, j, k, in]; bias (out,).
  Except for K = 1: spconv 2.3 computes a 1x1 convolution as ``features @ weight.view(in,
  out)`` (``spconv/pytorch/conv.py``, the ``conv1x1`` branch), reading the memory of its
  (out, 1, 1, 1, in) tensor as (in, out); the converter follows what the library computes
  (checked by the backend-equivalence test, which fails if a release changes it).

The MinkowskiEngine layout is Pointcept's ``MinkUNet34C`` layout, so converting an spconv
checkpoint to it gives a Pointcept-loadable backbone. Pointcept's ``PointTransformerV3`` is
built on spconv, so a PTv3 student is exported in the spconv layout (``pointcept_state``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hilda.atomic import atomic_write
from hilda.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def _me_kernel_to_spconv(kernel: torch.Tensor) -> torch.Tensor:
    if kernel.ndim == 2:  # K = 1: see the module note on spconv's 1x1 path
        return kernel.contiguous().reshape(kernel.shape[1], 1, 1, 1, kernel.shape[0])
    volume, cin, cout = kernel.shape
    k = round(volume ** (1 / 3))
    if k**3 != volume:
        raise ConfigError(f"kernel volume {volume} is not a cube")
    # row = i + K j + K^2 k  ->  view [k, j, i] -> permute to [out, i, j, k, in]
    return kernel.reshape(k, k, k, cin, cout).permute(4, 2, 1, 0, 3).contiguous()


def _spconv_weight_to_me(weight: torch.Tensor) -> torch.Tensor:
    cout, k, _, _, cin = weight.shape
    if k == 1:
        return weight.contiguous().reshape(cin, cout)
    return weight.permute(3, 2, 1, 4, 0).reshape(k**3, cin, cout).contiguous()


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def minkowski_to_spconv(state: Tensors) -> Tensors:
    convs = {_module_of(n) for n in state if n.endswith(".kernel")}
    out: Tensors = {}
    for name, value in state.items():
        if name.endswith(".kernel"):
            out[name[: -len("kernel")] + "weight"] = _me_kernel_to_spconv(value)
        elif name.endswith(".bias") and _module_of(name) in convs:  # (1, out) -> (out,)
            out[name] = value.reshape(-1).clone()
        else:
            out[name] = value.clone()
    return out


def spconv_to_minkowski(state: Tensors) -> Tensors:
    convs = {_module_of(n) for n, v in state.items() if n.endswith(".weight") and v.ndim == 5}
    out: Tensors = {}
    for name, value in state.items():
        if name.endswith(".weight") and value.ndim == 5:
            out[name[: -len("weight")] + "kernel"] = _spconv_weight_to_me(value)
        elif name.endswith(".bias") and _module_of(name) in convs:  # (out,) -> (1, out)
            out[name] = value.reshape(1, -1).clone()
        else:
            out[name] = value.clone()
    return out


def detect_layout(state: Tensors) -> str:
    """ "minkowski" or "spconv", from the tensor names and shapes of a student state dict."""
    if any(name.endswith(".kernel") for name in state):
        return "minkowski"
    if any(name.endswith(".weight") and v.ndim == 5 for name, v in state.items()):
        return "spconv"
    raise ConfigError("not a student state dict: no MinkowskiEngine kernels or spconv weights")


def convert_state(state: Tensors, backend: str) -> Tensors:
    """A student state dict in whichever layout, converted to ``backend``'s."""
    layout = detect_layout(state)
    if layout == backend:
        return dict(state)
    if backend == "spconv":
        return minkowski_to_spconv(state)
    if backend == "minkowski":
        return spconv_to_minkowski(state)
    raise ConfigError(f"unknown backend {backend!r}")


BACKBONE_FORMAT = "hilda-backbone"
BACKBONE_VERSION = 1
ARCH_NAMES = {"minkunet34": "MinkUNet34C", "ptv3": "PT-v3m1"}  # as Pointcept names them
_PREFIXES = ("module.", "backbone.", "student.")


def _record(model, voxel) -> dict:
    """What rebuilding and feeding a student needs, beside its weights in every export: the
    architecture and its config (input channels included), and the voxelisation (voxel size
    and intensity scale) it was trained on."""
    from dataclasses import asdict

    from hilda.engine.config_io import to_dict

    if voxel is None:
        raise ConfigError("an exported backbone must record its voxelisation (voxel=...)")
    return {
        "arch": ARCH_NAMES[model.cfg.arch],
        "config": to_dict(model.cfg),
        "voxel": asdict(voxel),
    }


def save_backbone(model, path, voxel) -> Path:
    """Write the student alone, in the MinkowskiEngine (= Pointcept) layout, atomically, with
    the voxelisation it was trained on (``voxel``, a VoxelConfig) so downstream users feed it
    the same input. Loads with ``torch.load(path, weights_only=True)``: tensors, strings and
    numbers only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {
        "format": BACKBONE_FORMAT,
        "version": BACKBONE_VERSION,
        "layout": "minkowski",
        **_record(model, voxel),
        "state_dict": convert_state(state, "minkowski"),
    }
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _hilda_record(blob: object) -> dict:
    """The rebuild record of a checkpoint: a ``backbone.pt``'s own keys, or the ``hilda``
    entry of a ``pointcept_backbone.pth``; {} for anything else."""
    if not isinstance(blob, dict):
        return {}
    if blob.get("format") == BACKBONE_FORMAT:
        return blob
    record = blob.get("hilda")
    return record if isinstance(record, dict) else {}


def read_backbone_state(path) -> tuple[Tensors, dict]:
    """(state dict, config dict) of a saved backbone, a Pointcept checkpoint (``backbone.``
    / ``module.`` prefixes stripped) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or a corrupt file
        raise ConfigError(f"cannot read backbone checkpoint {path}: {exc}") from exc
    if not isinstance(blob, dict):
        raise ConfigError(f"{path} is not a checkpoint (a {type(blob).__name__})")
    state = blob.get("state_dict", blob)
    config = _hilda_record(blob).get("config", {})
    cleaned: Tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        cleaned[name] = value
    try:
        detect_layout(cleaned)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    for name, value in cleaned.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ConfigError(
                f"backbone checkpoint {path}: tensor {name} holds {bad} non-finite values of "
                f"{value.numel()} (a diverged or damaged run)"
            )
    return cleaned, config


def backbone_voxel_config(path, voxel_size: float | None = None):
    """The VoxelConfig a saved backbone was trained with. A checkpoint that records none (a
    bare state dict, another tool's export) is refused unless ``voxel_size`` is given: a
    guessed size evaluates the backbone on other voxels than it learned, without a word."""
    from hilda.models.voxelize import VoxelConfig

    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read backbone checkpoint {path}: {exc}") from exc
    voxel = _hilda_record(blob).get("voxel")
    if isinstance(voxel, dict):
        recorded = VoxelConfig(**voxel)
        if voxel_size is not None and voxel_size != recorded.voxel_size:
            raise ConfigError(
                f"{path} was trained on {recorded.voxel_size} m voxels, not the "
                f"{voxel_size} m given: leave the voxel size out to use the recorded one"
            )
        return recorded
    if voxel_size is None:
        raise ConfigError(
            f"{path} records no voxel size (not a hilda export, or an old one): pass the "
            "size it was trained on (--voxel-size, or voxel_size= in the eval config)"
        )
    if voxel_size <= 0:
        raise ConfigError(f"voxel size must be > 0, got {voxel_size}")
    return VoxelConfig(voxel_size=voxel_size)


def backbone_student_config(path, backend: str | None = None, **overrides):
    """(StudentConfig, state dict) of a checkpoint; ``backend`` defaults to the layout it was
    saved in."""
    from hilda.engine.config_io import from_dict
    from hilda.models.student import StudentConfig

    state, config = read_backbone_state(path)
    fields = dict(config)
    fields.update(overrides)
    fields["backend"] = backend or fields.get("backend") or detect_layout(state)
    try:
        return from_dict(StudentConfig, fields, "backbone config"), state
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_backbone(path, backend: str | None = None, **overrides):
    """Build a student from a checkpoint on ``backend`` (default: the layout it was saved in)."""
    from hilda.models.student import build_student

    cfg, state = backbone_student_config(path, backend, **overrides)
    model = build_student(cfg)
    try:
        model.load_state_dict(convert_state(state, cfg.backend))
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit the student {model.cfg}: {exc}") from exc
    return model


POINTCEPT_FILE = "pointcept_backbone.pth"
POINTCEPT_PREFIX = "module.backbone."  # a segmentor's backbone, as Pointcept's loader keys it
POINTCEPT_LAYOUT = {"minkunet34": "minkowski", "ptv3": "spconv"}  # the library Pointcept uses


def pointcept_state(model) -> Tensors:
    """A student's state dict as Pointcept's own backbone holds it: the same module names, the
    convolution tensors in the layout of the library Pointcept builds that backbone on
    (MinkowskiEngine for ``MinkUNet34C``, spconv (out, K, K, K, in) for PT-v3m1)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return convert_state(state, POINTCEPT_LAYOUT[model.cfg.arch])


def export_pointcept(model, path, voxel) -> Path:
    """Write ``pointcept_state(model)`` as a Pointcept checkpoint, atomically: ``state_dict``
    with ``module.backbone.`` keys, which Pointcept's ``CheckpointLoader`` maps onto a
    segmentor's backbone with ``weight=PATH`` (non-strict: the head is not in it). The
    ``hilda`` entry (which Pointcept ignores) records what rebuilding and feeding it needs, so
    hilda-eval reads this file as it reads ``backbone.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{POINTCEPT_PREFIX}{k}": v for k, v in pointcept_state(model).items()}
    blob = {"state_dict": state, "arch": ARCH_NAMES[model.cfg.arch], "hilda": _record(model, voxel)}
    return atomic_write(path, lambda tmp: torch.save(blob, tmp))
