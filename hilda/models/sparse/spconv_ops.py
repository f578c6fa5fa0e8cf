"""spconv 2.x ops with the same architecture as the MinkowskiEngine ones.

Layout: conv ``weight`` (out, K, K, K, in); batch norm wrapped as ``<name>.bn.*`` so that only
conv tensors differ from the MinkowskiEngine state dict (``hilda.models.convert``).
On CPU only the forward pass is supported (``CPU_BACKWARD_ERROR``); spconv trains on CUDA.
Stride-1 convolutions are submanifold (outputs on the input voxels, as MinkowskiEngine's
stride-1 convolution); down-sampling is a kernel-2 stride-2 sparse convolution and up-sampling
its inverse, which restores exactly the finer level's voxels.
"""

from __future__ import annotations

import contextlib

import spconv.pytorch as spconv
import torch
from torch import nn

from hilda.errors import ConfigError

CPU_BACKWARD_ERROR = (
    "spconv's CPU backward is not usable: through the full MinkUNet its gradients disagree "
    "with finite differences (and with MinkowskiEngine) by tens of percent, varying from run "
    "to run, even on one thread, although single layers agree. Train on CPU with "
    "backend=minkowski, use spconv on CUDA, or run the spconv forward under torch.no_grad()."
)


def check_cpu_training(x: spconv.SparseConvTensor, model: nn.Module) -> None:
    """Refuse a CPU forward that would be followed by a backward (see CPU_BACKWARD_ERROR)."""
    if x.features.is_cuda or not torch.is_grad_enabled():
        return
    if x.features.requires_grad or any(p.requires_grad for p in model.parameters()):
        raise ConfigError(CPU_BACKWARD_ERROR)


@contextlib.contextmanager
def _one_thread_on_cpu(x: spconv.SparseConvTensor):
    """spconv 2.3.8's CPU path races under torch's intra-op parallelism: a stride-2 sparse
    convolution of 4,000 voxels came out 1-5% (relative) wrong in about half of the runs on 2
    threads, and exact (1e-7 of MinkowskiEngine) every time on one. CUDA is untouched."""
    if x.features.is_cuda:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _OneThreadOnCPU:
    def forward(self, x):
        with _one_thread_on_cpu(x):
            if self.bias is None or x.features.is_cuda:
                return super().forward(x)
            # spconv 2.3's CPU kernels refuse a fused bias ("cpu don't support act and bias"):
            # convolve without it, then add it.
            bias = self.bias
            self._parameters["bias"] = None
            try:
                out = super().forward(x)
            finally:
                self._parameters["bias"] = bias
            return out.replace_feature(out.features + bias)


class _SubMConv3d(_OneThreadOnCPU, spconv.SubMConv3d):
    pass


class _SparseConv3d(_OneThreadOnCPU, spconv.SparseConv3d):
    pass


class _SparseInverseConv3d(_OneThreadOnCPU, spconv.SparseInverseConv3d):
    pass


class _BatchNorm(nn.Module):
    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels, momentum=momentum)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        return x.replace_feature(self.bn(x.features))


class _ReLU(nn.Module):
    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        return x.replace_feature(torch.relu(x.features))


class SpconvOps:
    name = "spconv"
    check_training = staticmethod(check_cpu_training)

    def make_input(self, feats: torch.Tensor, coords: torch.Tensor, batch_size: int):
        coords = coords.int()
        # Room for four stride-2 levels: every side a multiple of 16.
        shape = ((coords[:, 1:].max(dim=0).values.long() + 16) // 16 * 16).tolist()
        return spconv.SparseConvTensor(feats, coords.contiguous(), shape, batch_size)

    def conv(self, cin: int, cout: int, kernel: int, stride: int, level: int, bias: bool = False):
        if stride == 1:
            return _SubMConv3d(cin, cout, kernel, bias=bias, indice_key=f"subm{kernel}_l{level}")
        return _SparseConv3d(
            cin, cout, kernel, stride=stride, bias=bias, indice_key=f"down_l{level}"
        )

    def conv_transpose(self, cin: int, cout: int, level: int):
        return _SparseInverseConv3d(cin, cout, 2, bias=False, indice_key=f"down_l{level}")

    def batch_norm(self, channels: int, momentum: float) -> nn.Module:
        return _BatchNorm(channels, momentum)

    def relu(self) -> nn.Module:
        return _ReLU()

    def cat(self, a, b):
        return a.replace_feature(torch.cat([a.features, b.features], dim=1))

    def add(self, a, b):
        return a.replace_feature(a.features + b.features)

    def with_features(self, x, feats: torch.Tensor):
        return x.replace_feature(feats)

    def features(self, x) -> torch.Tensor:
        return x.features

    def coordinates(self, x) -> torch.Tensor:
        return x.indices.long()
