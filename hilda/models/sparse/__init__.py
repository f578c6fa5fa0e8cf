"""Sparse convolution backends for the student, behind one interface.

``minkowski`` (MinkowskiEngine; CPU and CUDA; parameter names and layouts as Pointcept's
``MinkUNet34C``) and ``spconv`` (CUDA training; on CPU its forward only, which is enough for
the equivalence tests: see ``spconv_ops.CPU_BACKWARD_ERROR``). Each backend module is imported
only when asked for, so a machine with one of them installed can still use it.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import torch
from torch import nn

from hilda.errors import ConfigError

BACKENDS = ("minkowski", "spconv")

SparseTensor = Any  # the backend's own sparse tensor (ME.SparseTensor, spconv.SparseConvTensor)


class SparseOps(Protocol):
    """What the student needs from a sparse convolution library. ``level`` is the tensor
    stride's log2 (1 = stride 1), which spconv needs to name its index keys."""

    name: str

    def check_training(self, x: SparseTensor, model: nn.Module) -> None:
        """Raise if this backend cannot train ``model`` on ``x``'s device."""

    def make_input(
        self, feats: torch.Tensor, coords: torch.Tensor, batch_size: int
    ) -> SparseTensor:
        """Unique voxels: feats (M, C), coords (M, 4) int [b, x, y, z] >= 0."""

    def conv(
        self, cin: int, cout: int, kernel: int, stride: int, level: int, bias: bool = False
    ) -> nn.Module: ...

    def conv_transpose(self, cin: int, cout: int, level: int) -> nn.Module:
        """Kernel-2 stride-2 up-convolution back onto the coordinates of ``level``."""

    def batch_norm(self, channels: int, momentum: float) -> nn.Module: ...

    def relu(self) -> nn.Module: ...

    def cat(self, a: SparseTensor, b: SparseTensor) -> SparseTensor:
        """Channel concatenation of two tensors on the same coordinates."""

    def add(self, a: SparseTensor, b: SparseTensor) -> SparseTensor: ...

    def with_features(self, x: SparseTensor, feats: torch.Tensor) -> SparseTensor:
        """``x``'s coordinates (and cached kernel maps) with new (M, C) features, given in the
        order of ``coordinates(x)``."""

    def features(self, x: SparseTensor) -> torch.Tensor:
        """(M, C) features in the order of ``coordinates(x)``."""

    def coordinates(self, x: SparseTensor) -> torch.Tensor:
        """(M, 4) int64 [b, x, y, z] in units of the tensor's stride."""


def backend_installed(name: str) -> bool:
    """Whether the backend's library can be found (without importing it)."""
    module = {"minkowski": "MinkowskiEngine", "spconv": "spconv"}[name]
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if backend_installed(name)]


def load_ops(name: str) -> SparseOps:
    """The ``SparseOps`` of a backend: module factories and tensor helpers."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown sparse backend {name!r}; choose one of {BACKENDS}")
    if not backend_installed(name):
        hint = {
            "minkowski": "run scripts/setup.sh (it builds MinkowskiEngine from source; "
            "see scripts/build_sparse.sh) or choose backend=spconv",
            "spconv": "pip install spconv (CPU) or spconv-cu120 (pip install -e '.[cuda]')",
        }[name]
        raise ConfigError(f"sparse backend {name!r} is not installed: {hint}")
    if name == "minkowski":
        from hilda.models.sparse.minkowski_ops import MinkowskiOps

        return MinkowskiOps()
    from hilda.models.sparse.spconv_ops import SpconvOps

    return SpconvOps()
