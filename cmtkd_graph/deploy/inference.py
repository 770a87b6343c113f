"""The student's inference form: what the trained student computes, without the training machinery.

Three in-place passes over a copy of the student, each a small function over the graph:

* ``decode_weights``: every weight quantizer runs once, now. A quantized conv/linear layer becomes an
  :class:`IntegerWeightConv2d` / :class:`IntegerWeightConv3d` / :class:`IntegerWeightLinear`, a plain
  float layer whose weight is its
  integer codes times a per-output-channel scale, kept beside it (``integers``, ``scale``) for the
  integer exports. Other layers with quantized weights (attention) get their decoded weights as
  constants.
* ``fold_batchnorm``: a BatchNorm (2-D or, after a 3-D convolution, 3-D) whose only input is a
  convolution called once, and which is that
  convolution's only reader, is folded into it: ``scale *= gamma / sqrt(var + eps)``, the bias becomes
  ``beta + (bias - mean) * gamma / sqrt(var + eps)``. The integer codes do not change.
* ``requantize_activations``: every activation quantizer becomes an :class:`ActivationRequantizer`,
  the quantizer's own integer mapping times its (now constant) scale, with no autograd wrapper.

Weights and activations stay exactly the trained student's levels; only BatchNorm's folding reorders
float arithmetic, so an activation within float rounding of a quantizer's decision boundary can take
the neighbouring level. ``tests/test_deploy.py`` states the agreement on real images. On x86
CPUs ``deploy.onednn_int8`` then puts the quantized convolutions on oneDNN's int8 kernels, and
``load_student`` gives a max pooling a channels-last input where that is timed faster here
(:func:`pools_faster_in_channels_last`, :func:`pool_in_channels_last`).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, fx, nn

from cmtkd_graph.passes.graph_pass import finish
from cmtkd_graph.passes.tracer import copy_graph_module, replace_submodule
from cmtkd_graph.quantizers import Quantizer
from cmtkd_graph.quantizers.base import IntegerGrid
from cmtkd_graph.quantizers.layers import QuantConv2d, QuantConv3d, QuantLinear, conv_arguments

WEIGHT_QUANTIZER = "weight_quantizer"
INPUT_QUANTIZER = "input_quantizer"


class _IntegerWeights:
    """What both integer-weight layers hold: ``weight == integers * scale`` (per output channel)."""

    integers: Tensor  # int32, the weight's shape
    scale: Tensor  # float32, (C_out,)
    grid: IntegerGrid

    def _set_integer_weight(self, integers: Tensor, scale: Tensor, grid: IntegerGrid) -> None:
        self.grid = grid
        self.register_buffer("integers", integers.to(torch.int32))
        self.register_buffer("scale", scale.reshape(-1).float().expand(integers.shape[0]).clone())
        self.update_weight()

    def update_weight(self) -> None:
        """``weight`` from ``integers`` and ``scale`` (after folding changed the scale)."""
        shape = (-1,) + (1,) * (self.integers.dim() - 1)
        weight = self.integers.float() * self.scale.view(shape)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, integers {self.grid.qmin}..{self.grid.qmax}"


class _IntegerWeightConv(_IntegerWeights):
    """What the integer-weight convolutions share: built from a quantized twin."""

    @classmethod
    def from_quantized(cls, layer: QuantConv2d | QuantConv3d) -> _IntegerWeightConv:
        new = cls(**conv_arguments(layer), bias=layer.bias is not None, device="meta")
        _take_quantized(new, layer)
        return new


class IntegerWeightConv2d(_IntegerWeightConv, nn.Conv2d):
    """A convolution whose weight is integer codes times a per-output-channel scale, decoded once."""


class IntegerWeightConv3d(_IntegerWeightConv, nn.Conv3d):
    """:class:`IntegerWeightConv2d` over clips (video models' 3-D convolutions)."""


class IntegerWeightLinear(_IntegerWeights, nn.Linear):
    """A linear layer whose weight is integer codes times a per-output-channel scale, decoded once."""

    @classmethod
    def from_quantized(cls, layer: QuantLinear) -> IntegerWeightLinear:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        _take_quantized(new, layer)
        return new


INTEGER_WEIGHT_LAYERS: dict[type[nn.Module], type[_IntegerWeights]] = {
    QuantConv2d: IntegerWeightConv2d,
    QuantConv3d: IntegerWeightConv3d,
    QuantLinear: IntegerWeightLinear,
}
"""Quantized layer type -> its integer-weight form."""
INTEGER_WEIGHT_TYPES = tuple(INTEGER_WEIGHT_LAYERS.values())


@torch.no_grad()
def _take_quantized(new: _IntegerWeights, layer: QuantConv2d | QuantConv3d | QuantLinear) -> None:
    integer = layer.weight_quantizer.to_integers(layer.weight)
    new._set_integer_weight(integer.q, integer.scale, integer.grid)
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
    quantizer = getattr(layer, INPUT_QUANTIZER, None)
    if quantizer is not None:
        new.input_quantizer = quantizer
    new.train(False)


class DecodedWeight(nn.Module):
    """In place of a weight quantizer: returns the decoded weight, whatever it is given."""

    def __init__(self, q: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("weight", q.float() * scale)

    def forward(self, _latent: Tensor) -> Tensor:
        return self.weight


class ActivationRequantizer(nn.Module):
    """An activation quantizer for inference: its integers times its scale, no autograd wrapper.

    ``quantizer`` stays a child (its grid, scale and signedness are what the integer exports read).
    """

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer
        self.grid: IntegerGrid = quantizer.grid
        self.register_buffer("step", quantizer.input_scale().detach().float().reshape(()).clone())

    def forward(self, x: Tensor) -> Tensor:
        q, scale = self.quantizer.integers(x.float())
        return q.mul_(scale).to(x.dtype)


@torch.no_grad()
def decode_weights(student: fx.GraphModule) -> None:
    """In place: every weight quantizer applied once (see module docstring)."""
    for name, module in list(student.named_modules()):
        integer_form = INTEGER_WEIGHT_LAYERS.get(type(module))
        if integer_form is not None:
            replace_submodule(student, name, integer_form.from_quantized(module))
    for name, module in list(student.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Quantizer) and child_name.endswith(WEIGHT_QUANTIZER):
                latent = module.get_parameter(child_name.removesuffix("_quantizer"))
                path = f"{name}.{child_name}" if name else child_name
                decoded = child.to_integers(latent)
                replace_submodule(student, path, DecodedWeight(decoded.q, decoded.scale))


def module_calls(gm: fx.GraphModule) -> dict[str, int]:
    """How many graph nodes call each submodule (a pass may only fuse a module called once)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


@torch.no_grad()
def fold_batchnorm(student: fx.GraphModule) -> list[str]:
    """In place: fold each foldable BatchNorm2d (BatchNorm3d) into its 2-D (3-D) convolution; returns the
    folded BN paths."""
    calls = module_calls(student)
    folded = []
    for node in list(student.graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        bn = student.get_submodule(node.target)
        conv_type = next((c for b, c in _FOLDS.items() if isinstance(bn, b)), None)
        if conv_type is None or bn.running_mean is None or len(node.args) != 1:
            continue
        conv_node = node.args[0]
        if not (
            isinstance(conv_node, fx.Node)
            and conv_node.op == "call_module"
            and calls[conv_node.target] == 1
            and len(conv_node.users) == 1
        ):
            continue
        conv = student.get_submodule(conv_node.target)
        if not isinstance(conv, conv_type):
            continue
        _fold_into(student, conv_node.target, conv, bn)
        node.replace_all_uses_with(conv_node)
        student.graph.erase_node(node)
        parent, _, name = node.target.rpartition(".")
        delattr(student.get_submodule(parent) if parent else student, name)
        folded.append(node.target)
    return folded


_FOLDS = {
    nn.BatchNorm2d: nn.Conv2d,
    nn.BatchNorm3d: nn.Conv3d,
}  # a BatchNorm -> the convolution it folds into


def _fold_into(
    student: fx.GraphModule, path: str, conv: nn.Conv2d | nn.Conv3d, bn: nn.BatchNorm2d | nn.BatchNorm3d
) -> None:
    factor = 1.0 / torch.sqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        factor = bn.weight.detach().float() * factor
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(factor)
    shift = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(factor)
    new_bias = nn.Parameter(shift + (bias - bn.running_mean.float()) * factor, requires_grad=False)
    if isinstance(conv, _IntegerWeightConv):
        conv.scale.mul_(factor)
        conv.update_weight()
        conv.bias = new_bias
        return
    float_type = nn.Conv3d if isinstance(conv, nn.Conv3d) else nn.Conv2d
    folded = float_type(**conv_arguments(conv), bias=True, device="meta")
    factor = factor.view(-1, *[1] * (conv.weight.dim() - 1))
    folded.weight = nn.Parameter(conv.weight.detach().float() * factor, requires_grad=False)
    folded.bias = new_bias
    for child_name, child in conv.named_children():  # an input quantizer of a layer kept float
        folded.add_module(child_name, child)
    replace_submodule(student, path, folded.eval())


def requantize_activations(student: fx.GraphModule) -> None:
    """In place: every activation quantizer (a graph node) becomes an :class:`ActivationRequantizer`."""
    for node in student.graph.nodes:
        if node.op != "call_module":
            continue
        module = student.get_submodule(node.target)
        if isinstance(module, Quantizer):
            replace_submodule(student, node.target, ActivationRequantizer(module))


def inference_form(student: fx.GraphModule) -> fx.GraphModule:
    """A copy of the trained ``student`` for inference (see module docstring), in eval mode, on its device.

    Its parameters do not require gradients (they share storage with ``student``'s where a pass left a
    layer as it was); ``student`` itself is left as it is.
    """
    form = copy_graph_module(student).eval()
    decode_weights(form)
    fold_batchnorm(form)
    requantize_activations(form)
    for module in form.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.requires_grad:
                module._parameters[name] = nn.Parameter(parameter.detach(), requires_grad=False)
    return finish(form).eval()


def max_pools(form: fx.GraphModule) -> list[fx.Node]:
    """The graph's ``nn.MaxPool2d`` calls."""
    return [
        node
        for node in form.graph.nodes
        if node.op == "call_module" and isinstance(form.get_submodule(node.target), nn.MaxPool2d)
    ]


@torch.no_grad()
def pools_faster_in_channels_last(form: fx.GraphModule, example: Tensor, repeat: int = 5) -> list[str]:
    """The max poolings of ``form`` that pool an NCHW input (as ``example`` leads them to), if ``form``
    runs faster with all of them pooling a channels-last copy (:func:`pool_in_channels_last`), timed
    here on ``example``; else none. ``form`` is not changed.

    PyTorch's max pooling of NCHW tensors on CPUs is a scalar loop and its channels-last kernel is
    vectorized over channels (resnet18's stem pooling at 224x224: 3.1 ms against 0.17 ms on an AMD
    EPYC), but the layers after a pool then get channels-last inputs too, which float convolutions may
    run slower; so the whole form is timed both ways, on this machine, not assumed.
    """
    pools = max_pools(form)
    if not pools:
        return []
    inputs: dict[str, Tensor] = {}
    hooks = [
        form.get_submodule(node.target).register_forward_pre_hook(
            lambda _m, args, name=node.target: inputs.setdefault(name, args[0])
        )
        for node in pools
    ]
    try:
        form(example)
    finally:
        for hook in hooks:
            hook.remove()
    nchw = [
        name
        for name, x in inputs.items()
        if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last)
    ]
    if not nchw:
        return []
    graph = fx.Graph()
    graph.output(graph.graph_copy(form.graph, {}))
    candidate = fx.GraphModule(form, graph)  # the same submodules, another graph
    pool_in_channels_last(candidate, nchw)
    return nchw if _first_is_faster(lambda: candidate(example), lambda: form(example), repeat) else []


def pool_in_channels_last(form: fx.GraphModule, pools: list[str]) -> None:
    """In place: the max poolings named in ``pools`` pool a channels-last copy of their input.

    The pooled values do not change (a maximum is exact in any layout); a float convolution after the
    pool may sum in another order on its channels-last input (float rounding), while in the int8 form
    the pool's readers (a requantizer, a residual addition) compute the same values, so its logits are
    the same bit for bit (tested). A PyTorch runtime choice (``load_student``), not part of the form the
    exports read.
    """
    for node in max_pools(form):
        if node.target in pools:
            with form.graph.inserting_before(node):
                copy = form.graph.call_method(
                    "contiguous", (node.args[0],), {"memory_format": torch.channels_last}
                )
            node.args = (copy, *node.args[1:])
    form.recompile()


def _first_is_faster(first, second, repeat: int) -> bool:
    """Whether ``first()`` takes less time than ``second()`` (interleaved, best of ``repeat``)."""
    candidates, best = (first, second), [float("inf")] * 2
    for fn in candidates:
        fn()
    for _ in range(repeat):
        for i, fn in enumerate(candidates):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] < best[1]


__all__ = [
    "INTEGER_WEIGHT_LAYERS",
    "INTEGER_WEIGHT_TYPES",
    "ActivationRequantizer",
    "IntegerWeightConv2d",
    "IntegerWeightConv3d",
    "IntegerWeightLinear",
    "decode_weights",
    "fold_batchnorm",
    "inference_form",
    "pool_in_channels_last",
    "pools_faster_in_channels_last",
    "requantize_activations",
]
