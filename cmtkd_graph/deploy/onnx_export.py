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
largest value of an output), the top-1 agreement (flows: the mean end-point difference; detections: the
share found by both) and the largest difference, and warns when an image differs more.

Networks rewritten part by part are traced whole with their eager code: RAFT by ``torch.export``,
torchvision's detectors by the TorchScript tracer (``torch.export`` does not trace their box logic),
whose symbolic functions write the same Q/DQ patterns at opset :data:`TORCHSCRIPT_OPSET`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
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
from torch.onnx import symbolic_helper

from cmtkd_graph.deploy.codes import QuantizedLayer
from cmtkd_graph.errors import UserError
from cmtkd_graph.passes.common import LOGITS
from cmtkd_graph.passes.graph_pass import network_graphs
from cmtkd_graph.passes.tracer import copy_graph_module, replace_submodule
from cmtkd_graph.quantizers import Quantizer
from cmtkd_graph.quantizers.base import IntegerGrid

log = logging.getLogger("cmtkd_graph")

OPSETS = (25, 23, 21)  # newest first: 25 adds INT2/UINT2
TORCHSCRIPT_OPSET = 20
"""The newest opset torch's TorchScript tracer writes (detectors: ``torch.export`` does not trace them)."""
TOLERANCE = 1e-3
"""Largest |onnxruntime - PyTorch| difference accepted, relative to max(1, the output's largest |value|)."""
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


class _OnnxScriptNodes:
    """Writes ONNX nodes for ``torch.export``'s translator (onnxscript ops); any integer type."""

    def __call__(self, name: str, *inputs, **attributes):
        return getattr(op, name)(*inputs, **attributes)

    def constant(self, value: np.ndarray, plan: dict | None = None):
        if plan is None:
            return op.Constant(value=ir.tensor(value))
        return op.Constant(value=ir.tensor(value.astype(plan["numpy"]), dtype=plan["ir_type"]))


class _TorchScriptNodes:
    """Writes ONNX nodes for the TorchScript tracer's symbolic functions; 8-bit integer types only (its
    newest opset, :data:`TORCHSCRIPT_OPSET`, has no narrower Q/DQ types)."""

    def __init__(self, graph):
        self.graph = graph

    def __call__(self, name: str, *inputs, **attributes: int):
        assert all(isinstance(v, int) for v in attributes.values()), attributes  # named key_i below
        return self.graph.op(name, *inputs, **{f"{key}_i": value for key, value in attributes.items()})

    def constant(self, value: np.ndarray, plan: dict | None = None):
        value = np.array(value if plan is None else value.astype(plan["numpy"]), copy=True)  # 0-d stays 0-d
        return self.graph.op("Constant", value_t=torch.from_numpy(value))


def _activation_nodes(nodes, x, plan: dict):
    """An activation quantizer as Q/DQ nodes on its grid (module docstring)."""

    def f32(value: float):
        return nodes.constant(np.array(value, np.float32))

    scale, zero = f32(plan["scale"]), nodes.constant(np.zeros((), np.int32), plan)
    if plan["mid_rise"]:
        step = f32(2 * plan["scale"])
        shifted = nodes("Sub", x, scale)
        if plan["clip"]:
            shifted = nodes(
                "Clip", shifted, f32(plan["kmin"] * 2 * plan["scale"]), f32(plan["kmax"] * 2 * plan["scale"])
            )
        y = nodes(
            "Add", nodes("DequantizeLinear", nodes("QuantizeLinear", shifted, step, zero), step, zero), scale
        )
    else:
        x_in = x
        if plan["clip"]:
            x_in = nodes("Clip", x, f32(plan["kmin"] * plan["scale"]), f32(plan["kmax"] * plan["scale"]))
        y = nodes("DequantizeLinear", nodes("QuantizeLinear", x_in, scale, zero), scale, zero)
    if plan["caffe_rounding"]:
        y = nodes("Where", nodes("Greater", x, f32(0.0)), nodes("Max", y, scale), y)
    return y


def _weight_nodes(nodes, plan: dict):
    """A weight as its integers and a DequantizeLinear (per output channel where its scale is)."""
    q, scale = nodes.constant(plan["integers"], plan), nodes.constant(plan["scale"])
    if plan["scale"].ndim == 1:
        return nodes("DequantizeLinear", q, scale, axis=0)
    return nodes("DequantizeLinear", q, scale)


def _activation_onnx(x, key: str):
    return _activation_nodes(_OnnxScriptNodes(), x, _PLANS[key])


def _weight_onnx(w, key: str):
    return _weight_nodes(_OnnxScriptNodes(), _PLANS[key])


@symbolic_helper.parse_args("v", "s")
def _activation_torchscript(graph, x, key: str):
    return _activation_nodes(_TorchScriptNodes(graph), x, _PLANS[key])


@symbolic_helper.parse_args("v", "s")
def _weight_torchscript(graph, w, key: str):
    return _weight_nodes(_TorchScriptNodes(graph), _PLANS[key])


@functools.cache
def _register_torchscript_symbolics() -> None:
    torch.onnx.register_custom_op_symbolic(
        "cmtkd_export::fake_quantize", _activation_torchscript, TORCHSCRIPT_OPSET
    )
    torch.onnx.register_custom_op_symbolic(
        "cmtkd_export::quantized_weight", _weight_torchscript, TORCHSCRIPT_OPSET
    )


def export_onnx(
    student: nn.Module,
    layers: list[QuantizedLayer],
    records: list[dict],
    path: Path,
    *,
    input_shape: tuple[int, ...],
    tracer: str = "torch.export",
    answers: str = "logits",
    check_images: Tensor | None = None,
    check_source: str = "real images",
) -> dict:
    """Write ``path``; add each layer's ONNX choices to its manifest record; return the ONNX summary.

    The file is traced on and checked against PyTorch on ``check_images`` (real ones, from where
    ``check_source`` says), else on :data:`CHECK_IMAGES` random images of ``input_shape``.

    ``student`` is one traced graph, or a network rewritten part by part whose eager code between the
    parts the ``tracer`` records (the task's, ``Task.onnx_tracer``): ``torch.export`` (RAFT: its update loop
    unrolled for the network's number of updates) or ``torchscript``, torch's older tracer, which records
    torchvision's box logic as the example image runs it (proposals, NMS and RoI pooling become ONNX
    operators, as in torchvision's own ONNX export of its detectors) and writes opsets up to
    :data:`TORCHSCRIPT_OPSET` (8-bit Q/DQ types). Such a network's ONNX takes one sample at a time, since
    its code fixes the batch size when traced, and ``answers`` (``Task.onnx_answers``) what it returns:
    the ``logits`` of a traced graph, the last ``flow`` of RAFT, or the first image's ``detections``
    (one output per key: boxes, labels, scores, masks, keypoints...). The newest opset whose file
    onnxruntime loads is kept (its graph optimizer refuses some files at opset 25 that it loads at 23: the
    summary says so)."""
    whole = isinstance(student, fx.GraphModule)
    sample = check_images if check_images is not None else random_images(input_shape, answers)
    opsets = [TORCHSCRIPT_OPSET] if tracer == "torchscript" else [o for o in OPSETS if o <= _opset()]
    refused = []
    for opset in opsets:
        model, choices = _onnx_model(student, layers, sample if whole else sample[:1], opset, tracer, answers)
        try:  # a refusal is reported in the summary, not on the console
            ort.InferenceSession(model.SerializeToString(), _quiet(), providers=["CPUExecutionProvider"])
        except _REFUSALS as err:
            refused.append(f"onnxruntime refused opset {opset}: {_ort_problem(err, 160)}")
            continue
        break
    else:
        raise UserError(f"onnx export: {'; '.join(refused)}")
    for record, choice in zip(records, choices, strict=True):
        record["onnx"] = choice
    onnx.save(model, str(path))
    written_keys = [o.name for o in model.graph.output]
    check = check_onnx(path, _answering(student, answers, written_keys), sample, answers=answers)
    if check["images_within_tolerance"] < len(sample):
        log.warning(
            f"{path}: {len(sample) - check['images_within_tolerance']} of {len(sample)} check images "
            f"differ from PyTorch by more than {TOLERANCE:g} x the largest value of an output "
            f"(largest difference{' of detections found by both' if answers == 'detections' else ''} "
            f"{check['max_abs_diff']:.3g}): "
            "activations at rounding boundaries took neighbouring levels (see deploy/onnx_export.py)"
        )
    return {
        "file": path.name,
        "opset": opset,
        "runtime": ort.__version__,
        "tracer": tracer,
        "answers": answers,
        **({"newer_opsets": refused} if refused else {}),
        **({"batch": 1} if not whole else {}),
        "check_source": check_source if check_images is not None else "random images",
        **check,
        "bytes": path.stat().st_size,
    }


def random_images(input_shape: tuple[int, ...], answers: str = "logits") -> Tensor:
    """:data:`CHECK_IMAGES` fixed random images of ``input_shape``: where no real ones are at hand."""
    generator = torch.Generator().manual_seed(0)
    if answers == "detections":  # images in [0, 1], as detectors read them (they normalise inside)
        return torch.rand(CHECK_IMAGES, *input_shape, generator=generator)
    return torch.randn(CHECK_IMAGES, *input_shape, generator=generator)


_REFUSALS = (
    ort_errors.Fail,
    ort_errors.InvalidGraph,
    ort_errors.NotImplemented,
    ort_errors.InvalidArgument,
    ort_errors.RuntimeException,
)
"""What onnxruntime raises when it will not load a file (its graph optimizer, a type or kernel it lacks)."""


def _onnx_model(
    student: nn.Module, layers: list[QuantizedLayer], sample: Tensor, opset: int, tracer: str, answers: str
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
        keys = _detection_keys(form, sample[:1]) if answers == "detections" else []
        network = _answering(form, answers, keys)
        if tracer == "torchscript":
            model = _traced_by_torchscript(network, sample, opset)
        else:
            model = _traced_by_torch_export(network, sample, opset, dynamic_batch=whole)
    _drop_unused_initializers(model)
    if not whole:
        _share_equal_initializers(model)
    onnx.checker.check_model(model, full_check=True)
    return model, choices


def _traced_by_torch_export(network: nn.Module, sample: Tensor, opset: int, *, dynamic_batch: bool):
    # RAFT keeps its correlation pyramid as attributes of the block, set on every call: nothing to keep
    warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
    program = torch.onnx.export(
        network,
        (sample,),
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None,
        custom_translation_table={
            torch.ops.cmtkd_export.fake_quantize.default: _activation_onnx,
            torch.ops.cmtkd_export.quantized_weight.default: _weight_onnx,
        },
        input_names=["images"],
        output_names=_output_names(network),
        verbose=False,
    )
    return program.model_proto


def _traced_by_torchscript(network: nn.Module, sample: Tensor, opset: int) -> onnx.ModelProto:
    # the tracer's warnings are about Python values it records as constants (torchvision's detectors
    # raise dozens): the sizes of the one image it runs, what a batch-1 file of a fixed input size has;
    # what the recorded logic computes on other images is what the check below measures
    warnings.simplefilter("ignore")
    _register_torchscript_symbolics()
    written = io.BytesIO()
    torch.onnx.export(
        network,
        (sample,),
        written,
        dynamo=False,
        opset_version=opset,
        input_names=["images"],
        output_names=_output_names(network),
    )
    return onnx.load_from_string(written.getvalue())


def _output_names(network: nn.Module) -> list[str]:
    return list(network.keys) if isinstance(network, _FirstImageDetections) else ["logits"]


def _detection_keys(network: nn.Module, example: Tensor) -> list[str]:
    """What a detector answers for each image (boxes, labels, scores, masks...), read on one ``example``."""
    with torch.no_grad():
        return list(network.eval()(example)[LOGITS][0])


def _answering(network: nn.Module, answers: str, keys: list[str]) -> nn.Module:
    """``network`` as the ONNX file answers (see :func:`export_onnx`), in eval mode; ``keys``: a
    detector's outputs, in the file's order."""
    network = network.eval()
    if answers == "detections":
        return _FirstImageDetections(network, keys).eval()
    if not isinstance(network, fx.GraphModule):  # rewritten part by part: it answers a dict
        return _LogitsOnly(network).eval()
    return network


def check_onnx(path: Path, network: nn.Module, images: Tensor, *, answers: str = "logits") -> dict:
    """onnxruntime against PyTorch's ``network`` (as the file answers) on ``images``: how many images agree
    within ``TOLERANCE`` x max(1, max |value|) of each output, the largest absolute difference, and
    top-1 agreement (of every pixel, for a segmentation network), or for a ``flow`` the mean end-point
    distance between the two flows (px), or for ``detections`` :func:`_check_detections`. A model with
    a fixed batch of one runs image by image."""
    session = ort.InferenceSession(str(path), _quiet(), providers=["CPUExecutionProvider"])
    if answers == "detections":
        return _check_detections(session, network, images)
    fixed = session.get_inputs()[0].shape[0] == 1
    batches = images.split(1) if fixed else (images,)
    got = np.concatenate([_run(session, b)[0] for b in batches])
    with torch.no_grad():
        expected = network(images).numpy()
    tolerance = TOLERANCE * max(1.0, float(np.abs(expected).max()))
    per_image = np.abs(got - expected).reshape(len(images), -1).max(axis=1)  # a map's pixels too
    if answers == "flow":
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


def _run(session: ort.InferenceSession, images: Tensor) -> list[np.ndarray]:
    """The file's outputs on ``images``; onnxruntime failing to run it (a traced graph that does not hold
    for another input) is one line."""
    try:
        return session.run(None, {"images": images.numpy()})
    except _REFUSALS as err:
        problem = _ort_problem(err, 200)
        raise UserError(
            f"onnx export: onnxruntime cannot run the written file on a check image ({problem})"
        ) from None


def _ort_problem(err: Exception, limit: int) -> str:
    """The end of onnxruntime's first line of an error (its start is the status code, its end the cause)."""
    return str(err).strip().splitlines()[0][-limit:]


MATCH_IOU = 0.5
"""Two detections are the same where their classes are and their boxes overlap by this IoU (COCO's AP50)."""


def _check_detections(session: ort.InferenceSession, network: nn.Module, images: Tensor) -> dict:
    """Image by image: whether onnxruntime's detections are PyTorch's (:func:`_same_output`); the
    detections both find (:func:`_matched`) over all they find, 2 x matched / (PyTorch's + onnxruntime's)
    (1 where neither finds any); and the largest difference of a matched pair's box corners and score."""
    names = [o.name for o in session.get_outputs()]
    within = matched = 0
    counts = [0, 0]  # PyTorch's detections, onnxruntime's
    largest = 0.0
    for image in images.split(1):
        got = dict(zip(names, _run(session, image), strict=True))
        with torch.no_grad():
            expected = dict(zip(names, (t.numpy() for t in network(image)), strict=True))
        within += all(_same_output(k, got[k], expected[k]) for k in names)
        pairs = _matched(expected, got)
        matched += len(pairs)
        counts[0] += len(expected["scores"])
        counts[1] += len(got["scores"])
        for i, j in pairs:
            box = np.abs(expected["boxes"][i] - got["boxes"][j]).max()
            largest = max(largest, float(box), float(abs(expected["scores"][i] - got["scores"][j])))
    return {
        "check_images": len(images),
        "tolerance": TOLERANCE,
        "images_within_tolerance": within,
        "detections": counts,
        "detection_agreement": 2 * matched / sum(counts) if sum(counts) else 1.0,
        "max_abs_diff": largest,
    }


def _same_output(key: str, got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether one output of a detector's ONNX is PyTorch's: as many values, each within ``TOLERANCE`` x
    max(1, the largest); of ``masks``, all but a ``TOLERANCE`` share of the pixels (pasting a mask rounds
    its box to whole pixels, so a box edge within float rounding of a pixel's may move that pixel)."""
    if got.shape != expected.shape:
        return False
    off = np.abs(got.astype(np.float64) - expected) > TOLERANCE * max(
        1.0, float(np.abs(expected).max(initial=0))
    )
    return bool(off.mean() <= TOLERANCE) if key == "masks" and off.size else not off.any()


def _matched(expected: dict, got: dict) -> list[tuple[int, int]]:
    """Greedy pairs (PyTorch's index, onnxruntime's) in PyTorch's score order: the best-overlapping
    unpaired detection of the same class whose box IoU is at least :data:`MATCH_IOU`."""
    from torchvision.ops import box_iou

    if not len(expected["boxes"]) or not len(got["boxes"]):
        return []
    iou = box_iou(torch.from_numpy(expected["boxes"]).float(), torch.from_numpy(got["boxes"]).float())
    iou = iou.nan_to_num(0.0)  # two boxes of no area: 0 / 0
    iou[torch.from_numpy(expected["labels"])[:, None] != torch.from_numpy(got["labels"])[None, :]] = 0
    pairs, taken = [], set()
    for i in np.argsort(-expected["scores"], kind="stable"):
        row = iou[i].clone()
        row[list(taken)] = 0
        j = int(row.argmax())
        if row[j] >= MATCH_IOU:
            pairs.append((int(i), j))
            taken.add(j)
    return pairs


class _LogitsOnly(nn.Module):
    """The network's ``logits`` where it answers a dict (a network rewritten part by part)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        out = self.network(x)
        return out[LOGITS] if isinstance(out, dict) else out


class _FirstImageDetections(nn.Module):
    """A detector's detections of its first image as a tuple, one tensor per key (``keys``)."""

    def __init__(self, network: nn.Module, keys: list[str]):
        super().__init__()
        self.network, self.keys = network, keys

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        detections = self.network(x)[LOGITS][0]
        return tuple(detections[k] for k in self.keys)


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
    note = f"; {', '.join(passed)}" if passed else ""
    raise UserError(f"ONNX export: no integer type holds {low}..{high} ({what}){note}")


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
