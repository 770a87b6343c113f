"""Channels-last memory layouts for image and video networks alike.

``train.channels_last`` (and ``auto``, when it is faster) stores 4-D tensors (images, Conv2d weights) as
``torch.channels_last`` and 5-D ones (clips [B, C, T, H, W], Conv3d weights) as
``torch.channels_last_3d``; ``Module.to(memory_format=...)`` takes one format for all and refuses a
tensor of the other rank.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout of its rank (other ranks as they are)."""
    layout = CHANNELS_LAST.get(x.dim())
    return x if layout is None else x.contiguous(memory_format=layout)


def channels_last_module(module: nn.Module) -> nn.Module:
    """``module`` with its 4-D and 5-D parameters and buffers channels-last, in place (the same
    Parameter objects, as ``Module.to`` keeps them)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.dim() in CHANNELS_LAST:
            tensor.data = channels_last_tensor(tensor.data)
    return module
