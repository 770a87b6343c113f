"""Model-surgery passes, run on the traced float model before quantization (spec: ``surgery:``).

Each pass is ``(gm, **options) -> GraphModule`` (pure; ``.in_place`` rewrites ``gm`` itself) and is
registered by name in ``SURGERIES``:

* ``bn_after_every_layer`` — the paper's AlexNet-BN: a BatchNorm after every conv and fully-connected
  layer (HWGQ / DoReFa practice), by default not after the classifier output layer;
* ``cifar_stem`` — the usual CIFAR ResNet stem: the first conv becomes 3x3 / stride 1 and the max-pool
  right after it is removed, so 32x32 inputs keep their resolution in the first stage;
* ``grey_input`` — the first conv takes 1 input channel (Fashion-MNIST without channel repetition);
  its weights are the sum of the RGB filters so RGB-trained weights give the same response to grey.
"""

from __future__ import annotations

import torch
from cmtkd_graph.passes.common import find_layers, first_and_last_layers
from cmtkd_graph.passes.graph_pass import graph_pass
from cmtkd_graph.passes.tracer import qualname, replace_submodule, target_qualname, unique_target
from torch import fx, nn

from cmtkd_graph.errors import UserError
from cmtkd_graph.registry import SURGERIES


def run_surgery(
    gm: fx.GraphModule, name: str, options: dict | None = None, *, in_place: bool = False
) -> fx.GraphModule:
    """Run a registered pass by name (on a copy, or ``in_place``), turning bad options into a clear error."""
    fn = SURGERIES.get(name)
    try:
        result = fn.in_place(gm, **(options or {})) if in_place else fn(gm, **(options or {}))
    except TypeError as err:
        raise UserError(f"surgery {name}: bad options {options}: {err}") from None
    return gm if in_place else result


@SURGERIES.register("bn_after_every_layer")
@graph_pass
def bn_after_every_layer(gm: fx.GraphModule, include_last: bool = False) -> None:
    """Insert ``BatchNorm2d``/``BatchNorm3d``/``BatchNorm1d`` after every conv/linear that is not already
    followed by one.

    The new module sits beside its layer as ``<layer>_bn`` (``features.0`` -> ``features.0_bn``), so the
    original torchvision parameter names are untouched.
    """
    layers = find_layers(gm)
    _, last = first_and_last_layers(gm, layers)
    for node in layers:
        if node in last and not include_last:
            continue
        if not isinstance(gm.get_submodule(node.target), nn.Conv2d | nn.Conv3d | nn.Linear):
            continue  # an attention module: its linears are inside it
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(gm.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm)
        ):
            continue
        layer = gm.get_submodule(node.target)
        ref = layer.weight
        if isinstance(layer, nn.Conv2d):
            bn: nn.Module = nn.BatchNorm2d(layer.out_channels, device=ref.device, dtype=ref.dtype)
        elif isinstance(layer, nn.Conv3d):
            bn = nn.BatchNorm3d(layer.out_channels, device=ref.device, dtype=ref.dtype)
        else:
            bn = nn.BatchNorm1d(layer.out_features, device=ref.device, dtype=ref.dtype)
        target = unique_target(gm, f"{node.target}_bn")
        gm.add_submodule(target, bn)
        with gm.graph.inserting_after(node):
            bn_node = gm.graph.call_module(target, (node,))
        bn_node.meta = {
            "qualname": target_qualname(gm, target),
            "nn_module_stack": node.meta.get("nn_module_stack", {}),
        }
        for user in list(node.users):
            if user is not bn_node:
                user.replace_input_with(node, bn_node)


def _first_conv(gm: fx.GraphModule, surgery: str) -> fx.Node:
    layers = find_layers(gm)
    first, _ = first_and_last_layers(gm, layers)
    if any(isinstance(gm.get_submodule(n.target), nn.Conv3d) for n in first):
        raise UserError(
            f"surgery {surgery}: rewrites an image model's first Conv2d; this model's first layer is a "
            "Conv3d (a video model): drop the surgery"
        )
    convs = [n for n in layers if n in first and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    if len(convs) != 1:
        raise UserError(f"surgery {surgery}: needs exactly one first conv layer, found {len(convs)}")
    return convs[0]


@SURGERIES.register("cifar_stem")
@graph_pass
def cifar_stem(
    gm: fx.GraphModule, kernel_size: int = 3, stride: int = 1, remove_maxpool: bool = True
) -> None:
    """Replace the first conv by a small-image stem and drop the max-pool that follows it."""
    node = _first_conv(gm, "cifar_stem")
    old: nn.Conv2d = gm.get_submodule(node.target)
    new = nn.Conv2d(
        old.in_channels,
        old.out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    replace_submodule(gm, node.target, new)
    if remove_maxpool:
        pool = _next_maxpool(gm, node)
        if pool is None:
            raise UserError(
                f"surgery cifar_stem: no max-pool between {qualname(node)} and the next conv; "
                "use options {remove_maxpool: false}"
            )
        pool.replace_all_uses_with(pool.args[0])
        gm.graph.erase_node(pool)
        gm.delete_all_unused_submodules()


def _next_maxpool(gm: fx.GraphModule, start: fx.Node) -> fx.Node | None:
    """The first MaxPool2d after ``start`` on the single path before the next conv/linear."""
    layers = set(find_layers(gm))
    node = start
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node in layers:
            return None
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MaxPool2d):
            return node
        if node.op == "call_function" and node.target is torch.nn.functional.max_pool2d:
            return node
    return None


@SURGERIES.register("grey_input")
@graph_pass
def grey_input(gm: fx.GraphModule) -> None:
    """Make the first conv take one input channel (weights: sum over the RGB filters)."""
    node = _first_conv(gm, "grey_input")
    old: nn.Conv2d = gm.get_submodule(node.target)
    if old.groups != 1:
        raise UserError("surgery grey_input: the first conv is grouped; cannot reduce its input channels")
    new = nn.Conv2d(
        1,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    replace_submodule(gm, node.target, new)
