"""Scatter and segment reductions over rows (dim 0), on torch-scatter where it is installed,
else on native torch (``index_add_``, ``scatter_reduce``): chosen once at import.

torch-scatter has no wheel for every torch (a GPU node's own torch 2.11+cu130, say); the five
call sites (voxelisation, BEV pooling, the CLS pooling heads, the Eq. 1 per-image mean, PTv3's
grid pooling) need only these reductions, which native torch computes the same: empty groups
give 0, a max or min's gradient goes to the winning row (ties aside: native torch splits it
between tied rows), the softmax is torch-scatter's (shifted by the group maximum). The tests
compare both backends' values and gradients.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# HILDA_SCATTER=torch forces the native reductions (to test them where torch-scatter is).
BACKEND = (
    "torch-scatter"
    if importlib.util.find_spec("torch_scatter") and os.environ.get("HILDA_SCATTER") != "torch"
    else "torch"
)
if BACKEND == "torch-scatter":
    import torch_scatter


def _expand(index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """(N,) row index -> (N, ...) broadcast to ``src``."""
    return index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """(N, ...) rows summed into (dim_size, ...) by their (N,) group."""
    if BACKEND == "torch-scatter":
        return torch_scatter.scatter_sum(src, index, dim=0, dim_size=dim_size)
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add(0, index, src)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """(N, ...) -> (dim_size, ...) means per group (0 for an empty group)."""
    if BACKEND == "torch-scatter":
        return torch_scatter.scatter_mean(src, index, dim=0, dim_size=dim_size)
    total = scatter_sum(src, index, dim_size)
    count = torch.zeros(dim_size, dtype=src.dtype, device=src.device)
    count = count.index_add(0, index, torch.ones_like(index, dtype=src.dtype)).clamp_(min=1)
    return total / count.view(-1, *([1] * (src.dim() - 1)))


def _extreme(src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str) -> torch.Tensor:
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.scatter_reduce(0, _expand(index, src), src, reduce=reduce, include_self=False)


def scatter_max(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """(N, ...) -> (dim_size, ...) maxima per group (0 for an empty group)."""
    if BACKEND == "torch-scatter":
        return torch_scatter.scatter_max(src, index, dim=0, dim_size=dim_size)[0]
    return _extreme(src, index, dim_size, "amax")


def scatter_min(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """(N, ...) -> (dim_size, ...) minima per group (0 for an empty group)."""
    if BACKEND == "torch-scatter":
        return torch_scatter.scatter_min(src, index, dim=0, dim_size=dim_size)[0]
    return _extreme(src, index, dim_size, "amin")


def scatter_softmax(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N,) scores -> (N,) softmax within each group."""
    if BACKEND == "torch-scatter":
        return torch_scatter.scatter_softmax(src, index, dim=0)
    groups = int(index.max()) + 1 if index.numel() else 0
    shifted = src - scatter_max(src, index, groups).detach()[index]
    exp = shifted.exp()
    return exp / scatter_sum(exp, index, groups)[index]


def segment_max(src: torch.Tensor, pointer: torch.Tensor) -> torch.Tensor:
    """(N, C) rows in contiguous segments ``pointer`` (M+1,) -> (M, C) maxima (0 if empty)."""
    if BACKEND == "torch-scatter":
        return torch_scatter.segment_csr(src, pointer, reduce="max")
    sizes = pointer[1:] - pointer[:-1]  # (M,)
    index = torch.repeat_interleave(torch.arange(len(sizes), device=src.device), sizes)
    return scatter_max(src, index, len(sizes))
