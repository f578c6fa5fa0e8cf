"""Teacher features at point-pixel pairs: the cache stores each block on the patch grid, and
the trainer (and the teacher probe) sample it bilinearly at each pair's pixel, which equals
upsampling the grid to the image and indexing it. Pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sample_grid(
    grid: torch.Tensor, image: torch.Tensor, uv: torch.Tensor, image_size: torch.Tensor
) -> torch.Tensor:
    """Bilinear teacher features at pairs.

    grid (I, h, w, D) patch features of I images; image (Q,) which image each pair sees;
    uv (Q, 2) pixel coordinates in the original image; image_size (I, 2) its (W, H).
    Returns (Q, D).
    """
    if len(uv) == 0:
        return grid.new_zeros((0, grid.shape[-1]))
    size = image_size[image].to(uv.dtype)  # (Q, 2)
    norm = (2 * uv + 1) / size - 1  # (Q, 2) in [-1, 1]
    feats = grid.permute(0, 3, 1, 2).float()  # (I, D, h, w)
    # One image at a time keeps the sampling grid small: (1, 1, Q_i, 2) per image.
    out = grid.new_empty((len(uv), grid.shape[-1]), dtype=torch.float32)
    for i in torch.unique(image).tolist():
        sel = image == i
        g = norm[sel].view(1, 1, -1, 2).float()
        sampled = F.grid_sample(
            feats[i : i + 1], g, mode="bilinear", padding_mode="border", align_corners=False
        )
        out[sel] = sampled[0, :, 0].t()  # (Q_i, D)
    return out


@dataclass
class QuantizedGrid:
    """Teacher patch grids as the int8 codec stores them (``hilda.store.codecs``),
    carried to the training device as stored and dequantised there: half the bytes of
    float16 through the loader, and no decoding in its workers."""

    values: torch.Tensor  # (I, h, w, D) int8
    channel: torch.Tensor  # (I, D) float32 per-channel scale
    token: torch.Tensor  # (I, h, w) float32 per-token scale

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedGrid:
        return QuantizedGrid(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.values, self.channel, self.token)
            )
        )

    def dequantize(self) -> torch.Tensor:
        """(I, h, w, D) float32: values x channel scale x token scale (the codec's decode)."""
        return dequantize_int8(self.values, self.channel, self.token)

    @classmethod
    def cat(cls, grids: list[QuantizedGrid]) -> QuantizedGrid:
        return cls(
            *(
                torch.cat(parts)
                for parts in zip(*((g.values, g.channel, g.token) for g in grids), strict=True)
            )
        )


def dequantize_int8(
    values: torch.Tensor, channel: torch.Tensor, token: torch.Tensor
) -> torch.Tensor:
    """(..., h, w, D) int8, (..., D) and (..., h, w) float32 scales -> (..., h, w, D) float32."""
    return values.float() * channel[..., None, None, :] * token[..., None]


def as_float_grid(grid: torch.Tensor | QuantizedGrid) -> torch.Tensor:
    """A teacher grid as float features on its device, whichever way it travelled."""
    return grid.dequantize() if isinstance(grid, QuantizedGrid) else grid
