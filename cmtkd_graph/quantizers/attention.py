"""Quantized attention modules: the linear projections that torchvision calls *functionally*.

``nn.MultiheadAttention`` (ViT) keeps its packed input projection as a raw parameter and runs
``out_proj`` inside ``F.multi_head_attention_forward``; Swin's ``ShiftedWindowAttention(V2)`` and
Video Swin's ``ShiftedWindowAttention3d`` pass ``qkv.weight`` and ``proj.weight`` to a function.
Neither projection is a module call the graph pass could swap, so the whole attention module is a leaf
of the traced graph and is swapped here for a twin that quantizes:

* the projection weights, by weight quantizers beside them (``in_proj_weight_quantizer``,
  ``out_proj.weight_quantizer``; ``qkv.weight_quantizer``, ``proj.weight_quantizer``);
* the input of the output projection, by a signed activation quantizer (``out_proj.input_quantizer``,
  ``proj.input_quantizer``): the attention output mixes value vectors and can be negative.

The input of the first projection is the module's input: the graph pass quantizes it with an input
quantizer node, as for every other layer. Parameter and buffer names are unchanged, so torchvision
checkpoints load. A bit-width of 32 puts an ``nn.Identity`` in the quantizer's place.
Only what torchvision's classification models use is supported (batch-first self-attention without
masks, ``need_weights=False``); anything else raises an error.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

from cmtkd_graph.errors import UserError
from cmtkd_graph.models.meta_device import no_init_on_meta
from cmtkd_graph.quantizers.base import FULL_PRECISION, QuantizerFamily


class QuantMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch-first self-attention) with quantized projections."""

    @classmethod
    def from_float(
        cls, mha: nn.MultiheadAttention, family: QuantizerFamily, *, weight_bits: int, act_bits: int
    ) -> QuantMultiheadAttention:
        """The quantized twin of ``mha``, sharing its very parameters."""
        unsupported = {
            "batch_first=False": not mha.batch_first,
            "separate q/k/v projection weights (kdim/vdim)": not mha._qkv_same_embed_dim,
            "add_bias_kv=True": mha.bias_k is not None,
            "add_zero_attn=True": mha.add_zero_attn,
        }
        problems = [name for name, present in unsupported.items() if present]
        if problems:
            raise UserError(f"cannot quantize nn.MultiheadAttention with {', '.join(problems)}")
        with torch.device("meta"), no_init_on_meta():  # placeholders, replaced by the shared tensors below
            new = cls(
                mha.embed_dim,
                mha.num_heads,
                dropout=mha.dropout,
                bias=mha.in_proj_bias is not None,
                batch_first=True,
            )
        _share_tensors(new, mha)
        device = mha.in_proj_weight.device
        new.in_proj_weight_quantizer = _weight_quantizer(family, weight_bits, device)
        new.out_proj.weight_quantizer = _weight_quantizer(family, weight_bits, device)
        new.out_proj.input_quantizer = _attention_output_quantizer(family, act_bits, device)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Same signature as ``nn.MultiheadAttention``; returns ``(output, None)``."""
        if query is not key or key is not value or query.dim() != 3:
            raise UserError(
                "QuantMultiheadAttention supports batched self-attention only (query is key is value)"
            )
        if key_padding_mask is not None or attn_mask is not None or is_causal or need_weights:
            raise UserError("QuantMultiheadAttention supports no masks and need_weights=False only")
        batch, tokens, dim = query.shape
        heads = self.num_heads
        weight = self.in_proj_weight_quantizer(self.in_proj_weight)
        qkv = F.linear(query, weight, self.in_proj_bias).view(batch, tokens, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
        dropout = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return _quantized_linear(x, self.out_proj), None


class _QuantWindowAttention(nn.Module):
    """What the quantized 2-D and 3-D window attentions share: the construction from a float module and
    the math of torchvision's ``shifted_window_attention(_3d)`` (pad, cyclic shift, windows, attention,
    undo) over any number of spatial axes, with ``qkv`` / ``proj`` quantized."""

    window_size: list[int]
    shift_size: list[int]
    num_heads: int
    attention_dropout: float
    dropout: float
    qkv: nn.Linear
    proj: nn.Linear

    @classmethod
    def from_float(
        cls, attn: nn.Module, family: QuantizerFamily, *, weight_bits: int, act_bits: int
    ) -> nn.Module:
        """The quantized twin of ``attn``, sharing its very parameters and buffers."""
        with torch.device("meta"), no_init_on_meta():  # placeholders, replaced by the shared tensors below
            new = cls(
                attn.qkv.in_features,
                list(attn.window_size),
                list(attn.shift_size),
                attn.num_heads,
                qkv_bias=attn.qkv.bias is not None,
                proj_bias=attn.proj.bias is not None,
                attention_dropout=attn.attention_dropout,
                dropout=attn.dropout,
            )
        _share_tensors(new, attn)
        device = attn.qkv.weight.device
        new.qkv.weight_quantizer = _weight_quantizer(family, weight_bits, device)
        new.proj.weight_quantizer = _weight_quantizer(family, weight_bits, device)
        new.proj.input_quantizer = _attention_output_quantizer(family, act_bits, device)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, *spatial axes, channels), returned in the same layout."""
        size = tuple(x.shape[1:-1])
        window, shift = self._window_and_shift(size)
        pads = [v for n, w in reversed(list(zip(size, window, strict=True))) for v in (0, -n % w)]
        x = F.pad(x, (0, 0, *pads))
        padded = tuple(x.shape[1:-1])
        axes = tuple(range(1, len(size) + 1))
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=axes)
        windows = _to_windows(x, window)
        mask = _shift_mask(padded, window, shift, x) if any(shift) else None
        attended = self._window_attention(windows, mask, self._position_bias(window))
        x = _from_windows(attended, window, padded)
        if any(shift):
            x = torch.roll(x, shifts=tuple(shift), dims=axes)
        return x[(slice(None), *(slice(0, n) for n in size))].contiguous()

    def _window_and_shift(self, size: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The window and shift for a map of ``size``: no shift along an axis one window covers."""
        shift = [s if w < n else 0 for s, w, n in zip(self.shift_size, self.window_size, size, strict=True)]
        return list(self.window_size), shift

    def _position_bias(self, window: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _window_attention(
        self, x: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor
    ) -> torch.Tensor:
        """Multi-head attention within each window: (windows, tokens, C) -> same shape."""
        windows, tokens, channels = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.qkv.weight_quantizer(self.qkv.weight), self._qkv_bias())
        q, k, v = qkv.reshape(windows, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        attn = self._attention_logits(q, k) + bias
        if mask is not None:
            per_image = mask.shape[0]
            attn = attn.view(windows // per_image, per_image, heads, tokens, tokens) + mask[None, :, None]
            attn = attn.view(-1, heads, tokens, tokens)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(windows, tokens, channels)
        return F.dropout(_quantized_linear(x, self.proj), p=self.dropout, training=self.training)

    def _qkv_bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def _attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled dot product (Swin v1, Video Swin)."""
        q = q * (q.shape[-1] ** -0.5)
        return q.matmul(k.transpose(-2, -1))


class QuantShiftedWindowAttention(_QuantWindowAttention, ShiftedWindowAttention):
    """Swin's window attention (maps [B, H, W, C]) with quantized ``qkv`` / ``proj``; a window larger
    than the map is padded, as in torchvision's ``shifted_window_attention``."""

    def _position_bias(self, window: list[int]) -> torch.Tensor:
        return self.get_relative_position_bias()


class QuantShiftedWindowAttention3d(_QuantWindowAttention, ShiftedWindowAttention3d):
    """Video Swin's window attention (maps [B, T, H, W, C]) with quantized ``qkv`` / ``proj``; a window
    larger than the map shrinks to it, as in torchvision's ``ShiftedWindowAttention3d``."""

    def _window_and_shift(self, size: tuple[int, ...]) -> tuple[list[int], list[int]]:
        _, shift = super()._window_and_shift(size)
        return [min(w, n) for w, n in zip(self.window_size, size, strict=True)], shift

    def _position_bias(self, window: list[int]) -> torch.Tensor:
        return self.get_relative_position_bias(window)


class QuantShiftedWindowAttentionV2(QuantShiftedWindowAttention, ShiftedWindowAttentionV2):
    """Swin v2's window attention (cosine attention, no key bias) with quantized ``qkv`` / ``proj``.

    The continuous position-bias MLP ``cpb_mlp`` stays float: it maps fixed coordinates to a bias
    table, not activations, and is inherited unchanged from torchvision.
    """

    def _qkv_bias(self) -> torch.Tensor | None:
        """The key part of the bias is zero (and gets no gradient), as in torchvision."""
        if self.qkv.bias is None:
            return None
        bias = self.qkv.bias.clone()
        third = bias.numel() // 3
        bias[third : 2 * third] = 0
        return bias

    def _attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Cosine similarity times a learned, clamped per-head scale."""
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()


_QUANTIZED_ATTENTION: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: QuantMultiheadAttention,
    ShiftedWindowAttention: QuantShiftedWindowAttention,
    ShiftedWindowAttentionV2: QuantShiftedWindowAttentionV2,
    ShiftedWindowAttention3d: QuantShiftedWindowAttention3d,
}
ATTENTION_TYPES: tuple[type[nn.Module], ...] = tuple(_QUANTIZED_ATTENTION)
"""Float attention modules with functional projections (their subclasses include the quantized twins)."""
QUANTIZED_ATTENTION_TYPES: tuple[type[nn.Module], ...] = tuple(_QUANTIZED_ATTENTION.values())


def quantize_attention(
    module: nn.Module, family: QuantizerFamily, *, weight_bits: int, act_bits: int
) -> nn.Module:
    """The quantized twin of a float attention module (dispatch on its exact type)."""
    cls = _QUANTIZED_ATTENTION.get(type(module))
    if cls is None:
        raise UserError(f"no quantized version of attention module {type(module).__name__}")
    return cls.from_float(module, family, weight_bits=weight_bits, act_bits=act_bits)


def _weight_quantizer(family: QuantizerFamily, bits: int, device: torch.device) -> nn.Module:
    return nn.Identity() if bits == FULL_PRECISION else family.weight(bits).to(device)


def _attention_output_quantizer(family: QuantizerFamily, bits: int, device: torch.device) -> nn.Module:
    return nn.Identity() if bits == FULL_PRECISION else family.activation(bits, signed=True).to(device)


def _quantized_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer`` applied with its input and weight quantizers (children set by ``from_float``)."""
    return F.linear(layer.input_quantizer(x), layer.weight_quantizer(layer.weight), layer.bias)


def _share_tensors(new: nn.Module, old: nn.Module) -> None:
    """Put ``old``'s parameter and buffer objects into ``new`` under the same names."""
    if set(new.state_dict()) != set(old.state_dict()):
        raise UserError(f"cannot quantize {type(old).__name__}: its parameters differ from torchvision's")
    for name, tensor in itertools.chain(old.named_parameters(), old.named_buffers()):
        owner, _, attr = name.rpartition(".")
        setattr(new.get_submodule(owner), attr, tensor)
    new.train(old.training)


def _to_windows(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """(B, *S, C) -> (B * windows, window tokens, C), windows in row-major order over the axes S."""
    batch, *size, channels = x.shape
    split = [v for n, w in zip(size, window, strict=True) for v in (n // w, w)]
    d = len(size)
    order = (0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)  # counts first, then offsets
    return x.view(batch, *split, channels).permute(order).reshape(-1, math.prod(window), channels)


def _from_windows(x: torch.Tensor, window: list[int], size: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_to_windows` for a map of ``size`` (the spatial axes)."""
    counts = [n // w for n, w in zip(size, window, strict=True)]
    d = len(size)
    order = (0, *(v for i in range(1, d + 1) for v in (i, i + d)), 2 * d + 1)  # interleave again
    x = x.view(-1, *counts, *window, x.shape[-1]).permute(order)
    return x.reshape(-1, *size, x.shape[-1])


def _shift_mask(
    size: tuple[int, ...], window: list[int], shift: list[int], like: torch.Tensor
) -> torch.Tensor:
    """(windows, tokens, tokens) additive mask: -100 between tokens that the cyclic shift brought
    together from different regions of the map, 0 elsewhere (torchvision's regions, in its order)."""
    region = like.new_zeros(tuple(size))
    bounds = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift, strict=True)]
    for label, corner in enumerate(itertools.product(*bounds)):
        region[tuple(slice(a, b) for a, b in corner)] = label
    region = _to_windows(region[None, ..., None], window).squeeze(-1)  # (windows, tokens)
    differs = region.unsqueeze(1) != region.unsqueeze(2)
    return region.new_zeros(differs.shape).masked_fill(differs, -100.0)


__all__ = [
    "ATTENTION_TYPES",
    "QUANTIZED_ATTENTION_TYPES",
    "QuantMultiheadAttention",
    "QuantShiftedWindowAttention",
    "QuantShiftedWindowAttention3d",
    "QuantShiftedWindowAttentionV2",
    "quantize_attention",
]
