"""Activations and residual additions back in place where nothing else can see it: ``inplace_where_safe``.

``explicit_activations`` makes every activation out-of-place, because composition may later give a
tensor (the shared knowledge) several consumers, and an in-place ReLU in one of them would corrupt the
others. Once a graph is final, most activations again have an input that nobody else reads (a
BatchNorm's or a convolution's output): there the in-place form computes the same values and autograd
the same gradients, without allocating and writing a second tensor per activation, as torchvision's
own modules do (``nn.ReLU(inplace=True)``). An out-of-place activation costs a full-size allocation and
write each, which on an AVX2-only CPU made the composed system several per cent slower than the same
networks written eagerly (``python -m bench.step --only a``).

The same holds for a residual addition (``out += identity`` in torchvision, which ``explicit_activations``
also made ``out + identity``): it is written into its first operand again (``add_into``), unless that
operand's dtype cannot hold the sum (under autocast a bf16 feature plus the fp32 shared knowledge).

An activation or addition is made in-place only when its input (the addition's first operand)

* is produced by a module or function that does not keep its own output for backward (BatchNorm,
  convolution, linear layers and their quantized twins, residual additions): the in-place write must
  not overwrite a tensor that an earlier backward step still needs;
* has no other reader: no other node, and not the graph's output.

Quantizers, fusion nodes and taps are never overwritten: a quantizer is no activation, and a tap or a
fusion input has several readers.
"""

from __future__ import annotations

import operator

import torch
from cmtkd_graph.passes.graph_pass import graph_pass
from torch import fx, nn

# Activation modules with an ``inplace`` switch that torchvision itself runs in place.
INPLACE_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid)
# Producers whose backward does not read their output (only their inputs, weights or nothing).
# (the quantized layers are subclasses of the float ones)
_PRODUCER_MODULES = (nn.modules.batchnorm._BatchNorm, nn.Conv2d, nn.Conv3d, nn.Linear)


def add_into(a: torch.Tensor, b: object) -> torch.Tensor:
    """``a + b`` written into ``a`` where both are tensors of one dtype and shape, as torchvision's
    ``out += identity``; a new tensor otherwise (e.g. under autocast, a bf16 feature plus the fp32 shared
    knowledge, whose sum ``a`` could not hold)."""
    if isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape:
        return a.add_(b)
    return a + b


_PRODUCER_FUNCTIONS = {operator.add, torch.add, operator.sub, torch.sub, add_into}


@graph_pass
def inplace_where_safe(gm: fx.GraphModule) -> None:
    """Switch activation modules to their in-place form, and additions to :func:`add_into`, where the
    tensor they would overwrite has no other reader and its producer does not need it for backward (see
    the module docstring)."""
    for node in gm.graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if len(source.users) != 1 or not _keeps_no_output(gm, source):
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, INPLACE_ACTIVATIONS):
                module.inplace = True
        elif node.op == "call_function" and node.target is operator.add and not node.kwargs:
            node.target = add_into


def _keeps_no_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PRODUCER_MODULES)
    return node.op == "call_function" and node.target in _PRODUCER_FUNCTIONS
