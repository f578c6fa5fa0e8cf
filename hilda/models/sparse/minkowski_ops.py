"""MinkowskiEngine ops. Layout: conv ``kernel`` (K^3, in, out) ((in, out) when K = 1),
batch norm as ``<name>.bn.*``, exactly as in Pointcept's ``MinkUNet34C``."""

from __future__ import annotations

import collections
import collections.abc
import warnings

import torch
from torch import nn

# MinkowskiEngine 0.5.4 still imports Sequence & co. from ``collections`` (removed in 3.10).
for _name in ("Sequence", "Mapping", "MutableMapping", "Iterable", "Callable"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))

with warnings.catch_warnings():
    # A CPU build warns at every import (each Dask worker, each CLI): it says what we know.
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    import MinkowskiEngine as ME


class _Float32:
    """MinkowskiEngine's kernels want features of their weights' dtype (float32, or float64
    in the gradient tests): under autocast (bf16 / fp16 AMP) the module runs with autocast off
    on features cast back to that dtype when an autocast op before it (e.g. a PTv3 linear
    layer) handed it lower precision. Parameter names are unchanged."""

    def forward(self, x, *args, **kwargs):
        device = x.F.device.type
        dtype = next(self.parameters()).dtype
        if x.F.dtype == dtype and not torch.is_autocast_enabled(device):
            return super().forward(x, *args, **kwargs)  # no autocast: as MinkowskiEngine does
        if x.F.dtype != dtype:
            x = ME.SparseTensor(
                x.F.to(dtype),
                coordinate_map_key=x.coordinate_map_key,
                coordinate_manager=x.coordinate_manager,
            )
        with torch.autocast(device, enabled=False):
            return super().forward(x, *args, **kwargs)


class _Conv(_Float32, ME.MinkowskiConvolution):
    pass


class _ConvTranspose(_Float32, ME.MinkowskiConvolutionTranspose):
    pass


class _BatchNorm(_Float32, ME.MinkowskiBatchNorm):
    pass


class MinkowskiOps:
    name = "minkowski"

    @staticmethod
    def check_training(x, model: nn.Module) -> None:
        """Both forward and backward are supported on CPU and CUDA."""

    def make_input(self, feats: torch.Tensor, coords: torch.Tensor, batch_size: int):
        """Sparse tensor of unique voxels: feats (M, C), coords (M, 4) int [b, x, y, z] >= 0."""
        # A fresh coordinate manager per forward: kernel maps are cached per input. Its thread
        # count follows torch's: left to itself MinkowskiEngine calls omp_set_num_threads(
        # cpu_count) on every new manager, which undoes torch.set_num_threads (and with it
        # determinism on CPU: the coordinate hash maps are filled in parallel chunks).
        algorithm = ME.MinkowskiAlgorithm.SPEED_OPTIMIZED
        manager = ME.CoordinateManager(
            D=3,
            num_threads=torch.get_num_threads(),
            coordinate_map_type=ME.CoordinateMapType.CUDA
            if coords.is_cuda
            else ME.CoordinateMapType.CPU,
            minkowski_algorithm=algorithm,
        )
        return ME.SparseTensor(
            feats,
            coordinates=coords.int(),
            coordinate_manager=manager,
            minkowski_algorithm=algorithm,
        )

    def conv(self, cin: int, cout: int, kernel: int, stride: int, level: int, bias: bool = False):
        return _Conv(cin, cout, kernel_size=kernel, stride=stride, bias=bias, dimension=3)

    def conv_transpose(self, cin: int, cout: int, level: int):
        """Kernel-2 stride-2 up-convolution back onto the coordinates of ``level``."""
        return _ConvTranspose(cin, cout, kernel_size=2, stride=2, dimension=3)

    def batch_norm(self, channels: int, momentum: float) -> nn.Module:
        return _BatchNorm(channels, momentum=momentum)

    def relu(self) -> nn.Module:
        return ME.MinkowskiReLU(inplace=True)

    def cat(self, a, b):
        return ME.cat(a, b)

    def add(self, a, b):
        return a + b

    def with_features(self, x, feats: torch.Tensor):
        return ME.SparseTensor(
            feats,
            coordinate_map_key=x.coordinate_map_key,
            coordinate_manager=x.coordinate_manager,
        )

    def features(self, x) -> torch.Tensor:
        return x.F

    def coordinates(self, x) -> torch.Tensor:
        """(M, 4) int64 [b, x, y, z] in units of the tensor's stride."""
        coords = x.C.long()
        stride = torch.as_tensor(x.tensor_stride, device=coords.device)
        return torch.cat([coords[:, :1], coords[:, 1:] // stride], dim=1)
