"""Conv2d, Conv3d and Linear layers whose weight goes through a weight quantizer in forward.

The parameters keep their names (``weight``, ``bias``), so ``layer1.0.conv1.weight`` of a torchvision
checkpoint loads into the quantized model unchanged; the quantizer's own state (e.g. an LSQ step)
sits under ``<layer>.weight_quantizer.``. The *activation* quantizer is not part of these layers:
the graph pass inserts it as a separate node on the layer's input edge, so that one producer
feeding several layers gets one activation quantizer per edge.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmtkd_graph.models.meta_device import no_init_on_meta
from cmtkd_graph.quantizers.base import Quantizer


class _WeightQuantized:
    """What both quantized layers add to their float base class: the weight quantizer beside ``weight``."""

    weight_quantizer: Quantizer

    def __init__(self, *args: Any, weight_quantizer: Quantizer, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer

    def extra_repr(self) -> str:
        bits = getattr(self.weight_quantizer, "bits", None)  # export and the integer reference swap it
        return f"{super().extra_repr()}, weight_bits={bits}" if bits is not None else super().extra_repr()


def conv_arguments(layer: nn.Conv2d | nn.Conv3d) -> dict[str, Any]:
    """The constructor arguments of ``layer``'s shape and hyperparameters (not its bias, device, weights)."""
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": layer.groups,
        "padding_mode": layer.padding_mode,
    }


class _QuantConv(_WeightQuantized):
    """What both quantized convolutions share: built from a float twin, computing with the quantized
    weight."""

    @classmethod
    def from_float(cls, layer: nn.Conv2d | nn.Conv3d, weight_quantizer: Quantizer) -> Any:
        """The quantized twin of ``layer``, sharing its very Parameter objects and hyperparameters."""
        with no_init_on_meta():
            new = cls(
                **conv_arguments(layer),
                bias=layer.bias is not None,
                device="meta",  # placeholders only: replaced by the shared parameters below
                weight_quantizer=weight_quantizer,
            )
        _share_parameters(new, layer)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight)
        tap = self._single_pixel_tap(x) if self.training else None
        if tap is None:
            return self._conv_forward(x, weight, self.bias)
        out = F.linear(x.flatten(1), weight[(slice(None), slice(None), *tap)], self.bias)
        return out.view(*out.shape, *([1] * len(tap)))

    def _single_pixel_tap(self, x: torch.Tensor) -> tuple[int, ...] | None:
        """The one kernel position that meets the input when the input and the output are a single
        pixel (ResNet's layer4 at 28-32 px), else None.

        There the convolution is the matrix product of that tap: the same value and the same gradient
        (the other taps only meet the zero padding), and several times faster to train on CPUs, whose
        convolution kernels are slow on 1x1 maps (a 512-channel 3x3 convolution's forward and backward:
        49 ms against 5 ms on one core of an AMD EPYC Zen 3). Training only: evaluation and export
        keep the convolution the graph has, which the integer forms replace.
        """
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        if any(size != 1 for size in x.shape[2:]):
            return None
        tap = []
        for k, s, p, d in zip(self.kernel_size, self.stride, self.padding, self.dilation, strict=True):
            if not 0 <= 2 * p - d * (k - 1) < s or p % d or p // d >= k:  # output not 1, or no tap meets it
                return None
            tap.append(p // d)
        return tuple(tap)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight_quantizer(weight)``."""


class QuantConv3d(_QuantConv, nn.Conv3d):
    """``nn.Conv3d`` (video models' clips [B, C, T, H, W]) computing with ``weight_quantizer(weight)``."""


QUANTIZED_CONVS: dict[type[nn.Module], type[_QuantConv]] = {nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}
"""Float convolution type -> its quantized twin (subclasses of the float types map like them)."""


def quantized_conv(layer: nn.Conv2d | nn.Conv3d, weight_quantizer: Quantizer) -> QuantConv2d | QuantConv3d:
    """The quantized twin of a 2-D or 3-D convolution (``Conv3DSimple`` and the like included)."""
    cls = next(q for base, q in QUANTIZED_CONVS.items() if isinstance(layer, base))
    return cls.from_float(layer, weight_quantizer)


class QuantLinear(_WeightQuantized, nn.Linear):
    """``nn.Linear`` computing with ``weight_quantizer(weight)``."""

    @classmethod
    def from_float(cls, layer: nn.Linear, weight_quantizer: Quantizer) -> QuantLinear:
        """The quantized twin of ``layer``, sharing its very Parameter objects."""
        with no_init_on_meta():
            new = cls(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device="meta",  # placeholders only: replaced by the shared parameters below
                weight_quantizer=weight_quantizer,
            )
        _share_parameters(new, layer)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def _share_parameters(new: nn.Module, layer: nn.Module) -> None:
    """Put ``layer``'s weight/bias objects into ``new``; quantizer state goes to the weight's device."""
    new.weight = layer.weight
    new.bias = layer.bias
    new.train(layer.training)
    new.weight_quantizer.to(device=layer.weight.device)
