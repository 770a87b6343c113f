"""ONNX export that onnxruntime runs on integer kernels (``student-int8.onnx``).

Written node by node from the student's inference form (``deploy.inference``: BatchNorm folded), in the
QuantizeLinear/DequantizeLinear ("QDQ") format that onnxruntime's optimizer fuses into ``QLinearConv``
and ``QLinearMatMul``:

* a quantized layer's input: ``QuantizeLinear`` to uint8 (signed grids shifted by a zero point) with
  the quantizer's scale, a ``Clip`` on the integers to the quantizer's grid (0..3 for 2 bits: the
  saturation stays on the 8-bit type, where the fusion still happens), then ``DequantizeLinear``:
  exactly the trained levels;
* its weight: ``DequantizeLinear`` of int8 integers with a per-output-channel scale (the folded
  BatchNorm's factor included; a negative factor flips the integers' sign); its bias: int32 on the
  scale ``s_input * s_weight``, as the fused kernel adds it;
* its output: onnxruntime fuses a convolution only when its output is quantized, so where the trained
  student keeps it in float (a residual branch before its addition) it gets an 8-bit
  ``QuantizeLinear``/``DequantizeLinear`` (uint8 around 128) with a step per channel calibrated on real
  images (largest magnitude seen / 127). This and the int32 bias are the approximations the trained
  student does not make (``build_int8_onnx`` without calibration leaves both in float, for OpenVINO);
  where the output only feeds the next layer's quantizer (through a ReLU, or a ReLU6 whose bound lies
  above the quantizer's top level) that quantizer is the output's quantization and nothing is added.

Everything else (the float first convolution and classifier, residual additions, pooling) is float, as
in the trained student. Mid-rise activations (odd multiples of s) have no uint8 form; read by a layer
without padding they are written minus s (multiples of 2s, ``Sub`` before the ``QuantizeLinear``) and
the layer's bias gains ``s * sum(w)``. A layer whose grid an 8-bit kernel cannot hold otherwise
(mid-rise inputs of padded convolutions, weights beyond int8) keeps the exact sub-byte form's float
arithmetic; the manifest says which kernel onnxruntime chose for every layer, read from its optimized
graph, and how well the export agrees with the trained student on as many real images again (not those
it was calibrated on).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, fx, nn
from torchvision.ops import StochasticDepth

from cmtkd_graph.deploy.inference import INTEGER_WEIGHT_TYPES, ActivationRequantizer, IntegerWeightLinear
from cmtkd_graph.deploy.int8_choice import fastest_float_layers, layer_kinds
from cmtkd_graph.errors import UserError
from cmtkd_graph.quantizers import Quantizer

OPSET = 21
INT8_KERNELS = {
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "MatMulInteger",
}
INT8_MAX = 127
KEPT_FLOAT = "float: the student timed faster with this kind of layer float (deploy.int8_choice)"


@dataclass
class _Builder:
    """The ONNX graph being written: nodes, initializers, and names of the FX values."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: dict = field(default_factory=dict)  # fx.Node -> ONNX value name
    count: int = 0
    float_epilogue: bool = False  # biases and unquantized outputs in float (see build_int8_onnx)
    shift_in_bias: set = field(default_factory=set)  # shifted requantizers whose -s a layer's bias holds
    shapes: dict = field(default_factory=dict)  # fx.Node -> its tensor's shape for one input image
    sizes: set = field(default_factory=set)  # names standing for x.size() and its parts (no ONNX value)
    shape_values: set = field(default_factory=set)  # 1-D int64 values read from x.shape (real values)
    keep_float: frozenset = frozenset()  # layers the export keeps float where they could be integer

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        return self.nodes_with_outputs(op, inputs, name, 1, **attributes)[0]

    def nodes_with_outputs(
        self, op: str, inputs: list[str], name: str, outputs: int, **attributes
    ) -> list[str]:
        if not all(isinstance(i, str) and i not in self.sizes for i in inputs):  # `x * 0.5`, a size
            raise UnwrittenOperation(f"{name} ({op} with a number operand)")
        self.count += 1
        names = [f"{name}:{op}:{self.count}" + (f":{k}" if outputs > 1 else "") for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"{name}/{op}_{self.count}", **attributes))
        return names


def _grid_type(grid) -> tuple[int, type, int] | None:
    """(ONNX type, numpy type, zero point) of the uint8 tensor holding ``grid``'s integers (signed grids
    shifted by a zero point: onnxruntime fuses a convolution only when its input and output have the same
    8-bit type, and uint8 is the one its x86 kernels take), or None."""
    if grid.step != 1 or grid.qmax - grid.qmin > 255:
        return None  # mid-rise: odd integers, no zero level
    return TensorProto.UINT8, np.uint8, -grid.qmin


def _exact_levels(b: _Builder, x: str, requantizer: ActivationRequantizer, name: str) -> str:
    """``x`` on the quantizer's grid as Q -> Clip -> DQ (see module docstring)."""
    quantizer, grid = requantizer.quantizer, requantizer.grid
    scale = float(requantizer.step)
    onnx_type = _grid_type(grid)
    if onnx_type is None or getattr(quantizer, "caffe_rounding", False):
        raise _NotInteger(f"{name}: its {grid.bits}-bit grid has no 8-bit form")
    _, np_type, zero = onnx_type
    s = b.constant(f"{name}.scale", np.array(scale, np.float32))
    z = b.constant(f"{name}.zero_point", np.array(zero, np_type))
    q = b.node("QuantizeLinear", [x, s, z], name)
    low = b.constant(f"{name}.qmin", np.array(grid.qmin + zero, np_type))
    high = b.constant(f"{name}.qmax", np.array(grid.qmax + zero, np_type))
    clipped = b.node("Clip", [q, low, high], name)
    return b.node("DequantizeLinear", [clipped, s, z], name)


def _shifted_mid_rise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A mid-rise requantizer (odd integers k, levels k s) whose only reader is an integer-weight layer
    without padding: its levels are written shifted by -s, ``(k - 1) / 2`` on the uint8 grid of step
    2s, and the layer adds ``s * sum(w)`` to its bias, exact where no padding meets a shifted zero."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, ActivationRequantizer) or module.grid.step != 2 or module.grid.bits > 8:
        return False
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,):
        return False
    layer = gm.get_submodule(users[0].target)
    if not isinstance(layer, INTEGER_WEIGHT_TYPES) or layer.integers.abs().max() > INT8_MAX:
        return False
    return isinstance(layer, IntegerWeightLinear) or not any(layer.padding)


def _shifted(b: _Builder, gm: fx.GraphModule, node: fx.Node) -> bool:
    """:func:`_shifted_mid_rise`, unless its reader is a layer the export keeps float."""
    return _shifted_mid_rise(gm, node) and next(iter(node.users)).target not in b.keep_float


def _shifted_levels(b: _Builder, x: str, requantizer: ActivationRequantizer, name: str) -> str:
    """Mid-rise levels minus s, ``2s * round((x - s) / 2s)`` clipped, as Sub -> Q -> Clip -> DQ (no Sub
    where the layer that writes ``x`` took the -s into its bias)."""
    grid, half = requantizer.grid, float(requantizer.step)
    kmin, kmax = (grid.qmin - 1) // 2, (grid.qmax - 1) // 2
    double = b.constant(f"{name}.double_scale", np.array(2 * half, np.float32))
    z = b.constant(f"{name}.zero_point", np.array(-kmin, np.uint8))
    if name not in b.shift_in_bias:
        x = b.node("Sub", [x, b.constant(f"{name}.scale", np.array(half, np.float32))], name)
    q = b.node("QuantizeLinear", [x, double, z], name)
    low = b.constant(f"{name}.qmin", np.array(0, np.uint8))
    high = b.constant(f"{name}.qmax", np.array(kmax - kmin, np.uint8))
    return b.node("DequantizeLinear", [b.node("Clip", [q, low, high], name), double, z], name)


class _NotInteger(Exception):
    """A layer that stays on float arithmetic (the reason is the message)."""


def _integer_weight(
    b: _Builder,
    layer,
    input_scale: float,
    name: str,
    input_levels: int,
    output_steps: Tensor | None,
    bias_shift: Tensor | None = None,
) -> tuple[str, str | None]:
    """DequantizeLinear of the int8 weight and of the int32 bias. A linear layer's weight is stored
    transposed (in x out, scale per column), the operand order of the MatMul onnxruntime fuses.

    The fused kernel adds the bias as integers on the scale ``s_input * s_weight``: with 2- or 4-bit
    grids that unit is coarse (a BatchNorm-folded bias would move by up to half of it in every output).
    So each channel's integers are multiplied by the largest m that keeps them within int8 (scale / m):
    the same weights, a bias m times finer. Where the input has more than 64 levels the integers stay
    within +-63, so that AVX2's pairwise 16-bit sums of uint8 x int8 products cannot saturate.
    """
    integers = layer.integers.to(torch.int64)
    scale = layer.scale.double()
    sign = torch.where(scale < 0, -1, 1)
    shape = (-1, *([1] * (integers.dim() - 1)))
    integers = integers * sign.view(shape)
    limit = INT8_MAX if input_levels <= 64 else 63
    largest = integers.reshape(len(scale), -1).abs().amax(dim=1).clamp(min=1)
    multiplier = (limit // largest).clamp(min=1)
    integers = integers * multiplier.view(shape)
    scale = (scale.abs() / multiplier.double()).clamp(min=1e-30)
    bias = None if layer.bias is None else layer.bias.detach().double()
    if bias_shift is not None:
        bias = bias_shift if bias is None else bias + bias_shift
    bias_integers = None  # on the scale the fused kernel adds it (s_input * s_weight), where it needs them
    if bias is not None and not b.float_epilogue:
        bias_integers = torch.round(bias / (scale * input_scale)).clamp(-(2**31), 2**31 - 1)
    if output_steps is not None:  # the layer's output in units of its channels' 8-bit steps
        scale = scale / output_steps.double()
    linear = isinstance(layer, nn.Linear)
    if linear:
        integers = integers.t()
    w = b.constant(f"{name}.weight_integers", integers.contiguous().numpy().astype(np.int8))
    ws = b.constant(f"{name}.weight_scale", scale.float().numpy())
    wz = b.constant(f"{name}.weight_zero_point", np.zeros(len(scale), np.int8))
    weight = b.node("DequantizeLinear", [w, ws, wz], name, axis=1 if linear else 0)
    if bias is None:
        return weight, None
    if b.float_epilogue:  # the runtime adds it in float after the int32 accumulation: exact
        return weight, b.constant(f"{name}.bias", bias.float().numpy())
    bias_scale = (scale * input_scale).float()
    bq = b.constant(f"{name}.bias_integers", bias_integers.numpy().astype(np.int32))
    bs = b.constant(f"{name}.bias_scale", bias_scale.numpy())
    bz = b.constant(f"{name}.bias_zero_point", np.zeros(len(scale), np.int32))
    return weight, b.node("DequantizeLinear", [bq, bs, bz], name, axis=0)


def _float_weight(b: _Builder, layer: nn.Module, name: str) -> tuple[str, str | None]:
    weight = b.constant(f"{name}.weight", layer.weight.detach().float().numpy())
    bias = None if layer.bias is None else b.constant(f"{name}.bias", layer.bias.detach().float().numpy())
    return weight, bias


def _conv_attributes(conv: nn.Conv2d | nn.Conv3d) -> dict:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UserError(f"int8 ONNX export: padding {conv.padding!r}/{conv.padding_mode} is not supported")
    return {
        "strides": list(conv.stride),
        "pads": list(conv.padding) * 2,  # every axis's start, then every axis's end
        "dilations": list(conv.dilation),
        "group": conv.groups,
        "kernel_shape": list(conv.kernel_size),
    }


def _layer(
    b: _Builder,
    module: nn.Module,
    x: str,
    name: str,
    input_scale: float | None,
    input_levels: int = 0,
    output_steps: Tensor | None = None,
    bias_shift: Tensor | None = None,
    rank: int = 2,
) -> str:
    """A conv or linear layer; integer weights when its input was quantized just before (its output
    divided by ``output_steps`` per channel, when given; ``bias_shift`` added to its bias). ``rank``:
    of the input (a linear layer on [B, ..., C] is a MatMul)."""
    integer = input_scale is not None and isinstance(module, INTEGER_WEIGHT_TYPES)
    if not integer and rank > 2 and isinstance(module, nn.Linear):  # on the last axis of [B, ..., C]
        return _matmul(b, x, module.weight, module.bias, name)
    if integer:
        weight, bias = _integer_weight(b, module, input_scale, name, input_levels, output_steps, bias_shift)
    else:
        weight, bias = _float_weight(b, module, name)
    inputs = [x, weight] + ([bias] if bias else [])
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        return b.node("Conv", inputs, name, **_conv_attributes(module))
    if integer:  # QLinearMatMul fusion: MatMul with the (transposed) weight, then the bias
        y = b.node("MatMul", [x, weight], name)
        return b.node("Add", [y, bias], name) if bias else y
    return b.node("Gemm", inputs, name, transB=1)


@dataclass
class Int8Plan:
    """What the export decided per quantized layer: integer or float, and the output's 8-bit scale."""

    integer: dict[str, str] = field(default_factory=dict)  # layer -> "" or why it stays float
    output_scales: dict[str, Tensor] = field(default_factory=dict)  # per output channel


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op == "call_function" and node.target in (F.relu, torch.relu)


def _only_quantizer(gm: fx.GraphModule, node: fx.Node) -> ActivationRequantizer | None:
    """The activation quantizer that is ``node``'s only reader, if it is one."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        module = gm.get_submodule(users[0].target)
        if isinstance(module, ActivationRequantizer):
            return module
    return None


def _redundant_clip(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU6/hardtanh(0, m) read only by an unsigned quantizer whose top level is below m: the
    quantizer's own saturation (at 0 and at its top level) already does what the clip does."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, nn.ReLU6 | nn.Hardtanh):
        return False
    low, high = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
    quantizer = _only_quantizer(gm, node)
    if quantizer is None or _grid_type(quantizer.grid) is None or low != 0.0:
        return False
    grid = quantizer.grid
    return grid.qmin == 0 and (grid.qmax + 0.5) * float(quantizer.step) <= high


def _requantized_by_next_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a layer's output reaches nothing but one activation quantizer (through a ReLU, or a clip
    that quantizer makes redundant)."""
    users = list(node.users)
    if len(users) == 1 and (_is_relu(gm, users[0]) or _redundant_clip(gm, users[0])):
        node = users[0]
    return _only_quantizer(gm, node) is not None


def _quantized_input(gm: fx.GraphModule, node: fx.Node) -> ActivationRequantizer | None:
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node) and source.op == "call_module":
        module = gm.get_submodule(source.target)
        if isinstance(module, ActivationRequantizer):
            return module
    return None


def calibrate(form: fx.GraphModule, images: Tensor) -> dict[str, Tensor]:
    """Largest magnitude of every conv/linear output channel on ``images`` (the 8-bit output scales)."""
    largest: dict[str, Tensor] = {}
    hooks = []
    for name, module in form.named_modules():
        if isinstance(module, nn.Conv2d | nn.Conv3d | nn.Linear):
            axis = -1 if isinstance(module, nn.Linear) else 1  # a linear layer's channels are the last axis

            def record(_m, _args, out, name=name, axis=axis):
                channels = out.detach().abs().movedim(axis, 0).flatten(1).amax(dim=1)
                largest[name] = torch.maximum(largest[name], channels) if name in largest else channels

            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            for batch in images.split(64):
                form(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return largest


def build_int8_onnx(
    form: fx.GraphModule,
    image_shape: tuple[int, ...],
    calibration: Tensor | None,
    *,
    keep_float: frozenset[str] = frozenset(),
    largest: dict[str, Tensor] | None = None,
) -> tuple[onnx.ModelProto, Int8Plan]:
    """The QDQ model of the inference form ``form`` for images of ``image_shape`` (C, H, W) and the
    per-layer plan; the layers named in ``keep_float`` compute in float even where they could run on an
    integer kernel (``deploy.int8_choice``: where that is measured faster). ``largest``: the
    calibration's result where the caller has it already.

    With ``calibration`` images (onnxruntime): outputs the trained student keeps in float get 8 bits
    per channel, and biases are int32 on the scale ``s_input * s_weight``, as its fused kernels need.
    Without (a runtime whose integer convolution ends in a float epilogue, as OpenVINO's does): those
    outputs and every bias stay float, so the only rounding is the trained student's own.
    """
    if largest is None and calibration is not None:
        largest = calibrate(form, calibration)
    shapes = tensor_shapes(form, image_shape)
    b = _Builder(float_epilogue=largest is None, shapes=shapes, keep_float=keep_float)
    plan = Int8Plan()
    checks = _assertions(form)
    for node in form.graph.nodes:
        if node not in checks:
            b.names[node] = _emit(b, form, node, plan, largest)
    output = next(n for n in form.graph.nodes if n.op == "output")
    result = output.args[0]
    rank = len(b.shapes[result])  # logits [B, classes] or, per pixel, [B, classes, H, W]
    graph = helper.make_graph(
        b.nodes,
        "student_int8",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *image_shape])],
        [helper.make_tensor_value_info(b.names[result], TensorProto.FLOAT, ["batch", *[None] * (rank - 1)])],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    _rename_output(model, "logits")
    onnx.checker.check_model(model, full_check=True)
    return model, plan


def _assertions(form: fx.GraphModule) -> set[fx.Node]:
    """The ``torch._assert`` calls (ViT's checks of its input's size and rank) and what only they read:
    the graph is written for one input size, so there is nothing left to check."""
    checks: set[fx.Node] = set()
    for node in reversed(form.graph.nodes):
        if node.target is torch._assert or (node.users and all(user in checks for user in node.users)):
            checks.add(node)
    return checks


def _rename_output(model: onnx.ModelProto, new: str) -> None:
    old = model.graph.output[0].name
    for n in model.graph.node:
        for i, name in enumerate(n.output):
            if name == old:
                n.output[i] = new
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    model.graph.output[0].name = new


def _emit(b: _Builder, gm: fx.GraphModule, node: fx.Node, plan: Int8Plan, largest: dict) -> str | None:
    args = [_onnx_value(b, a) for a in node.args]
    if node.op == "placeholder":
        return "images"
    if node.op == "output":
        return None
    if node.op == "get_attr":  # a parameter the graph uses as a tensor (ConvNeXt's layer scale)
        value = functools.reduce(getattr, node.target.split("."), gm)
        return b.constant(node.target, value.detach().float().numpy())
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        name = node.target
        if isinstance(module, ActivationRequantizer):
            if node.users and all(reader.target in b.keep_float for reader in node.users):
                return _float_levels(b, args[0], module, name)  # no QDQ pair for onnxruntime to fuse
            if _shifted(b, gm, node):
                return _shifted_levels(b, args[0], module, name)
            return _levels(b, args[0], module, name)
        if isinstance(module, nn.MultiheadAttention):
            return _self_attention(b, node, module, args, plan)
        if isinstance(module, nn.Conv2d | nn.Conv3d | nn.Linear):
            return _emit_layer(b, gm, node, module, args[0], plan, largest)
        if _redundant_clip(gm, node):
            return args[0]
        if isinstance(module, nn.ReLU6 | nn.Hardtanh):
            low, high = (0.0, 6.0) if isinstance(module, nn.ReLU6) else (module.min_val, module.max_val)
            lo = b.constant(f"{name}.min", np.array(low, np.float32))
            hi = b.constant(f"{name}.max", np.array(high, np.float32))
            return b.node("Clip", [args[0], lo, hi], name)
        if type(module) in _ELEMENTWISE:
            op, attributes = _ELEMENTWISE[type(module)]
            return b.node(op, [args[0]], name, **attributes)
        if isinstance(module, nn.MaxPool2d | nn.MaxPool3d | nn.AvgPool2d | nn.AvgPool3d):
            return _pool(b, _pool_options(module), args[0], name)
        if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d):
            return _adaptive_average(b, node, args[0], module.output_size)
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            return _batch_norm(b, module, args[0], name)
        if isinstance(module, nn.Flatten) and module.end_dim == -1:
            return b.node("Flatten", [args[0]], name, axis=module.start_dim)
        if isinstance(module, nn.Dropout | nn.Identity | StochasticDepth):  # identities in eval mode
            return args[0]
        if isinstance(module, nn.SiLU):  # x sigmoid(x)
            return b.node("Mul", [args[0], b.node("Sigmoid", [args[0]], name)], name)
        if isinstance(module, nn.GELU):
            return b.node("Gelu", [args[0]], name, approximate=module.approximate)
        if isinstance(module, nn.LayerNorm):
            return _layer_norm(
                b, args[0], module.normalized_shape, module.weight, module.bias, module.eps, name
            )
        raise UnwrittenOperation(f"{name} ({type(module).__name__})")
    if node.op == "call_function":
        target = node.target
        if target in _SIZE_ARITHMETIC and any(isinstance(a, str) and _is_size(b, a) for a in args):
            return _size_marker(b, node)  # e.g. ViT's (h // p) * (w // p), read by its reshape
        if (
            target in (operator.add, torch.add, operator.mul, torch.mul)
            and len(args) == 2
            and not node.kwargs
        ):
            return b.node("Add" if target in (operator.add, torch.add) else "Mul", args, node.name)
        if target in _FUNCTIONAL:
            op, attributes = _ELEMENTWISE[_FUNCTIONAL[target]]
            return b.node(op, [args[0]], node.name, **attributes)
        if target is torch.flatten and args[1:] in ([1], []) and not node.kwargs:
            return b.node("Flatten", [args[0]], node.name, axis=args[1] if len(args) > 1 else 0)
        if target in (F.adaptive_avg_pool2d, F.adaptive_avg_pool3d) and len(args) == 2 and not node.kwargs:
            return _adaptive_average(b, node, args[0], args[1])
        if target in _FUNCTIONAL_POOLS:  # Inception's F.avg_pool2d / F.max_pool2d
            options = _pool_options(node, args[1:], node.kwargs)
            return _pool(b, options, args[0], node.name)
        if target is F.dropout:
            return args[0]
        if target is torch.mean and _axes(node) is not None:  # S3D's mean over time and space
            return _mean(b, node, args[0])
        if target is operator.getitem and isinstance(args[0], list):  # one part of a chunk
            return args[0][args[1]]
        if (target is operator.getitem or target is operator.floordiv) and args[0] in b.sizes:
            return _size_marker(b, node)  # a part of x.size() (or channels // groups)
        if target is torch.transpose and len(args) == 3 and not node.kwargs:
            perm = list(range(len(b.shapes[node.args[0]])))
            perm[args[1]], perm[args[2]] = perm[args[2]], perm[args[1]]
            return b.node("Transpose", [args[0]], node.name, perm=perm)
        if target is torch.permute and len(args) == 2 and not node.kwargs:
            return b.node("Transpose", [args[0]], node.name, perm=list(args[1]))
        if target is F.layer_norm and not node.kwargs.keys() - {"weight", "bias", "eps"}:  # LayerNorm2d
            given = dict(zip(("x", "shape", "weight", "bias", "eps"), args, strict=False))
            given.update({k: _onnx_value(b, v) for k, v in node.kwargs.items()})
            return _layer_norm(
                b,
                given["x"],
                given["shape"],
                given.get("weight"),
                given.get("bias"),
                given.get("eps", 1e-5),
                node.name,
            )
        if target is torch.cat and not node.kwargs.keys() - {"dim"}:
            axis = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            return b.node("Concat", list(args[0]), node.name, axis=axis)
        if target is getattr and args[1] == "shape":
            return b.node("Shape", [args[0]], node.name)
        if target is operator.getitem and _is_shape(node.args[0]) and isinstance(args[1], slice | int):
            return _shape_part(b, node, args[0], args[1])
        if target is operator.getitem and isinstance(args[1], tuple):  # ViT's class token: x[:, 0]
            return _index(b, node, args[0], args[1])
        if target is F.interpolate:
            resized = _resize(b, node, args)
            if resized is not None:
                return resized
    if node.op == "call_method" and node.target == "flatten":
        start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        if start == 1 and node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1) == -1:
            return b.node("Flatten", [args[0]], node.name, axis=1)
    if node.op == "call_method" and node.target == "mean" and _axes(node) is not None:  # MNASNet's
        return _mean(b, node, args[0])
    if node.op == "call_method" and node.target == "size" and len(args) == 1 and not node.kwargs:
        return _size_marker(b, node)  # read by view/reshape below, whose output shape is known
    if node.op == "call_method" and node.target in ("view", "reshape") and not node.kwargs:
        return _reshape(b, node, args[0])
    if node.op == "call_method" and node.target == "expand" and not node.kwargs:  # ViT's class token
        return _expand(b, node, args)
    if node.op == "call_method" and node.target == "contiguous" and len(args) == 1:
        return args[0]
    if node.op == "call_method" and node.target == "chunk" and not node.kwargs.keys() - {"dim"}:
        return _chunk(b, node, args)
    if node.op == "call_method" and node.target == "permute" and not node.kwargs:
        perm = args[1] if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
        return b.node("Transpose", [args[0]], node.name, perm=list(perm))
    raise UnwrittenOperation(f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})")


# Elementwise activations: module type -> (ONNX operator, attributes); torch's functional forms map to them.
_ELEMENTWISE: dict[type, tuple[str, dict]] = {
    nn.ReLU: ("Relu", {}),
    nn.Hardswish: ("HardSwish", {}),
    nn.Hardsigmoid: ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),  # relu6(x + 3) / 6
    nn.Sigmoid: ("Sigmoid", {}),
}
_FUNCTIONAL = {
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    F.hardswish: nn.Hardswish,
    F.hardsigmoid: nn.Hardsigmoid,
    torch.sigmoid: nn.Sigmoid,
}


def _size_marker(b: _Builder, node: fx.Node) -> str:
    marker = f"{node.name}:size"
    b.sizes.add(marker)
    return marker


_SIZE_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub)


def _is_size(b: _Builder, name: str) -> bool:
    """Whether the value ``name`` is a size (a marker, or a part of a shape)."""
    return name in b.sizes or name in b.shape_values


def _expand(b: _Builder, node: fx.Node, args: list) -> str:
    """``t.expand(n, -1, ...)`` with ``n`` the batch read from a shape: ONNX ``Expand`` broadcasts, so
    a kept size (-1) is 1 there and the batch is the value read at run time."""
    sizes = list(args[1]) if len(args) == 2 and isinstance(args[1], list | tuple) else args[1:]
    parts = []
    for i, size in enumerate(sizes):
        if isinstance(size, str) and size in b.shape_values:
            parts.append(size)
        elif isinstance(size, int):
            parts.append(b.constant(f"{node.name}.{i}", np.array([1 if size == -1 else size], np.int64)))
        else:
            raise UnwrittenOperation(f"{node.name} (expand to a size computed from the input)")
    return b.node("Expand", [args[0], b.node("Concat", parts, node.name, axis=0)], node.name)


def _index(b: _Builder, node: fx.Node, x: str, index: tuple) -> str:
    """``x[:, ..., i]``: whole axes, then one integer position (a ``Gather``, which drops that axis)."""
    *whole, position = index
    if not isinstance(position, int) or any(part != slice(None) for part in whole):
        raise UnwrittenOperation(f"{node.name} (indexing other than x[:, ..., i])")
    at = b.constant(f"{node.name}.index", np.array(position, np.int64))
    return b.node("Gather", [x, at], node.name, axis=len(whole))


def _reshape(b: _Builder, node: fx.Node, x: str) -> str:
    """``x.view(...)`` / ``x.reshape(...)`` (ShuffleNet's channel shuffle): the output shape recorded on
    one image, its batch axis copied from the input (``Reshape``'s 0), which needs the batch to stay the
    first axis: the first size given is ``x.size(0)`` of a tensor with the same batch."""
    first = node.args[1] if len(node.args) > 1 else None
    if isinstance(first, list | tuple):
        first = first[0] if first else None
    batch_kept = (
        isinstance(first, fx.Node)
        and first.target is operator.getitem
        and first.args[1] == 0
        and isinstance(first.args[0], fx.Node)
        and (
            (first.args[0].op == "call_method" and first.args[0].target == "size") or _is_shape(first.args[0])
        )
    )
    if not batch_kept:
        raise UnwrittenOperation(f"{node.name} ({node.target} not keeping the batch as its first axis)")
    shape = np.array([0, *b.shapes[node][1:]], np.int64)
    return b.node("Reshape", [x, b.constant(f"{node.name}.shape", shape)], node.name)


def _chunk(b: _Builder, node: fx.Node, args: list) -> list[str]:
    """``x.chunk(n, dim)`` into equal parts as ``Split``: the list of its outputs (getitem picks one)."""
    parts = args[1] if len(args) > 1 else node.kwargs.get("chunks")
    dim = node.kwargs.get("dim", args[2] if len(args) > 2 else 0)
    size = b.shapes[node.args[0]][dim]
    if not isinstance(parts, int) or size % parts:
        raise UnwrittenOperation(f"{node.name} (chunk into unequal parts)")
    split = b.constant(f"{node.name}.split", np.full(parts, size // parts, np.int64))
    return b.nodes_with_outputs("Split", [args[0], split], node.name, parts, axis=dim)


def _layer_norm(b: _Builder, x: str, shape, weight, bias, eps: float, name: str) -> str:
    """``LayerNormalization`` over the last ``len(shape)`` axes; ``weight``/``bias``: a parameter, the
    ONNX name of one (``F.layer_norm``'s from the graph), or None (ones and zeros)."""

    def value(v, fill: float, role: str) -> str:
        if isinstance(v, str):
            return v
        array = np.full(tuple(shape), fill, np.float32) if v is None else v.detach().float().numpy()
        return b.constant(f"{name}.{role}", array)

    scale, offset = value(weight, 1.0, "weight"), value(bias, 0.0, "bias")
    return b.node("LayerNormalization", [x, scale, offset], name, axis=-len(shape), epsilon=float(eps))


def _mean(b: _Builder, node: fx.Node, x: str) -> str:
    """``torch.mean(x, dim, keepdim)`` (or ``x.mean(dim)``) as ``ReduceMean``."""
    axes = b.constant(f"{node.name}.axes", np.array(_axes(node), np.int64))
    return b.node("ReduceMean", [x, axes], node.name, keepdims=int(node.kwargs.get("keepdim", False)))


def _axes(node: fx.Node) -> list[int] | None:
    """The axes of ``torch.mean(x, dim)`` (None: a form the writer does not take)."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if node.kwargs.keys() - {"dim", "keepdim"} or len(node.args) > 2 or dim is None:
        return None
    return [dim] if isinstance(dim, int) else list(dim)


def _onnx_value(b: _Builder, arg):
    """A node argument as the writer passes it on: a node's ONNX value name, lists element by element."""
    if isinstance(arg, fx.Node):
        return b.names[arg]
    if isinstance(arg, list | tuple):
        return type(arg)(_onnx_value(b, a) for a in arg)
    return arg


def _is_shape(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr


def _shape_part(b: _Builder, node: fx.Node, shape: str, index: slice | int) -> str:
    """``x.shape[index]`` as a 1-D int64 tensor: the input's size is fixed but for its batch, so sizes
    that leave the batch out are constants (as torch's own exporter folds them: onnxruntime's optimizer
    then has nothing to infer), the others are sliced from the ``Shape`` at run time."""
    whole = b.shapes[node.args[0].args[0]]
    positions = range(len(whole))[index] if isinstance(index, slice) else [range(len(whole))[index]]
    if 0 not in positions:
        value = b.constant(f"{node.name}.value", np.array([whole[i] for i in positions], np.int64))
    elif isinstance(index, int):  # the batch (ViT's n = x.shape[0]): read by a reshape or an expand
        value = b.node("Slice", [shape, *_range_constants(b, node.name, 0, 1)], node.name)
    elif index.step not in (None, 1):
        raise UnwrittenOperation(f"{node.name} (a strided part of a shape)")
    else:
        stop = np.iinfo(np.int64).max if index.stop is None else index.stop
        value = b.node("Slice", [shape, *_range_constants(b, node.name, index.start or 0, stop)], node.name)
    b.shape_values.add(value)
    return value


def _range_constants(b: _Builder, name: str, start: int, stop: int) -> tuple[str, str]:
    """The ``starts`` and ``ends`` inputs of a ``Slice`` of a 1-D tensor."""
    return (
        b.constant(f"{name}.start", np.array([start], np.int64)),
        b.constant(f"{name}.stop", np.array([stop], np.int64)),
    )


def tensor_shapes(form: fx.GraphModule, image_shape: tuple[int, ...]) -> dict[fx.Node, tuple[int, ...]]:
    """The shape of every tensor of ``form`` on one input of ``image_shape``."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            value = super().run_node(n)
            if isinstance(value, Tensor):
                shapes[n] = tuple(value.shape)
            return value

    with torch.no_grad():
        Recorder(form).run(torch.zeros(1, *image_shape))
    return shapes


def _resize(b: _Builder, node: fx.Node, args: list) -> str | None:
    """``F.interpolate(x, size=..., mode="bilinear" | "nearest")`` of a 4-D map as ONNX ``Resize`` over
    its two spatial axes, with torch's coordinate rules (None: another form, refused by the caller)."""
    options = {**dict(zip(("size", "scale_factor", "mode", "align_corners"), args[1:], strict=False))}
    options.update({k: _onnx_value(b, v) for k, v in node.kwargs.items()})
    mode, corners = options.get("mode", "nearest"), bool(options.get("align_corners"))
    size = options.get("size")
    if options.get("scale_factor") is not None or options.get("antialias") or size is None:
        return None
    if mode == "bilinear":
        rule = {
            "mode": "linear",
            "coordinate_transformation_mode": "align_corners" if corners else "pytorch_half_pixel",
        }
    elif mode == "nearest":
        rule = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        return None
    if isinstance(size, int):
        size = [size, size]
    if isinstance(size, list | tuple):  # numbers written in the graph (sizes read one by one: refused)
        if not all(isinstance(v, int) for v in size):
            return None
        size = b.constant(f"{node.name}.size", np.array(size, np.int64))
    # [batch, channels] of the input, then the size: onnxruntime's quantized-graph rewrites lose
    # Resize's `axes` attribute, so the sizes cover every axis
    first = b.node(
        "Slice", [b.node("Shape", [args[0]], node.name), *_range_constants(b, node.name, 0, 2)], node.name
    )
    sizes = b.node("Concat", [first, size], node.name, axis=0)
    return b.node("Resize", [args[0], "", "", sizes], node.name, **rule)


class UnwrittenOperation(UserError):
    """An operation the int8 writer does not write; ``what`` names it (the node and why)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"int8 ONNX export: {what} is not one of the operations it writes (conv, linear, ReLU/ReLU6, "
            "Hardswish/Hardsigmoid/Sigmoid/SiLU/GELU, layer norm, add, mul, concat, permute, transpose, "
            "view/reshape keeping the batch, chunk, bilinear/nearest resize to a size, "
            "max/average/global-average pooling, adaptive average pooling with equal windows, batch norm, "
            "mean over axes, flatten, self-attention; 2-D and 3-D); "
            "export --format onnx (exact Q/DQ) instead"
        )
        self.what = what


def _one_by_one(size) -> bool:
    """An adaptive pooling's output size of a single position (global pooling), 2-D or 3-D."""
    return size == 1 or (isinstance(size, tuple | list) and all(s == 1 for s in size))


_FUNCTIONAL_POOLS = {  # function -> (the module whose arguments it takes, in order)
    F.max_pool2d: nn.MaxPool2d,
    F.avg_pool2d: nn.AvgPool2d,
    F.max_pool3d: nn.MaxPool3d,
    F.avg_pool3d: nn.AvgPool3d,
}
_POOL_ARGUMENTS = {  # the positional arguments after the input, as torch.nn.functional orders them
    "max": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
}


@dataclass(frozen=True)
class _PoolOptions:
    kind: str  # "max" or "avg"
    dims: int
    kernel_size: object
    stride: object = None
    padding: object = 0
    dilation: object = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    return_indices: bool = False


def _pool_options(
    source: nn.Module | fx.Node, args: list | None = None, kwargs: dict | None = None
) -> _PoolOptions:
    """A pooling's options from its module, or from a functional call's arguments."""
    cls = type(source) if isinstance(source, nn.Module) else _FUNCTIONAL_POOLS[source.target]
    kind = "max" if cls in (nn.MaxPool2d, nn.MaxPool3d) else "avg"
    dims = 3 if cls in (nn.MaxPool3d, nn.AvgPool3d) else 2
    names = _POOL_ARGUMENTS[kind]
    if isinstance(source, nn.Module):
        given = {n: getattr(source, n) for n in names}
    else:
        given = {**dict(zip(names, args, strict=False)), **kwargs}
    return _PoolOptions(kind, dims, **given)


def _pool(b: _Builder, pool: _PoolOptions, x: str, name: str) -> str:
    """A max or average pooling (2-D or 3-D) as ONNX ``MaxPool`` / ``AveragePool``."""
    axes = lambda v: list(v) if isinstance(v, tuple | list) else [v] * pool.dims
    attributes = {
        "kernel_shape": axes(pool.kernel_size),
        "strides": axes(pool.stride or pool.kernel_size),
        "pads": axes(pool.padding) * 2,
        "ceil_mode": int(pool.ceil_mode),
    }
    if pool.return_indices:
        raise UnwrittenOperation(f"{name} (a max pooling returning its indices)")
    if pool.kind == "max":
        return b.node("MaxPool", [x], name, dilations=axes(pool.dilation), **attributes)
    if pool.divisor_override is not None or (
        pool.ceil_mode and pool.count_include_pad and any(attributes["pads"])
    ):
        # torch divides a window that ceil_mode lets run past the padding by its clipped size, which
        # OpenVINO's AveragePool does not (onnxruntime does)
        raise UnwrittenOperation(
            f"{name} (an average pooling with divisor_override, or ceil_mode over padding)"
        )
    return b.node("AveragePool", [x], name, count_include_pad=int(pool.count_include_pad), **attributes)


def _adaptive_average(b: _Builder, node: fx.Node, x: str, output_size) -> str:
    """An adaptive average pooling: global where it has one position; else, where every output size
    divides its input size, the fixed pooling it then is (windows of input / output, as many strides;
    nothing where they are equal: AlexNet's and VGG's 6x6 and 7x7 at 224)."""
    if _one_by_one(output_size):
        return b.node("GlobalAveragePool", [x], node.name)
    inputs = b.shapes[node.args[0]][2:]
    outputs = output_size if isinstance(output_size, tuple | list) else [output_size] * len(inputs)
    outputs = [i if o is None else o for i, o in zip(inputs, outputs, strict=True)]
    if any(o > i for i, o in zip(inputs, outputs, strict=True)):
        raise UnwrittenOperation(
            f"{node.name} (an adaptive pooling from {list(inputs)} up to {list(outputs)})"
        )
    if any(i % o for i, o in zip(inputs, outputs, strict=True)):
        raise UnwrittenOperation(
            f"{node.name} (an adaptive pooling from {list(inputs)} to {list(outputs)}: windows vary)"
        )
    if list(inputs) == list(outputs):
        return x
    kernel = [i // o for i, o in zip(inputs, outputs, strict=True)]
    return b.node("AveragePool", [x], node.name, kernel_shape=kernel, strides=kernel)


def _batch_norm(b: _Builder, norm: nn.Module, x: str, name: str) -> str:
    """A BatchNorm the inference form could not fold into a convolution (DenseNet's, which reads a
    concatenation), with its running statistics, as ONNX ``BatchNormalization``."""
    if norm.running_mean is None:
        raise UnwrittenOperation(f"{name} (a BatchNorm without running statistics)")
    channels = norm.num_features
    ones, zeros = torch.ones(channels), torch.zeros(channels)
    inputs = [x]
    for part, value in (
        ("weight", norm.weight if norm.affine else ones),
        ("bias", norm.bias if norm.affine else zeros),
        ("mean", norm.running_mean),
        ("var", norm.running_var),
    ):
        inputs.append(b.constant(f"{name}.{part}", value.detach().float().numpy()))
    return b.node("BatchNormalization", inputs, name, epsilon=float(norm.eps))


def _levels(b: _Builder, x: str, requantizer: ActivationRequantizer, name: str) -> str:
    """An activation quantizer's levels: on the 8-bit grid where it has one, else computed in float."""
    try:
        return _exact_levels(b, x, requantizer, name)
    except _NotInteger:
        return _float_levels(b, x, requantizer, name)


ATTENTION_IN_FLOAT = "attention is written in float (its projections are not put on integer kernels yet)"


def _self_attention(
    b: _Builder, node: fx.Node, mha: nn.MultiheadAttention, args: list, plan: Int8Plan
) -> list:
    """Batched self-attention (ViT's ``nn.MultiheadAttention``, or its quantized twin with its decoded
    weights and the output projection's input quantizer) as the ops of ``scaled_dot_product_attention``:
    the input projection, heads split, softmax(q k^T / sqrt(d)) v, heads joined, the output projection.
    The matrix products are float: a quantized twin's projections compute with its decoded weights."""
    name = node.target
    x = args[0]
    if not (len(args) >= 3 and args[0] == args[1] == args[2]) or not mha.batch_first:
        raise UnwrittenOperation(f"{name} (attention other than batch-first self-attention)")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnwrittenOperation(f"{name} (attention with separate or extra key/value projections)")
    options = {k: v for k, v in node.kwargs.items() if k != "need_weights"}
    if options or len(args) > 3:
        raise UnwrittenOperation(f"{name} (attention with a mask)")
    quantized = hasattr(mha, "in_proj_weight_quantizer")
    if quantized:
        plan.integer[name] = ATTENTION_IN_FLOAT
    in_weight = mha.in_proj_weight_quantizer(mha.in_proj_weight) if quantized else mha.in_proj_weight
    tokens, dim = b.shapes[node.args[0]][1:]
    heads = mha.num_heads
    qkv = _matmul(b, x, in_weight, mha.in_proj_bias, f"{name}.in_proj")
    shape = b.constant(f"{name}.heads", np.array([0, tokens, 3, heads, dim // heads], np.int64))
    qkv = b.node("Transpose", [b.node("Reshape", [qkv, shape], name)], name, perm=[2, 0, 3, 1, 4])
    q, k, v = (
        b.node("Gather", [qkv, b.constant(f"{name}.{part}", np.array(i, np.int64))], name, axis=0)
        for i, part in enumerate("qkv")
    )
    scale = b.constant(f"{name}.scale", np.array(1 / np.sqrt(dim // heads), np.float32))
    scores = b.node(
        "Mul", [b.node("MatMul", [q, b.node("Transpose", [k], name, perm=[0, 1, 3, 2])], name), scale], name
    )
    out = b.node("MatMul", [b.node("Softmax", [scores], name, axis=-1), v], name)
    out = b.node("Transpose", [out], name, perm=[0, 2, 1, 3])
    out = b.node("Reshape", [out, b.constant(f"{name}.join", np.array([0, tokens, dim], np.int64))], name)
    projection = mha.out_proj
    quantizer = getattr(projection, "input_quantizer", None)  # the twin's own (not a graph node)
    if isinstance(quantizer, Quantizer):
        out = _levels(b, out, ActivationRequantizer(quantizer), f"{name}.out_proj.input_quantizer")
    weight = projection.weight_quantizer(projection.weight) if quantized else projection.weight
    return [_matmul(b, out, weight, projection.bias, f"{name}.out_proj"), None]  # (output, weights)


def _matmul(b: _Builder, x: str, weight: Tensor, bias: Tensor | None, name: str) -> str:
    """``F.linear`` on the last axis of an N-D ``x`` in float: MatMul by the transposed weight, plus bias."""
    w = b.constant(f"{name}.weight_t", weight.detach().float().t().contiguous().numpy())
    out = b.node("MatMul", [x, w], name)
    if bias is None:
        return out
    return b.node("Add", [out, b.constant(f"{name}.bias", bias.detach().float().numpy())], name)


def _float_levels(b: _Builder, x: str, requantizer: ActivationRequantizer, name: str) -> str:
    """The levels computed in float, as Round and Clip: for a grid without an 8-bit form (mid-rise), or
    read only by layers the export keeps float (round half to even, as QuantizeLinear rounds)."""
    grid, scale = requantizer.grid, float(requantizer.step)
    half = b.constant(f"{name}.scale", np.array(scale, np.float32))
    caffe = getattr(requantizer.quantizer, "caffe_rounding", False)
    if grid.step == 1 and not caffe:  # integers: round(x / s)
        k = b.node("Round", [b.node("Div", [x, half], name)], name)
        lo = b.constant(f"{name}.qmin", np.array(grid.qmin, np.float32))
        hi = b.constant(f"{name}.qmax", np.array(grid.qmax, np.float32))
        return b.node("Mul", [b.node("Clip", [k, lo, hi], name), half], name)
    if grid.step == 2:  # odd integers: 2 round((x - s) / 2s) + 1, clipped
        double = b.constant(f"{name}.double_scale", np.array(2 * scale, np.float32))
        k = b.node("Round", [b.node("Div", [b.node("Sub", [x, half], name), double], name)], name)
        lo = b.constant(f"{name}.kmin", np.array((grid.qmin - 1) // 2, np.float32))
        hi = b.constant(f"{name}.kmax", np.array((grid.qmax - 1) // 2, np.float32))
        return b.node("Add", [b.node("Mul", [b.node("Clip", [k, lo, hi], name), double], name), half], name)
    raise UserError(f"int8 ONNX export: {name}: its grid has no exact form here (caffe rounding)")


def _emit_layer(
    b: _Builder, gm: fx.GraphModule, node: fx.Node, module: nn.Module, x: str, plan: Int8Plan, largest: dict
) -> str:
    name = node.target
    rank = len(b.shapes.get(node.args[0], ()))
    requantizer = _quantized_input(gm, node)
    input_scale = None
    shifted = requantizer is not None and _shifted(b, gm, node.args[0])
    if requantizer is not None and isinstance(module, INTEGER_WEIGHT_TYPES):
        if name in b.keep_float:
            plan.integer[name] = KEPT_FLOAT
        elif shifted:  # the input is its levels minus s on a grid of step 2s (see _shifted_mid_rise)
            input_scale = 2 * float(requantizer.step)
            plan.integer[name] = ""
        elif _grid_type(requantizer.grid) is None:
            plan.integer[name] = f"its {requantizer.grid.bits}-bit input grid (mid-rise) has no 8-bit form"
        elif module.integers.abs().max() > INT8_MAX:
            plan.integer[name] = "its weight integers do not fit int8"
        else:
            input_scale = float(requantizer.step)
            plan.integer[name] = ""
    if input_scale is None:  # float arithmetic (decoded weights where they are quantized)
        return _layer(b, module, x, name, None, rank=rank)
    grid = requantizer.grid
    levels = (grid.qmax - grid.qmin) // grid.step + 1
    shift = None
    if shifted:  # what the shifted input lacks: s times the sum of each output channel's weights
        weight = module.weight.detach().double()
        shift = float(requantizer.step) * weight.sum(dim=tuple(range(1, weight.dim())))
    if largest is None or _requantized_by_next_layer(gm, node):
        readers = list(node.users)
        if len(readers) == 1 and _shifted(b, gm, reader := readers[0]):
            # its only reader subtracts s before quantizing (_shifted_levels): the bias does it instead,
            # so that the Conv -> QuantizeLinear pair stays one QLinearConv in onnxruntime
            step = float(gm.get_submodule(reader.target).step)
            minus_s = torch.full((module.integers.shape[0],), -step, dtype=torch.float64)
            shift = minus_s if shift is None else shift + minus_s
            b.shift_in_bias.add(reader.target)
        return _layer(b, module, x, name, input_scale, levels, bias_shift=shift, rank=rank)
    # The output gets 8 bits per channel: QLinearConv's output scale is one number, so channel c's
    # float output is divided by its step inside the layer (weight and bias scales), quantized with
    # scale 1, and a DequantizeLinear (scale 1) and a Mul by the steps bring the channels back.
    steps = output_steps(largest[name])
    plan.output_scales[name] = steps
    y = _layer(b, module, x, name, input_scale, levels, steps, bias_shift=shift, rank=rank)
    one = b.constant(f"{name}.output_scale", np.array(1.0, np.float32))
    zero = b.constant(f"{name}.output_zero_point", np.array(128, np.uint8))
    q = b.node("QuantizeLinear", [y, one, zero], name)
    integers = b.node("DequantizeLinear", [q, one, zero], name)
    # Not one per-axis DequantizeLinear: onnxruntime runs that 3x slower than these two together
    # (its profile of mobilenet_v2 LSQ W4A4 at batch 16: 226 ms against 69 + 39 ms)
    spatial = [1] * (module.weight.dim() - 2)  # a convolution's spatial axes (none for a linear layer)
    step = b.constant(f"{name}.output_steps", steps.numpy().reshape(1, -1, *spatial))
    return b.node("Mul", [integers, step], name)


def output_steps(largest: Tensor) -> Tensor:
    """Each output channel's 8-bit step: its largest magnitude on the calibration images over 127 (a
    channel that stayed near zero there gets a step no finer than 1/10,000 of the layer's largest)."""
    floor = max(float(largest.max()), 1e-12) / INT8_MAX * 1e-4
    return (largest.double() / INT8_MAX).clamp(min=floor).float()


def session(path: Path | str | bytes, *, optimized: Path | None = None, threads: int = 0):
    """An onnxruntime CPU session of a file (or a serialized model: ``bytes``); ``optimized``: also write
    the graph onnxruntime will run."""
    import onnxruntime as ort  # here: the OpenVINO export uses this module without it

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def kernels(optimized: onnx.ModelProto, layers: list[str]) -> dict[str, str]:
    """Per layer, the operator onnxruntime's optimized graph runs it with (nodes keep the layer's name)."""
    plumbing = {"QuantizeLinear", "DequantizeLinear", "Clip", "Transpose"}
    found: dict[str, str] = {}
    for n in optimized.graph.node:
        if n.op_type in plumbing:
            continue
        for layer in layers:
            if n.name.startswith(f"{layer}/") and (layer not in found or n.op_type in INT8_KERNELS):
                found[layer] = n.op_type
    return found


AGREEMENT_BOUND = 0.99
"""Least top-1 agreement with the trained student (on the export's check images) for ``predict`` to
choose the int8 model on its own."""


def agreement(student: fx.GraphModule, images: Tensor, logits: np.ndarray) -> dict:
    """How an integer export's ``logits`` on ``images`` agree with the trained ``student``: the manifest's
    top1_agreement, max_abs_diff, usable (at least ``AGREEMENT_BOUND``) and why."""
    with torch.no_grad():
        expected = student(images).numpy()
    top1 = float((logits.argmax(1) == expected.argmax(1)).mean())
    usable = top1 >= AGREEMENT_BOUND
    why = f"top-1 agreement {100 * top1:.1f}% with the trained student on {len(images)} images"
    if not usable:
        why += f", below the {100 * AGREEMENT_BOUND:.0f}% bound: predict does not choose it"
    return {
        "top1_agreement": top1,
        "max_abs_diff": float(np.abs(logits - expected).max()),
        "usable": usable,
        "why": why,
    }


def export_int8_onnx(
    student: fx.GraphModule,
    records: list[dict],
    path: Path,
    *,
    calibration: Tensor,
    check: Tensor,
    source: str,
    form: fx.GraphModule | None = None,
    layers: str = "fastest",
) -> dict:
    """Write ``path`` from the trained ``student``; add each layer's kernel to its manifest record; return
    the manifest's ``onnx_int8`` section (kernels from onnxruntime's optimized graph, agreement).
    ``form``: the student's inference form where the caller has it already. ``layers``: ``fastest``
    (which layers run integer is timed here, ``deploy.int8_choice``) or ``every`` (each layer that can)."""
    import onnxruntime as ort

    from cmtkd_graph.deploy.inference import inference_form

    form = inference_form(student) if form is None else form
    shape, largest = tuple(check.shape[1:]), calibrate(form, calibration)
    model, plan = build_int8_onnx(form, shape, calibration, largest=largest)
    timing = {"chosen_by": "every layer that can be integer is (--int8-layers every)"}
    if layers == "fastest":
        every_integer = model

        def build(keep: frozenset[str]):  # a session of the variant (rebuilt, not kept: memory)
            variant = every_integer
            if keep:
                variant = build_int8_onnx(form, shape, calibration, keep_float=keep, largest=largest)[0]
            return session(variant.SerializeToString())

        kinds = layer_kinds(form, plan.integer, tensor_shapes(form, shape))
        keep, timing = fastest_float_layers(build, kinds, check.numpy())
        if keep:
            model, plan = build_int8_onnx(form, shape, calibration, keep_float=keep, largest=largest)
    onnx.save(model, str(path))
    optimized_file = path.with_suffix(".optimized.onnx")
    try:
        runner = session(path, optimized=optimized_file)
        used = kernels(onnx.load(str(optimized_file)), list(plan.integer))
    finally:
        optimized_file.unlink(missing_ok=True)
    for record in records:
        name = record["name"]
        if name not in plan.integer:
            continue
        why = plan.integer[name]
        record["onnx_int8"] = {
            "kernel": used.get(name, "?"),
            "integer": used.get(name) in INT8_KERNELS,
            "why": why
            or (
                "8-bit output calibrated"
                if name in plan.output_scales
                else "output requantized by the next layer's quantizer"
            ),
        }
    (got,) = runner.run(None, {"images": check.numpy()})
    integer_layers = sum(1 for name in plan.integer if used.get(name) in INT8_KERNELS)
    return {
        "file": path.name,
        "opset": OPSET,
        "runtime": ort.__version__,
        "calibration": f"{len(calibration)} images of {source}",
        "check_images": len(check),
        **agreement(student, check, got),
        "integer_layers": integer_layers,
        "quantized_layers": len(plan.integer),
        "layer_choice": timing,
        "calibrated_outputs": len(plan.output_scales),
        "bytes": path.stat().st_size,
    }


__all__ = [
    "AGREEMENT_BOUND",
    "Int8Plan",
    "agreement",
    "build_int8_onnx",
    "calibrate",
    "export_int8_onnx",
    "kernels",
    "session",
]
