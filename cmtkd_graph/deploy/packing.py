"""Bit-packing of b-bit codes: code i occupies bits i*b .. i*b + b - 1 of a little-endian bit stream.

So 2-bit codes go four to a byte (the first in the two lowest bits), 4-bit codes two to a byte, and
3-, 5-, 6- and 7-bit codes run across byte boundaries without padding; the stream's last byte is
zero-filled. ``packed_bytes(n, b) = ceil(n * b / 8)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (any shape, each < 2^bits) -> 1-D uint8 tensor of ``packed_bytes(numel, bits)``."""
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.uint8)
    if flat.size and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code is {int(flat.max())}, more than {bits} bits hold")
    stream = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits), lowest bit first
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes, as a 1-D uint8 tensor."""
    if packed.numel() != packed_bytes(count, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} codes of {bits} bits")
    stream = np.unpackbits(packed.cpu().numpy(), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((stream.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8))
