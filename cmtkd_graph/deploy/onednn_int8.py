"""Integer convolutions for the inference form in PyTorch itself, on oneDNN's int8 kernels.

PyTorch ships oneDNN's quantized convolution (``torch.ops.onednn.qconv2d_pointwise``, what
``torch.compile`` lowers int8 models to on x86): uint8 activations times int8 weights, accumulated in
int32, then ``acc * x_scale * w_scale[c] + bias`` in float. With a float32 output that epilogue is
the trained student's own arithmetic (its convolution sums the same integer products times the same
scales), so nothing is rounded that the student does not round.

:func:`use_integer_kernels` rewrites each "activation requantizer -> integer-weight convolution" pair
of the inference form into one :class:`OneDNNInt8Conv2d`: the requantizer's integers (the student's
own mapping, computed as before) become uint8 codes, the convolution runs on the integer kernel. A pair
stays as it was where the integers do not fit: activation codes beyond 0..255, weights beyond int8, or
products that could overflow the int16 pairs of CPUs without VNNI (``2 * codes * |weight| > 32767``).

:func:`chain_integer_convolutions` then lets a layer whose only reader is another such layer write that
reader's uint8 codes itself (clamp, scale and rounding in the kernel's epilogue), so the float tensor
between two quantized convolutions is never written: on mobilenet_v2 that is most of the gain.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, fx, nn

from cmtkd_graph.deploy.inference import ActivationRequantizer, IntegerWeightConv2d, module_calls
from cmtkd_graph.quantizers.base import IntegerGrid

INT16_PAIR = 32767  # two uint8 x int8 products are summed in int16 by vpmaddubsw (CPUs without VNNI)


def integer_kernels_available() -> bool:
    """Whether this PyTorch build has oneDNN's int8 convolution (x86 CPUs with oneDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def fits(grid: IntegerGrid, weight_integers: Tensor) -> str | None:
    """Why a pair cannot run on the int8 kernel (None: it can)."""
    codes = grid.qmax - grid.qmin
    largest = int(weight_integers.abs().max())
    if codes > 255:
        return f"activation codes 0..{codes} do not fit uint8"
    if largest > 127:
        return f"weight integers up to {largest} do not fit int8"
    if 2 * codes * largest > INT16_PAIR:
        return f"activation codes 0..{codes} times weights up to {largest} could overflow int16 pairs"
    return None


class OneDNNInt8Conv2d(nn.Module):
    """An activation requantizer followed by an integer-weight convolution, on oneDNN's int8 kernel.

    The input (float) becomes uint8 codes ``q - qmin`` of the requantizer's integers ``q`` (a mid-rise
    grid's odd integers -3..3 become 0, 2, 4, 6); the kernel sees the activation scale ``s`` with zero
    point ``-qmin``, so it computes ``sum(q * s * w_int * w_scale) + bias`` in float32, the student's
    convolution of its levels.
    ``requantizer`` and ``conv`` stay children (what the exports and inspection read).
    """

    def __init__(self, requantizer: ActivationRequantizer, conv: IntegerWeightConv2d):
        super().__init__()
        self.requantizer = requantizer
        self.conv = conv
        grid = requantizer.grid
        self._offset, self._top = grid.qmin, grid.qmax - grid.qmin
        self._x_scale = float(requantizer.step)
        self._x_zero_point = -grid.qmin
        integers, scale = conv.integers, conv.scale
        sign = torch.where(scale < 0, -1, 1)  # oneDNN takes positive scales: the sign moves to the integers
        self._w_scale = (scale * sign).float().contiguous()
        self._w_zero_point = torch.zeros(integers.shape[0], dtype=torch.int64)
        self._bias = None if conv.bias is None else conv.bias.detach().float().contiguous()
        self._one_pass = quantizes_in_one_pass(requantizer)  # codes by torch.quantize_per_tensor
        self._input_is_codes = False  # set by chain_integer_convolutions: the previous layer writes codes
        self._output: tuple[float, int, float, float] | None = None  # (scale, zero point, low, high)
        self._geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        stride, padding, dilation, groups = self._geometry
        weight = (integers * sign.view(-1, 1, 1, 1)).to(torch.int8)
        self._packed = torch.ops.onednn.qconv_prepack(
            weight, self._w_scale, self._x_scale, self._x_zero_point, stride, padding, dilation, groups, None
        )

    def codes(self, x: Tensor) -> Tensor:
        """uint8 codes (channels-last, as the kernel reads them) of the requantizer's integers of ``x``."""
        if self._one_pass:
            return one_pass_codes(x, self._x_scale, self._x_zero_point, self._top)
        q, _ = self.requantizer.quantizer.integers(x.float())
        if self._offset:
            q = q.sub_(self._offset)
        return q.to(torch.uint8, memory_format=torch.channels_last)

    @property
    def reads_codes(self) -> bool:
        """Whether its input is the uint8 codes the previous layer wrote (not floats)."""
        return self._input_is_codes

    @property
    def writes_codes(self) -> bool:
        """Whether its output is the next layer's uint8 codes (not floats)."""
        return self._output is not None

    def emit_codes(self, low: float, high: float, codes_for: OneDNNInt8Conv2d) -> None:
        """Output ``codes_for``'s uint8 codes instead of floats: ``round(clamp(y, low, high) / s) - qmin``
        in the kernel's epilogue (``low``/``high``: the reader's range, narrowed by an activation between)."""
        self._output = (codes_for._x_scale, codes_for._x_zero_point, low, high)
        codes_for._input_is_codes = True

    def forward(self, x: Tensor) -> Tensor:
        stride, padding, dilation, groups = self._geometry
        codes = x if self._input_is_codes else self.codes(x)
        scale, zero_point, dtype, attr, scalars = 1.0, 0, torch.float32, "none", []
        if self._output is not None:
            scale, zero_point, low, high = self._output
            dtype, attr, scalars = None, "hardtanh", [low, high]  # None: uint8
        out = torch.ops.onednn.qconv2d_pointwise(
            codes,
            self._x_scale,
            self._x_zero_point,
            self._packed,
            self._w_scale,
            self._w_zero_point,
            self._bias,
            stride,
            padding,
            dilation,
            groups,
            scale,
            zero_point,
            dtype,
            attr,
            scalars,
            "",
        )
        if self._output is None and x.is_floating_point() and x.dtype != out.dtype:
            out = out.to(x.dtype)  # e.g. bfloat16 in, bfloat16 out
        return out

    def extra_repr(self) -> str:
        source = "uint8 codes from the previous layer" if self._input_is_codes else "uint8 codes"
        target = ", writes the next layer's uint8 codes" if self._output is not None else ""
        return f"{source} 0..{self._top} (zero point {self._x_zero_point}) x int8 weights, oneDNN{target}"


def rounds_plainly(requantizer: ActivationRequantizer) -> bool:
    """Whether the requantizer's integers are ``round(clamp(x, qmin s, qmax s) / s)`` (what a kernel's
    epilogue computes), checked on a dense sweep of its range (not assumed from its class)."""
    grid, s = requantizer.grid, float(requantizer.step)
    if grid.step != 1:
        return False
    x = torch.linspace((grid.qmin - 2) * s, (grid.qmax + 2) * s, 40001)
    q, _ = requantizer.quantizer.integers(x.clone())
    return bool(torch.equal(q, torch.round(torch.clamp(x, grid.qmin * s, grid.qmax * s) / s)))


def one_pass_codes(x: Tensor, scale: float, zero_point: int, top: int) -> Tensor:
    """``clamp(round(x / scale) + zero_point, 0, top)`` as uint8, channels-last: one vectorized pass over
    the float tensor (``torch.quantize_per_tensor``) and a clamp of its bytes, where the requantizer's own
    mapping makes five float passes (at batch 64 on resnet18's 56x56 maps: 4.9 ms against 22.7 ms)."""
    codes = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8).int_repr().clamp_(0, top)
    return codes.contiguous(memory_format=torch.channels_last) if codes.dim() == 4 else codes


def quantizes_in_one_pass(requantizer: ActivationRequantizer) -> bool:
    """Whether :func:`one_pass_codes` gives the requantizer's codes: a unit-step grid that rounds plainly,
    this PyTorch has ``torch.quantize_per_tensor``, and on a dense sweep of the range the codes agree (it
    multiplies by the inverse scale, which could round differently at a level boundary)."""
    grid, s = requantizer.grid, float(requantizer.step)
    top = grid.qmax - grid.qmin
    if not hasattr(torch, "quantize_per_tensor") or top > 255 or not rounds_plainly(requantizer):
        return False
    x = torch.linspace((grid.qmin - 2) * s, (grid.qmax + 2) * s, 40001)
    q, _ = requantizer.quantizer.integers(x.clone())
    try:
        with warnings.catch_warnings():  # the op is deprecated, said once per process: here, not per call
            warnings.simplefilter("ignore", UserWarning)
            codes = one_pass_codes(x, s, -grid.qmin, top)
    except (RuntimeError, NotImplementedError):  # a PyTorch that keeps the name but not the kernel
        return False
    return bool(torch.equal(codes, (q - grid.qmin).to(torch.uint8)))


def use_integer_kernels(form: fx.GraphModule) -> dict[str, str]:
    """In place: each requantizer -> integer-weight convolution pair that fits becomes one
    :class:`OneDNNInt8Conv2d` (named after the convolution). Returns, per convolution left in float, why.

    A pair is a requantizer node whose only reader is a call of an :class:`IntegerWeightConv2d` with it
    as its only argument, the convolution called once.
    """
    calls = module_calls(form)
    left: dict[str, str] = {}
    for node in list(form.graph.nodes):
        if node.op != "call_module" or not isinstance(form.get_submodule(node.target), IntegerWeightConv2d):
            continue
        conv = form.get_submodule(node.target)
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        requantizer = (
            form.get_submodule(source.target)
            if isinstance(source, fx.Node) and source.op == "call_module"
            else None
        )
        if not isinstance(requantizer, ActivationRequantizer) or len(source.users) != 1:
            left[node.target] = "its input is not an activation quantizer read by it alone"
            continue
        if calls[node.target] != 1 or calls[source.target] != 1:
            left[node.target] = "it is called more than once"
            continue
        why = fits(requantizer.grid, conv.integers)
        if why:
            left[node.target] = why
            continue
        fused = OneDNNInt8Conv2d(requantizer, conv)
        parent, _, name = node.target.rpartition(".")
        owner = form.get_submodule(parent) if parent else form
        setattr(owner, name, fused)  # the convolution's path now names the fused layer
        node.args = (source.args[0],)
        form.graph.erase_node(source)
    return left


CLIPS: dict[type, tuple[float, float]] = {nn.ReLU: (0.0, math.inf), nn.ReLU6: (0.0, 6.0)}
CLIP_FUNCTIONS = {torch.relu: (0.0, math.inf), torch.nn.functional.relu: (0.0, math.inf)}


def _clip(form: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """The range an activation node clips to (ReLU, ReLU6, Hardtanh), None for other nodes."""
    if node.op == "call_module":
        module = form.get_submodule(node.target)
        if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
            return (module.min_val, module.max_val)
        return CLIPS.get(type(module))
    if node.op == "call_function":
        return CLIP_FUNCTIONS.get(node.target)
    return None


def chain_integer_convolutions(form: fx.GraphModule) -> int:
    """In place: where an int8 convolution's only reader is another (through at most one ReLU, ReLU6
    or Hardtanh read by it alone) whose requantizer rounds plainly, the first writes the second's uint8
    codes (clamp, scale and rounding in its epilogue) and the activation node goes. Returns how many."""
    chained = 0
    for node in list(form.graph.nodes):
        if node.op != "call_module" or not isinstance(form.get_submodule(node.target), OneDNNInt8Conv2d):
            continue
        reader = form.get_submodule(node.target)
        source, low, high = node.args[0], -math.inf, math.inf
        activation = None
        if isinstance(source, fx.Node) and _clip(form, source) is not None and len(source.users) == 1:
            activation, (low, high) = source, _clip(form, source)
            source = source.args[0] if len(source.args) == 1 and not source.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        writer = form.get_submodule(source.target)
        if not isinstance(writer, OneDNNInt8Conv2d) or writer._output is not None:
            continue
        if not rounds_plainly(reader.requantizer):
            continue
        grid, s = reader.requantizer.grid, reader._x_scale
        low, high = max(low, grid.qmin * s), min(high, grid.qmax * s)
        if low > high:
            continue
        writer.emit_codes(low, high, reader)
        node.args = (source,)
        if activation is not None:
            form.graph.erase_node(activation)
        chained += 1
    return chained


__all__ = [
    "OneDNNInt8Conv2d",
    "chain_integer_convolutions",
    "fits",
    "integer_kernels_available",
    "one_pass_codes",
    "quantizes_in_one_pass",
    "rounds_plainly",
    "use_integer_kernels",
]
