"""The student's quantized layers as integer codes: what a low-bit runtime stores and computes with.

For every weight quantizer, the weight's codes (``0 .. 2^b - 1``, packed to b bits) with the scale and
the grid (``q = step * code + offset``, value ``= scale * q``) that map them back; decoding equals the
fake-quantized weight bit for bit, which :func:`encode_layers` checks. For every activation quantizer,
its grid, scale and signedness.

``codes.safetensors`` holds, beside them, every other tensor the student needs (BatchNorm, biases,
full-precision layers, activation quantizers' learned steps) under its state-dict name; code data
uses names with a ``/`` (``codes/layer1.0.conv1.weight``, ``scale/...``, ``input_scale/...``), which no
state-dict key has. So the file alone, with the spec, rebuilds the model (``deploy.integer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from cmtkd_graph.deploy.packing import pack_codes, packed_bytes, unpack_codes
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.graph_pass import network_graphs
from cmtkd_graph.quantizers import Quantizer
from cmtkd_graph.quantizers.base import IntegerGrid

CODES_FILE = "codes.safetensors"
WEIGHT_QUANTIZER = "weight_quantizer"


@dataclass
class WeightCodes:
    """One quantized weight tensor as codes."""

    tensor: str  # state-dict name of the latent float weight, e.g. "layer1.0.conv1.weight"
    quantizer: str  # module path of its quantizer
    family: str
    grid: IntegerGrid
    shape: tuple[int, ...]
    codes: Tensor  # uint8, ``shape``
    scale: Tensor  # float32: 0-dim, or (C_out, 1, ...) per output channel

    def integers(self) -> Tensor:
        return self.grid.integers(self.codes)

    def decode(self) -> Tensor:
        return self.integers().float() * self.scale

    @property
    def distinct_codes(self) -> int:
        return int(torch.unique(self.codes).numel())

    @property
    def packed_bytes(self) -> int:
        return packed_bytes(self.codes.numel(), self.grid.bits)


@dataclass
class ActivationCodes:
    """One activation quantizer: how its input becomes integers."""

    quantizer: str
    family: str
    grid: IntegerGrid
    signed: bool
    scale: Tensor  # 0-dim float32


@dataclass
class QuantizedLayer:
    """A conv/linear/attention layer that quantizes its weights or its input."""

    name: str  # module path, e.g. "layer1.0.conv1"
    module: nn.Module
    nodes: list[fx.Node]  # its call sites in the graph
    weight_bits: int
    act_bits: int
    position: str  # first / inner / last
    weights: list[WeightCodes] = field(default_factory=list)
    inputs: list[ActivationCodes] = field(default_factory=list)
    graph: fx.GraphModule | None = None  # the part holding it, in a network rewritten part by part


def quantized_layers(student: nn.Module) -> list[QuantizedLayer]:
    """Every layer the quantize pass decided on, in graph order, with its quantizers encoded. In a network
    rewritten part by part (``models.parts``: detectors, RAFT) the layers of every part, named by their
    path in the network (``rpn.head.conv.0.0``)."""
    layers: dict[str, QuantizedLayer] = {}
    for prefix, gm in network_graphs(student):
        for node in gm.graph.nodes:
            info = node.meta.get(META, {})
            if info.get("role") != "layer":
                continue
            name = f"{prefix}{node.target}"
            if name in layers:
                layers[name].nodes.append(node)
                continue
            module = gm.get_submodule(node.target)
            layer = QuantizedLayer(
                name, module, [node], info["weight_bits"], info["act_bits"], info["position"]
            )
            layer.graph = None if gm is student else gm
            for path, quantizer in module.named_modules():
                if not isinstance(quantizer, Quantizer):
                    continue
                full = f"{name}.{path}"
                if path.endswith(WEIGHT_QUANTIZER):
                    layer.weights.append(_encode_weight(module, path, full, quantizer))
                else:
                    layer.inputs.append(_encode_activation(full, quantizer))
            layers[name] = layer
    return list(layers.values())


def _weight_name(quantizer_path: str) -> str:
    """``layer.weight_quantizer`` -> ``layer.weight``; ``in_proj_weight_quantizer`` -> ``in_proj_weight``."""
    return quantizer_path.removesuffix("_quantizer")


@torch.no_grad()
def _encode_weight(module: nn.Module, path: str, full: str, quantizer: Quantizer) -> WeightCodes:
    weight = module.get_parameter(_weight_name(path))
    integers = quantizer.to_integers(weight)
    codes = WeightCodes(
        tensor=_weight_name(full),
        quantizer=full,
        family=type(quantizer).__name__,
        grid=integers.grid,
        shape=tuple(weight.shape),
        codes=integers.codes().cpu(),
        scale=integers.scale.float().cpu(),
    )
    expected = quantizer(weight.float()).cpu()
    if not torch.equal(codes.decode(), expected):
        raise RuntimeError(f"{full}: the codes do not decode to the fake-quantized weight (a quantizer bug)")
    return codes


def _encode_activation(full: str, quantizer: Quantizer) -> ActivationCodes:
    return ActivationCodes(
        quantizer=full,
        family=type(quantizer).__name__,
        grid=quantizer.grid,
        signed=quantizer.signed,
        scale=quantizer.input_scale().detach().float().cpu(),
    )


def codes_tensors(student: fx.GraphModule, layers: list[QuantizedLayer]) -> dict[str, Tensor]:
    """The content of ``codes.safetensors`` (see module docstring)."""
    latent = {w.tensor for layer in layers for w in layer.weights}
    weight_state = tuple(f"{w.quantizer}." for layer in layers for w in layer.weights)
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in student.state_dict().items()
        if k not in latent and not k.startswith(weight_state)
    }
    for layer in layers:
        for w in layer.weights:
            tensors[f"codes/{w.tensor}"] = pack_codes(w.codes, w.grid.bits)
            tensors[f"scale/{w.tensor}"] = w.scale.contiguous()
        for a in layer.inputs:
            tensors[f"input_scale/{a.quantizer}"] = a.scale.reshape(()).clone()
    return tensors


def decode_weight(tensors: dict[str, Tensor], record: dict) -> tuple[Tensor, Tensor]:
    """(int32 integers shaped like the weight, float32 scale) of one manifest weight record."""
    name, shape = record["tensor"], tuple(record["shape"])
    grid = IntegerGrid(record["bits"], record["grid"]["step"], record["grid"]["offset"])
    count = 1
    for size in shape:
        count *= size
    codes = unpack_codes(tensors[f"codes/{name}"], grid.bits, count).reshape(shape)
    return grid.integers(codes), tensors[f"scale/{name}"]


def float_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state-dict entries of a ``codes.safetensors`` (everything but the code data)."""
    return {k: v for k, v in tensors.items() if "/" not in k}
