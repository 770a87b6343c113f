"""The traced parts of models FX cannot trace whole: torchvision's detectors and RAFT.

``symbolic_trace`` fails on a whole detector (image lists, targets, data-dependent box logic) and on
RAFT (its update loop indexes a correlation pyramid at the current estimate), but the layers of both are
in a few submodules that trace: a detector's ``backbone`` (body + FPN, or SSD's feature extractor) and
its heads (the RPN head and the RoI heads' box, mask and keypoint heads and predictors; RetinaNet's,
FCOS's and SSD's dense heads, whose ``forward`` loops over a list of feature levels: traced with one
input per level), RAFT's feature and context encoders, its update block and its upsampling-mask
predictor. Each part is traced and rewritten by the pass pipeline like a whole network, then put back
into the eager model, whose own code still runs anchor generation, box coding, proposal sampling, NMS,
RoI alignment and RAFT's correlation lookup and loop, as torchvision wrote them. What that code asks of a
part besides calling it (``head.compute_loss``, ``update_block.hidden_state_size``) the graph keeps, through
every copy.

A part knows which ends of its network it holds (``passes.common.HOLDS``), so the first/last-layer rule
sees the network, not the part: the backbone's (or an encoder's) stem is the first layer; the
predictors (class and box outputs, mask logits, RAFT's flow and mask heads) are the last layers; a
head's own first convolution is inner. Node names carry the part's path (``backbone.body.layer1.0.conv1``,
``rpn.head.conv.0.0``), the names of the eager model's state dict, which rules and taps use.

One module is not traced but written as the graph it computes: torchvision's ``FastRCNNPredictor``
asserts its input's rank in Python (``if x.dim() == 4``), so its graph is written by hand (flatten, then
the class and box linear layers), which is what it computes on the 2-D box features ``RoIHeads`` gives
it (the graph's names carry the part's path like a traced one's). Transposed convolutions (Mask R-CNN's
and Keypoint R-CNN's upsampling layers) are not quantized layers: they stay float.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import PH

from cmtkd_graph.passes.common import HOLDS, output_value
from cmtkd_graph.passes.graph_pass import finish
from cmtkd_graph.passes.tracer import (
    PRESERVED_ATTRIBUTES,
    QUALNAME_PREFIX,
    assign_qualnames,
    replace_submodule,
    trace,
)

if TYPE_CHECKING:
    from cmtkd_graph.spec import ModelSpec, Spec


@dataclass(frozen=True)
class Part:
    """A submodule that traces: its path in the model, whether its input is a list of feature levels,
    and the ends of the network it holds (``"first"``, ``"last"``)."""

    path: str
    levels: bool = False
    holds: tuple[str, ...] = ()


_RCNN_HEADS = (
    ("roi_heads.box_head", ()),
    ("roi_heads.box_predictor", ("last",)),
    ("roi_heads.mask_head", ()),
    ("roi_heads.mask_predictor", ("last",)),
    ("roi_heads.keypoint_head", ()),
    ("roi_heads.keypoint_predictor", ("last",)),
)


def model_parts(model: nn.Module) -> list[Part] | None:
    """The traced parts of ``model`` in the order they run (None: the model traces whole)."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.optical_flow import RAFT

    if isinstance(model, GeneralizedRCNN):
        heads = [Part(path, False, holds) for path, holds in _RCNN_HEADS if _has(model, path)]
        return [Part("backbone", False, ("first",)), Part("rpn.head", True, ("last",)), *heads]
    if isinstance(model, RetinaNet | FCOS | SSD):
        return [Part("backbone", False, ("first",)), Part("head", True, ("last",))]
    if isinstance(model, RAFT):
        parts = [
            Part("feature_encoder", False, ("first",)),
            Part("context_encoder", False, ("first",)),
            Part("update_block", False, ("last",)),
        ]
        return parts + (
            [Part("mask_predictor", False, ("last",))] if model.mask_predictor is not None else []
        )
    return None


def _has(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def feature_levels(backbone: fx.GraphModule) -> int:
    """How many feature maps a traced backbone returns (the heads' list length)."""
    value = output_value(backbone)
    return len(value) if isinstance(value, dict | list | tuple) else 1


def trace_part(model: nn.Module, part: Part, *, levels: int = 1, train: bool = True) -> fx.GraphModule:
    """``part`` of ``model`` as a GraphModule named like the model's state dict (``levels``: the length
    of its list input), holding the ends of the network ``part.holds`` says."""
    module = model.get_submodule(part.path)
    written = _written_form(module)
    if written is not None:
        gm = written(module)
        gm.train(train)
        gm.meta[QUALNAME_PREFIX] = part.path
        assign_qualnames(gm)
    else:
        concrete = None
        if part.levels:
            first_input = next(iter(inspect.signature(module.forward).parameters))
            concrete = {first_input: [PH] * levels}
        gm = trace(module, train=train, concrete_args=concrete, prefix=part.path)
    gm.meta[HOLDS] = part.holds
    _keep_eager_interface(gm, module)
    return gm


def _keep_eager_interface(gm: fx.GraphModule, module: nn.Module) -> None:
    """Make the graph answer what torchvision's eager code asks of the module it replaces: its methods
    (RetinaNet's and FCOS's ``head.compute_loss``) and plain attributes (RAFT's
    ``update_block.hidden_state_size``). They come from the eager module: a method runs on it, which is
    right for the ones torchvision calls (losses and box coding read attributes such as ``num_classes``
    and ``box_coder``, never the layers, which the graph now runs quantized)."""
    preserved: dict[str, object] = {}
    for cls in type(module).__mro__[: type(module).__mro__.index(nn.Module)]:
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and not name.startswith("_") and not hasattr(gm, name):
                preserved.setdefault(name, getattr(module, name))
    for key, value in module.__dict__.items():
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            preserved[key] = value
    gm.meta[PRESERVED_ATTRIBUTES] = preserved  # kept by every copy of the graph
    for key, value in preserved.items():
        setattr(gm, key, value)


def rewrite_parts(
    model: nn.Module, rewrite: Callable[[fx.GraphModule, Part], fx.GraphModule], *, train: bool = True
) -> dict[str, fx.GraphModule]:
    """Trace every part of ``model``, pass it through ``rewrite`` and install the result in its place;
    returns the installed graphs by path. A head's list length is the backbone's number of levels."""
    parts = model_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} traces whole; it has no parts")
    installed: dict[str, fx.GraphModule] = {}
    levels = 1
    for part in parts:
        gm = rewrite(trace_part(model, part, levels=levels, train=train), part)
        if part.path == "backbone":
            levels = feature_levels(gm)
        replace_submodule(model, part.path, gm)
        installed[part.path] = gm
    return installed


def build_part_network(
    model: ModelSpec,
    spec: Spec,
    *,
    label: str,
    network: str,
    networks: list,
    device: str | torch.device,
    load: bool,
    prepare=None,
) -> nn.Module:
    """One network of a task whose models are rewritten part by part (``models.parts``: RAFT,
    detectors): torchvision's model with every part through the pass pipeline (explicit activations,
    quantize), ``prepare(model)`` first where given, its ``weights:`` loaded (``load``, not on meta);
    what was built is recorded in ``networks`` under ``label``. ``network``: the precision rules' selector."""
    from cmtkd_graph.passes.activations import explicit_activations
    from cmtkd_graph.system import NetworkInfo, instantiate, load_weights, quantize_network

    built = instantiate(model, device)
    if prepare is not None:
        prepare(built)

    def rewrite(gm: fx.GraphModule, part: Part) -> fx.GraphModule:
        explicit_activations.in_place(gm)
        return finish(quantize_network(gm, model, spec, network))

    rewrite_parts(built, rewrite)
    info = NetworkInfo(label, model)
    if load and model.weights and torch.device(device).type != "meta":
        info.weights_report = load_weights(built, model.weights, label=label)
        logging.getLogger("cmtkd_graph").info(info.weights_report)
    networks.append(info)
    return built


def float_part(model: ModelSpec, path: str) -> fx.GraphModule:
    """Part ``path`` of ``model``'s float network, built on the meta device, traced with explicit
    activations (what ``taps`` lists)."""
    from cmtkd_graph.passes.activations import explicit_activations
    from cmtkd_graph.system import instantiate

    network = instantiate(model, "meta")
    part = next(p for p in model_parts(network) or () if p.path == path)
    gm = trace_part(network, part)
    explicit_activations.in_place(gm)
    return finish(gm)


def _fast_rcnn_predictor(module: nn.Module) -> fx.GraphModule:
    """FastRCNNPredictor's graph (module docstring): ``flatten(x, 1)``, then ``cls_score`` and
    ``bbox_pred`` of it."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    flat = graph.call_function(torch.flatten, (x, 1))
    scores = graph.call_module("cls_score", (flat,))
    deltas = graph.call_module("bbox_pred", (flat,))
    graph.output((scores, deltas))
    for node, stack in ((scores, "cls_score"), (deltas, "bbox_pred")):
        node.meta["nn_module_stack"] = {stack: (stack, type(module.get_submodule(stack)))}
    return fx.GraphModule(module, graph, type(module).__name__)


def _written_form(module: nn.Module) -> Callable[[nn.Module], fx.GraphModule] | None:
    """The hand-written graph of a module that does not trace (None: it traces)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return _fast_rcnn_predictor if type(module) is FastRCNNPredictor else None
