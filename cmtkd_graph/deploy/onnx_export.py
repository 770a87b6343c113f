"""ONNX export of the student with QuantizeLinear/DequantizeLinear, checked with onnxruntime.

Every weight quantizer becomes a DequantizeLinear of an integer initializer (the weight's integers,
per-tensor or per-output-channel scale): the weight values are exactly the trained model's. Every
activation quantizer becomes a QuantizeLinear/DequantizeLinear pair on the grid of the quantizer:

* grids with a zero level (HWGQ/DoReFa/PACT unsigned, LSQ): ``DQ(Q(x, s))``, with a Clip first when the
  integer type is wider than the quantizer's bits;
* mid-rise grids (odd multiples of s: HWGQ/DoReFa/PACT signed, binary): ``DQ(Q(x - s, 2s)) + s``;
* HWGQ's Caffe rounding (positive inputs never map to 0): ``Where(x > 0, Max(y, s), y)``.

Each tensor gets the narrowest integer type that holds its integers *and* that the installed
onnxruntime runs for Q/DQ at the chosen opset (probed once per process): INT2/UINT2 need opset 25,
INT4/UINT4 opset 21; otherwise INT8/UINT8 (INT16 for 8-bit mid-rise weights, whose odd integers reach
+-255). The manifest records, per layer, the type chosen and why.

Rounding: every quantizer computes its integers with the arithmetic QuantizeLinear uses (x / s rounded
half to even; mid-rise: (x - s) / 2s), so equal inputs give equal levels. But onnxruntime sums a
convolution in another order than PyTorch, so a value within float rounding of a decision boundary can
land on the neighbouring level; the difference then grows through the layers behind it. The check
therefore reports, on a fixed batch, how many images agree within ``TOLERANCE`` (relative to the
largest logit), the top-1 agreement and the largest difference, and warns when an image differs more.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript  # noqa: F401  (torch's exporter needs it: a missing one is reported here, by name)
import torch
import torch.nn.functional as F
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from onnxscript import opset23 as op
from torch import Tensor, fx, nn

from cmtkd_graph.deploy.codes import QuantizedLayer
from cmtkd_graph.errors import UserError
from cmtkd_graph.passes.common import LOGITS
from cmtkd_graph.passes.graph_pass import network_graphs
from cmtkd_graph.passes.tracer import copy_graph_module, replace_submodule
from cmtkd_graph.quantizers import Quantizer
from cmtkd_graph.quantizers.base import IntegerGrid

log = logging.getLogger("cmtkd_graph")

OPSETS = (25, 23, 21)  # newest first: 25 adds INT2/UINT2
TOLERANCE = 1e-3
"""Largest |onnxruntime - PyTorch| logit difference accepted, relative to max(1, max |logit|)."""
CHECK_IMAGES = 8

# (name, signed, bits, first opset that has it)
_TYPES = (
    ("INT2", True, 2, 25),
    ("UINT2", False, 2, 25),
    ("INT4", True, 4, 21),
    ("UINT4", False, 4, 21),
    ("INT8", True, 8, 10),
    ("UINT8", False, 8, 10),
    ("INT16", True, 16, 21),
    ("UINT16", False, 16, 21),
)

# What the translations read while an export runs: key -> plan.
_PLANS: dict[str, dict] = {}
_EAGER: dict[str, nn.Module | Tensor] = {}


@torch.library.custom_op("cmtkd_export::fake_quantize", mutates_args=())
def _fake_quantize(x: Tensor, key: str) -> Tensor:
    return _EAGER[key](x).clone()


@_fake_quantize.register_fake
def _(x: Tensor, key: str) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("cmtkd_export::quantized_weight", mutates_args=())
def _quantized_weight(w: Tensor, key: str) -> Tensor:
    return _EAGER[key].clone()


@_quantized_weight.register_fake
def _(w: Tensor, key: str) -> Tensor:
    return torch.empty_like(w)


class _ActivationStandIn(nn.Module):
    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.cmtkd_export.fake_quantize(x, self.key)


class _WeightStandIn(nn.Module):
    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def forward(self, w: Tensor) -> Tensor:
        return torch.ops.cmtkd_export.quantized_weight(w, self.key)


def _activation_onnx(x, key: str):
    plan = _PLANS[key]
    scale = op.Constant(value=ir.tensor(np.array(plan["scale"], np.float32)))
    zero = op.Constant(value=ir.tensor(np.zeros((), np.int32).astype(plan["numpy"]), dtype=plan["ir_type"]))
    if plan["mid_rise"]:
        step = op.Constant(value=ir.tensor(np.array(2 * plan["scale"], np.float32)))
        shifted = op.Sub(x, scale)
        if plan["clip"]:
            shifted = op.Clip(
                shifted, _const(plan["kmin"] * 2 * plan["scale"]), _const(plan["kmax"] * 2 * plan["scale"])
            )
        y = op.Add(op.DequantizeLinear(op.QuantizeLinear(shifted, step, zero), step, zero), scale)
    else:
        if plan["clip"]:
            x_in = op.Clip(x, _const(plan["kmin"] * plan["scale"]), _const(plan["kmax"] * plan["scale"]))
        else:
            x_in = x
        y = op.DequantizeLinear(op.QuantizeLinear(x_in, scale, zero), scale, zero)
    if plan["caffe_rounding"]:
        y = op.Where(op.Greater(x, _const(0.0)), op.Max(y, scale), y)
    return y


def _weight_onnx(w, key: str):
    plan = _PLANS[key]
    q = op.Constant(value=ir.tensor(plan["integers"].astype(plan["numpy"]), dtype=plan["ir_type"]))
    scale = op.Constant(value=ir.tensor(plan["scale"]))
    if plan["scale"].ndim == 1:
        return op.DequantizeLinear(q, scale, axis=0)
    return op.DequantizeLinear(q, scale)


def _const(value: float):
    return op.Constant(value=ir.tensor(np.array(value, np.float32)))


def export_onnx(
    student: nn.Module,
    layers: list[QuantizedLayer],
    records: list[dict],
    path: Path,
    *,
    input_shape: tuple[int, ...],
) -> dict:
    """Write ``path``; add each layer's ONNX choices to its manifest record; return the ONNX summary.

    ``student`` is one traced graph, or a network rewritten part by part whose eager code between the
    parts ``torch.export`` traces (RAFT: its update loop unrolled for the network's number of updates);
    such a network's ONNX answers its ``logits`` entry (the last flow) for one sample at a time, since
    its code fixes the batch size when traced. The newest opset whose file onnxruntime loads is kept (its
    graph optimizer refuses some files at opset 25 that it loads at 23: the summary says so)."""
    whole = isinstance(student, fx.GraphModule)
    sample = torch.randn(CHECK_IMAGES, *input_shape, generator=torch.Generator().manual_seed(0))
    refused = []
    for opset in [o for o in OPSETS if o <= _opset()]:
        model, choices = _onnx_model(student, layers, sample if whole else sample[:1], opset)
        try:  # a refusal is reported in the summary, not on the console
            ort.InferenceSession(model.SerializeToString(), _quiet(), providers=["CPUExecutionProvider"])
        except _REFUSALS as err:
            refused.append(f"onnxruntime refused opset {opset}: {str(err).strip().splitlines()[0][-160:]}")
            continue
        break
    else:
        raise UserError(f"onnx export: {'; '.join(refused)}")
    for record, choice in zip(records, choices, strict=True):
        record["onnx"] = choice
    onnx.save(model, str(path))
    check = check_onnx(path, student if whole else _LogitsOnly(student).eval(), sample, flows=not whole)
    if check["images_within_tolerance"] < CHECK_IMAGES:
        log.warning(
            f"{path}: {CHECK_IMAGES - check['images_within_tolerance']} of {CHECK_IMAGES} check images "
            f"differ from PyTorch by more than {TOLERANCE:g} x max |logit| "
            f"(largest {check['max_abs_diff']:.3g}): "
            "activations at rounding boundaries took neighbouring levels (see deploy/onnx_export.py)"
        )
    return {
        "file": path.name,
        "opset": opset,
        "runtime": ort.__version__,
        **({"newer_opsets": refused} if refused else {}),
        **({"batch": 1} if not whole else {}),
        **check,
        "bytes": path.stat().st_size,
    }


_REFUSALS = (
    ort_errors.Fail,
    ort_errors.InvalidGraph,
    ort_errors.NotImplemented,
    ort_errors.InvalidArgument,
    ort_errors.RuntimeException,
)
"""What onnxruntime raises when it will not load a file (its graph optimizer, a type or kernel it lacks)."""


def _onnx_model(
    student: nn.Module, layers: list[QuantizedLayer], sample: Tensor, opset: int
) -> tuple[onnx.ModelProto, list[dict]]:
    """The Q/DQ model of ``student`` at ``opset`` and each layer's choices (types and why); the batch is
    dynamic where the student is one traced graph."""
    whole = isinstance(student, fx.GraphModule)
    form = (copy_graph_module(student) if whole else copy.deepcopy(student)).eval()
    plans, eager, choices = {}, {}, []
    for layer in layers:
        choice = {"weights": [], "inputs": []}
        for w in layer.weights:
            plan = _weight_plan(w.grid, w.integers().numpy(), w.scale.reshape(-1).numpy(), opset)
            plans[w.tensor] = plan
            eager[w.tensor] = w.decode()
            replace_submodule(form, w.quantizer, _WeightStandIn(w.tensor))
            choice["weights"].append({"tensor": w.tensor, "type": plan["type"], "why": plan["why"]})
        for a in layer.inputs:
            quantizer = form.get_submodule(a.quantizer)
            after_clip = _after_clip(student, a.quantizer)
            plan = _activation_plan(quantizer, a.grid, float(a.scale), opset, after_clip=after_clip)
            plans[a.quantizer] = plan
            eager[a.quantizer] = quantizer
            replace_submodule(form, a.quantizer, _ActivationStandIn(a.quantizer))
            choice["inputs"].append({"quantizer": a.quantizer, "type": plan["type"], "why": plan["why"]})
        choices.append(choice)
    with _active(plans, eager), warnings.catch_warnings():
        # RAFT keeps its correlation pyramid as attributes of the block, set on every call: nothing to keep
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        program = torch.onnx.export(
            form if whole else _LogitsOnly(form).eval(),
            (sample,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if whole else None,
            custom_translation_table={
                torch.ops.cmtkd_export.fake_quantize.default: _activation_onnx,
                torch.ops.cmtkd_export.quantized_weight.default: _weight_onnx,
            },
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
        )
    model = program.model_proto
    _drop_unused_initializers(model)
    if not whole:
        _share_equal_initializers(model)
    onnx.checker.check_model(model, full_check=True)
    return model, choices


def check_onnx(path: Path, student: nn.Module, images: Tensor, *, flows: bool = False) -> dict:
    """onnxruntime against PyTorch on ``images``: per-image agreement within ``TOLERANCE`` x max(1, max
    |logit|), top-1 agreement (of every pixel, for a segmentation network) or, for ``flows``, the mean
    end-point distance between the two flows (px), and the largest absolute difference. A model with a
    fixed batch of one runs image by image."""
    session = ort.InferenceSession(str(path), _quiet(), providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0] == 1
    batches = images.split(1) if fixed else (images,)
    got = np.concatenate([session.run(None, {"images": b.numpy()})[0] for b in batches])
    with torch.no_grad():
        expected = student(images).numpy()
    tolerance = TOLERANCE * max(1.0, float(np.abs(expected).max()))
    per_image = np.abs(got - expected).reshape(len(images), -1).max(axis=1)  # a map's pixels too
    if flows:
        agreement = {"mean_end_point_difference": float(np.linalg.norm(got - expected, axis=1).mean())}
    else:
        agreement = {"top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean())}
    return {
        "check_images": len(images),
        "tolerance": tolerance,
        "images_within_tolerance": int((per_image <= tolerance).sum()),
        **agreement,
        "max_abs_diff": float(per_image.max()),
    }


class _LogitsOnly(nn.Module):
    """The network's ``logits`` where it answers a dict (a network rewritten part by part)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        out = self.network(x)
        return out[LOGITS] if isinstance(out, dict) else out


def _after_clip(student: nn.Module, quantizer: str) -> bool:
    """:func:`clipping_producer` in the graph that holds ``quantizer`` (one of the parts' of a network
    rewritten part by part)."""
    for prefix, part in network_graphs(student):  # a whole graph: [("", student)]
        if quantizer.startswith(prefix):
            return clipping_producer(part, quantizer.removeprefix(prefix))
    return False


_CLIPPING_MODULES = (nn.ReLU6, nn.Hardtanh)
_CLIPPING_FUNCTIONS = {F.relu6, F.hardtanh, torch.clamp, torch.clip}


def clipping_producer(student: fx.GraphModule, quantizer: str) -> bool:
    """Whether the graph input of quantizer ``quantizer`` comes from a clamp (exported as Clip)."""
    for node in student.graph.nodes:
        if node.op == "call_module" and node.target == quantizer:
            source = node.args[0]
            if not isinstance(source, fx.Node):
                return False
            if source.op == "call_module":
                return isinstance(student.get_submodule(source.target), _CLIPPING_MODULES)
            return source.target in _CLIPPING_FUNCTIONS or source.target in {"clamp", "clip"}
    return False  # inside an attention module: the input is an attention output


@contextlib.contextmanager
def _active(plans: dict, eager: dict) -> Iterator[None]:
    _PLANS.update(plans)
    _EAGER.update(eager)
    try:
        yield
    finally:
        _PLANS.clear()
        _EAGER.clear()


def _weight_plan(grid: IntegerGrid, integers: np.ndarray, scale: np.ndarray, opset: int) -> dict:
    name, why = _choose(grid.qmin, grid.qmax, signed=True, opset=opset, what=_what(grid), activation=False)
    per_channel = scale.size > 1
    return {
        **_type_fields(name),
        "integers": integers.astype(np.int32),
        "scale": scale.astype(np.float32) if per_channel else np.array(scale.item(), np.float32),
        "why": why,
    }


def _activation_plan(
    quantizer: Quantizer, grid: IntegerGrid, scale: float, opset: int, *, after_clip: bool
) -> dict:
    mid_rise = grid.step == 2
    # a mid-rise grid q = 2k' + 1 is quantized as k' = (q - 1) / 2
    kmin, kmax = ((grid.qmin - 1) // 2, (grid.qmax - 1) // 2) if mid_rise else (grid.qmin, grid.qmax)
    signed = kmin < 0
    name, why = _choose(kmin, kmax, signed=signed, opset=opset, what=_what(grid), after_clip=after_clip)
    bits = _bits_of(name)
    type_min, type_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return {
        **_type_fields(name),
        "scale": scale,
        "mid_rise": mid_rise,
        "kmin": kmin,
        "kmax": kmax,
        "clip": (type_min, type_max) != (kmin, kmax),
        "caffe_rounding": bool(getattr(quantizer, "caffe_rounding", False)),
        "why": why,
    }


def _what(grid: IntegerGrid) -> str:
    if grid.step == 2:
        return f"{grid.bits}-bit mid-rise grid, odd integers {grid.qmin}..{grid.qmax}"
    return f"{grid.bits}-bit grid, integers {grid.qmin}..{grid.qmax}"


def _choose(
    low: int,
    high: int,
    *,
    signed: bool,
    opset: int,
    what: str,
    activation: bool = True,
    after_clip: bool = False,
) -> tuple[str, str]:
    """The narrowest type holding low..high that the runtime runs at ``opset``, and why.

    An activation's QuantizeLinear follows a Clip when its producer is one (ReLU6, hardtanh) or when the
    type is wider than the grid (the export clips first); that pattern is probed on its own, because
    onnxruntime's graph optimizer can fail on it where plain Q/DQ runs (1.32 with sub-byte types).
    """
    passed = []
    for name, type_signed, bits, since in _TYPES:
        if type_signed != signed:
            continue
        type_min, type_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if not type_min <= low <= high <= type_max:
            continue
        if since > opset:
            passed.append(f"{name} needs opset {since}")
            continue
        clipped = activation and (after_clip or (type_min, type_max) != (low, high))
        if not runs_qdq(name, opset, after_clip=clipped):
            pattern = "Conv -> Clip -> QuantizeLinear" if clipped else "QuantizeLinear/DequantizeLinear"
            passed.append(f"onnxruntime {ort.__version__} fails on {pattern} with {name}")
            continue
        note = f"; {', '.join(passed)}" if passed else ""
        return name, f"{what}: {name}, the narrowest type that holds them{note}"
    raise UserError(f"ONNX export: no integer type holds {low}..{high} ({what})")


def _bits_of(name: str) -> int:
    return next(bits for n, _, bits, _ in _TYPES if n == name)


_NUMPY = {8: (np.int8, np.uint8), 16: (np.int16, np.uint16)}


def _type_fields(name: str) -> dict:
    """The numpy type that carries the values (ONNX-IR packs the sub-byte types itself)."""
    signed, unsigned = _NUMPY[16 if _bits_of(name) == 16 else 8]
    return {
        "type": name,
        "ir_type": getattr(ir.DataType, name),
        "numpy": signed if name[0] == "I" else unsigned,
    }


@functools.cache
def runs_qdq(type_name: str, opset: int, *, after_clip: bool = False) -> bool:
    """Whether onnxruntime runs QuantizeLinear and DequantizeLinear of ``type_name`` at ``opset``
    (``after_clip``: with the QuantizeLinear behind Conv -> Clip, a pattern its optimizer fuses)."""
    from onnx import TensorProto, helper

    t = getattr(TensorProto, type_name)
    source = "x"
    nodes = []
    if after_clip:
        nodes += [
            helper.make_node("Conv", ["x4", "one"], ["conv"]),
            helper.make_node("Reshape", ["conv", "shape"], ["flat"]),
            helper.make_node("Clip", ["flat", "low", "high"], ["clipped"]),
        ]
        source = "clipped"
    nodes += [
        helper.make_node("Reshape", ["x", "shape4"], ["x4"]),
        helper.make_node("QuantizeLinear", [source, "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["dw"]),
        helper.make_node("Add", ["y", "dw"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("z", t, [], [0]),
            helper.make_tensor("w", t, [2], [1, 0]),
            helper.make_tensor("shape4", TensorProto.INT64, [4], [1, 1, 1, 2]),
        ]
        + (
            [
                helper.make_tensor("one", TensorProto.FLOAT, [1, 1, 1, 1], [1.0]),
                helper.make_tensor("shape", TensorProto.INT64, [1], [2]),
                helper.make_tensor("low", TensorProto.FLOAT, [], [0.0]),
                helper.make_tensor("high", TensorProto.FLOAT, [], [6.0]),
            ]
            if after_clip
            else []
        ),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), _quiet(), providers=["CPUExecutionProvider"]
        )
        (out,) = session.run(None, {"x": np.array([0.6, 0.2], np.float32)})
    except Exception:  # not supported: any failure means the same
        return False
    return bool(np.allclose(out, [1.0, 0.0]))


def _quiet() -> ort.SessionOptions:
    """Session options that keep onnxruntime's messages off the console: warnings (a probe's dropped
    constant) and the errors its graph optimizer recovers from (a transformer that skips an INT4 zero
    point); what fails raises, and what the session computes is checked."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return options


@functools.cache
def _opset() -> int:
    """The newest opset of ``OPSETS`` that the installed onnxruntime runs."""
    for opset in OPSETS:
        if runs_qdq("INT8", opset):
            return opset
    raise UserError(f"onnxruntime {ort.__version__} runs none of the opsets {OPSETS}; upgrade onnxruntime")


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """The latent float weights of quantized layers feed nothing once their DequantizeLinear replaced
    them; keep them out of the file."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _share_equal_initializers(model: onnx.ModelProto) -> None:
    """One initializer per distinct tensor: an unrolled loop (RAFT's updates) dequantizes the same weight
    once per update, and the exporter writes its integers each time (six copies of the update block's in a
    6-update RAFT-small). Left as it is where a node holds a subgraph, whose names it would not see."""
    graph = model.graph
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in subgraphs for node in graph.node for a in node.attribute):
        return
    first: dict[tuple, str] = {}
    same: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), init.raw_data)
        if init.raw_data and key in first:
            same[init.name] = first[key]
            continue
        first.setdefault(key, init.name)
        keep.append(init)
    if not same:
        return
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = same.get(name, name)


__all__ = ["TOLERANCE", "check_onnx", "export_onnx", "runs_qdq"]
