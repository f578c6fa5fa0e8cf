"""Point cloud serialization for PTv3 (Wu et al. 2024, Sec. 3.1): space-filling-curve codes of
grid coordinates and the orders they induce. Pure torch.

The codes are bit-for-bit those of Pointcept's ``serialization`` package, so a model trained
here attends over the same patches when loaded into Pointcept:

- z-order: bit i of x, y, z goes to bit 3i+2, 3i+1, 3i of the code (x most significant);
- Hilbert: Skilling's transpose algorithm ("Programming the Hilbert curve", 2004), the
  transposed bits interleaved as the z-order interleaves coordinates;
- the ``-trans`` variants swap x and y before encoding;
- the batch index sits above the 3 * depth coordinate bits, so sorting a batch's codes keeps
  every sample contiguous.

Written here rather than taken from Pointcept (not a pip package), vectorised over points with
integer bit operations instead of its per-bit boolean tensors: a loop over the ``depth`` bits
only, each step an elementwise op on (N,) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hilda.errors import ConfigError

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")
MAX_DEPTH = 16  # bits per axis, as Pointcept (48 coordinate bits, the batch above them)


def interleave(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, depth: int) -> torch.Tensor:
    """(N,) int64 x, y, z < 2**depth -> (N,) int64 codes with bit i of x, y, z at bits
    3i+2, 3i+1, 3i."""
    code = torch.zeros_like(x)
    for i in range(depth):
        bit = 1 << i
        code |= ((x & bit) << (2 * i + 2)) | ((y & bit) << (2 * i + 1)) | ((z & bit) << (2 * i))
    return code


def z_order_encode(grid: torch.Tensor, depth: int) -> torch.Tensor:
    """(N, 3) non-negative int grid coordinates -> (N,) int64 z-order (Morton) codes."""
    g = grid.long()
    return interleave(g[:, 0], g[:, 1], g[:, 2], depth)


def hilbert_encode(grid: torch.Tensor, depth: int) -> torch.Tensor:
    """(N, 3) non-negative int grid coordinates -> (N,) int64 Hilbert codes (Skilling 2004:
    "AxestoTranspose", then the transposed bits interleaved)."""
    x = [grid[:, d].long() for d in range(3)]
    q = 1 << (depth - 1) if depth > 0 else 0
    while q > 1:  # undo the excess work of the inverse transform, from the top bit down
        p = q - 1
        for i in range(3):
            on = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(on, x[0] ^ p, x[0])  # invert the low bits of axis 0
                continue
            t = (x[0] ^ x[i]) & p  # where the bit is off: exchange low bits of axes 0, i
            x[0], x[i] = torch.where(on, x[0] ^ p, x[0] ^ t), torch.where(on, x[i], x[i] ^ t)
        q >>= 1
    for i in range(1, 3):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (depth - 1) if depth > 0 else 0
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return interleave(x[0] ^ t, x[1] ^ t, x[2] ^ t, depth)


def encode(grid: torch.Tensor, batch: torch.Tensor | None, depth: int, order: str) -> torch.Tensor:
    """(N, 3) grid coordinates (+ (N,) sample ids) -> (N,) int64 codes of one ``order``."""
    if order not in ORDERS:
        raise ConfigError(f"unknown serialization order {order!r}; choose from {ORDERS}")
    g = grid.long()
    if order.endswith("-trans"):
        g = g[:, [1, 0, 2]]
    code = z_order_encode(g, depth) if order.startswith("z") else hilbert_encode(g, depth)
    if batch is not None:
        code = batch.long() << (3 * depth) | code
    return code


@dataclass
class Serialized:
    """Codes and orders of one point set under several curves (O orders, N points)."""

    code: torch.Tensor  # (O, N) int64
    order: torch.Tensor  # (O, N) int64: point index at each sorted position
    inverse: torch.Tensor  # (O, N) int64: sorted position of each point
    depth: int  # bits per axis


def depth_of(grid: torch.Tensor) -> int:
    """Bits per axis that hold every coordinate of (N, 3) ``grid`` (Pointcept's rule)."""
    depth = int(grid.max()).bit_length() if len(grid) else 0
    if depth > MAX_DEPTH:
        raise ConfigError(
            f"grid coordinates up to {int(grid.max())} need {depth} bits a axis; "
            f"serialization holds {MAX_DEPTH} (crop the cloud or use larger voxels)"
        )
    return depth


def orders_from_codes(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, N) codes -> (order, inverse), both (O, N)."""
    order = torch.argsort(code, dim=1)
    inverse = torch.empty_like(order)
    ranks = torch.arange(code.shape[1], device=code.device).expand_as(order)
    inverse.scatter_(1, order, ranks)
    return order, inverse


def serialize(
    grid: torch.Tensor,
    batch: torch.Tensor,
    orders: tuple[str, ...],
    depth: int | None = None,
) -> Serialized:
    """(N, 3) non-negative grid coordinates of samples ``batch`` (N,) -> their codes and orders
    under each of ``orders``."""
    depth = depth_of(grid) if depth is None else depth
    code = torch.stack([encode(grid, batch, depth, o) for o in orders])  # (O, N)
    order, inverse = orders_from_codes(code)
    return Serialized(code, order, inverse, depth)


def shuffled(s: Serialized, generator: torch.Generator | None = None) -> Serialized:
    """The same orders in a random sequence (PTv3's order shuffling): which block attends
    along which curve changes from step to step."""
    perm = torch.randperm(s.code.shape[0], generator=generator)
    perm = perm.to(s.code.device)
    return Serialized(s.code[perm], s.order[perm], s.inverse[perm], s.depth)
