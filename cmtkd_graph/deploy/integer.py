"""The integer reference: the exported student run the way integer hardware runs it.

Every 2-D convolution and linear layer whose weights and input are both quantized multiplies the integer
activation codes by the integer weight codes, accumulates exactly (the int64 result; see
``integer_matmul``) and applies the two scales once, afterwards: ``y = (sum q_a q_w) * (s_a s_w) + bias``.
HWGQ's mid-rise weights (no zero level) are odd integers, so they stay integers too. Everything else
(BatchNorm, ReLU, residual adds, pooling, layers kept full precision) runs in float32 as in the
fake-quantized model, and a layer that quantizes only its weights (or an attention module, or a 3-D
convolution of a video model: the exact accumulation is written for 2-D convolutions and linear layers)
computes in float with the decoded weights.

The model is rebuilt from ``codes.safetensors`` and the spec alone (no latent float weights), so equality
with the fake-quantized student (within float rounding) proves the codes are complete and exact.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from cmtkd_graph.deploy.codes import CODES_FILE, decode_weight, float_state
from cmtkd_graph.deploy.inference import DecodedWeight
from cmtkd_graph.deploy.student import (
    MANIFEST_FILE,
    build_student,
    export_file,
    find_student,
    load_state,
    read_manifest,
)
from cmtkd_graph.errors import UserError
from cmtkd_graph.passes.graph_pass import finish, network_graphs
from cmtkd_graph.passes.tracer import replace_submodule
from cmtkd_graph.quantizers import Quantizer
from cmtkd_graph.safe_files import read_tensors


class IntegerLayer(nn.Module):
    """A conv or linear layer computing on integer codes (see module docstring)."""

    def __init__(
        self, layer: nn.Conv2d | nn.Linear, input_quantizer: Quantizer, q_w: Tensor, w_scale: Tensor
    ):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise UserError(f"integer reference: padding_mode={layer.padding_mode!r} is not supported")
        self.conv = isinstance(layer, nn.Conv2d)
        self.hyper = (
            dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if self.conv
            else {}
        )
        self.kernel_size = layer.kernel_size if self.conv else None
        self.input_quantizer = input_quantizer
        self.register_buffer("q_w", q_w.to(torch.int64))
        self.register_buffer("w_scale", w_scale.reshape(-1).float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        q_a, s_a = self.input_quantizer.integers(x.float())
        if self.conv:
            acc = integer_conv2d(q_a, self.q_w, self.kernel_size, **self.hyper)
            scale = (s_a * self.w_scale).view(1, -1, 1, 1)
            bias = None if self.bias is None else self.bias.view(1, -1, 1, 1)
        else:
            acc = integer_matmul(q_a, self.q_w.t())
            scale, bias = s_a * self.w_scale, self.bias
        y = acc.to(torch.float32) * scale
        return y if bias is None else y + bias


def accumulator_bits(q_w: Tensor, q_a_max: int) -> int:
    """Bits (with sign) an accumulator needs for the worst case of a layer with integer weights ``q_w``
    (output channels first) and activation integers up to ``q_a_max`` in magnitude."""
    fan_in_abs = q_w.abs().reshape(q_w.shape[0], -1).sum(dim=1).max().item()
    return int(q_a_max * fan_in_abs).bit_length() + 1


FLOAT64_EXACT = 2**53  # every integer of smaller magnitude is a float64, and so is every sum of them


def integer_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of tensors holding integers, exactly, as int64.

    When no partial sum can reach 2^53 (bound: K x max|a| x max|b|; an 8-bit layer with K = 4608 needs
    2^28) every product and every sum, in any order, is exact in float64, so the result equals int64
    accumulation bit for bit, and BLAS runs it (BLAS has no int64 matmul). Otherwise it
    multiplies in int64.
    """
    worst = a.shape[-1] * a.abs().max().item() * b.abs().max().item() if a.numel() and b.numel() else 0
    if worst < FLOAT64_EXACT:
        return torch.matmul(a.double(), b.double()).to(torch.int64)
    return torch.matmul(a.to(torch.int64), b.to(torch.int64))


def integer_conv2d(
    q_a: Tensor, q_w: Tensor, kernel_size, *, stride, padding, dilation, groups: int
) -> Tensor:
    """conv2d of integer tensors, exact, as int64 (im2col + ``integer_matmul``).

    ``q_a``: (N, C, H, W) float holding integers (exact below 2^24); ``q_w``: int64 (C_out, C/g, kh, kw).
    """
    n, c, h, w = q_a.shape
    cols = F.unfold(q_a, kernel_size, dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(n, groups, c // groups * kernel_size[0] * kernel_size[1], -1)
    weights = q_w.reshape(groups, q_w.shape[0] // groups, -1)
    out = integer_matmul(weights.unsqueeze(0), cols)  # (N, groups, C_out/g, L)
    out_h = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return out.reshape(n, q_w.shape[0], out_h, out_w)


def integer_student(path: str | Path) -> nn.Module:
    """The integer reference of an export directory (needs its ``codes.safetensors``), in eval mode (a
    network rewritten part by part, detectors and RAFT: every part's layers)."""
    path = Path(path)
    manifest_file, codes_file = path / MANIFEST_FILE, path / CODES_FILE
    if not manifest_file.is_file() or not codes_file.is_file():
        raise UserError(
            f"{path}: no {CODES_FILE} with its {MANIFEST_FILE}; run `cmtkd-graph export RUN_DIR --out {path} "
            "--format codes` first"
        )
    manifest = read_manifest(path)
    spec = find_student(path).spec
    tensors = read_tensors(export_file(path, CODES_FILE), what="codes")
    student = build_student(spec)
    return integer_from_codes(student, tensors, manifest["layers"], origin=codes_file)


def integer_from_codes(
    student: nn.Module, tensors: dict[str, Tensor], layers: list[dict], *, origin: Path
) -> nn.Module:
    """Put the codes into a freshly built student and swap its quantized layers for integer ones."""
    state = float_state(tensors)
    latent = {w["tensor"] for layer in layers for w in layer["weights"]}
    weight_state = tuple(f"{w['quantizer']}." for layer in layers for w in layer["weights"])
    result = student.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in latent and not k.startswith(weight_state)]
    if missing or result.unexpected_keys:
        load_state(student, state, origin=origin)  # raises with the names
    graphs = network_graphs(student)
    for layer in layers:
        module = student.get_submodule(layer["name"])
        decoded = {w["tensor"]: decode_weight(tensors, w) for w in layer["weights"]}
        prefix, graph = next((p, g) for p, g in reversed(graphs) if layer["name"].startswith(p))
        if integer_arithmetic(module, layer):
            q_w, scale = next(iter(decoded.values()))
            integer = IntegerLayer(module, module.input_quantizer, q_w, scale)
            _replace_layer(graph, layer["name"].removeprefix(prefix), integer)
            continue
        for w in layer["weights"]:  # weight-only layers and attention: float math, decoded weights
            replace_submodule(
                graph, w["quantizer"].removeprefix(prefix), DecodedWeight(*decoded[w["tensor"]])
            )
    for _, graph in graphs:
        finish(graph)
    return student.eval()


def integer_arithmetic(module: nn.Module, layer: dict) -> bool:
    """A conv/linear layer called once, with quantized weights and a quantized input, computes on integers."""
    graph_input = f"{layer['name']}.input_quantizer"
    return (
        isinstance(module, nn.Conv2d | nn.Linear)
        and layer["calls"] == 1
        and len(layer["weights"]) == 1
        and any(a["quantizer"] == graph_input for a in layer["inputs"])
    )


def _replace_layer(student: fx.GraphModule, name: str, integer: IntegerLayer) -> None:
    """``name``'s calls now take the input quantizer's input: the integer layer quantizes itself."""
    quantizer_target = f"{name}.input_quantizer"
    replace_submodule(student, name, integer)
    for node in list(student.graph.nodes):
        if node.op == "call_module" and node.target == name:
            source = node.args[0]
            if (
                isinstance(source, fx.Node)
                and source.op == "call_module"
                and source.target == quantizer_target
            ):
                node.replace_input_with(source, source.args[0])
                if not source.users:
                    student.graph.erase_node(source)
