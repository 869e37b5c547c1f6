"""Boolean masks packed eight to a byte, for mask files and saved priors.

Bit order inside a byte: the first boolean is the most significant bit (as numpy.packbits), so
files written with either agree.
"""

from __future__ import annotations

import math

import torch

from patchsparse.errors import PatchsparseError

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.int32)  # (8,)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Any-shape bool -> uint8 (ceil(numel / 8),), row-major, padding bits zero."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8)  # (bytes, 8)
    return (bits << _SHIFTS).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 (ceil(numel / 8),) -> bool `shape`; refuses a length that does not fit the shape."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise PatchsparseError(
            f"packed mask of {packed.numel()} {packed.dtype} values does not fit shape {tuple(shape)}")
    bits = (packed.to(torch.int32)[:, None] >> _SHIFTS) & 1  # (bytes, 8)
    return bits.reshape(-1)[:numel].to(torch.bool).view(*shape)
