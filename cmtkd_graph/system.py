"""``build_system(spec)``: the student, the teachers, the adapters and the method's modules as one module.

Each network goes through the same pipeline of graph passes:

    torchvision builder -> trace -> keep_main_output -> explicit_activations -> surgery
    -> quantize -> (weights) -> taps

(a network that trains keeps its auxiliary head where the task has one and the builder made it:
segmentation's ``aux_loss``; the deployed student never has it).

then the teachers are arranged as the method says (``cmtkd_graph.methods``): composed into one graph
with fusion nodes (``passes.compose``) or side by side (``passes.stack``); the student exposes its tap
features as outputs (``passes.outputs.expose_taps``), and tap shapes are checked before anything trains.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from cmtkd_graph.errors import UserError
from cmtkd_graph.fusion import ImportanceFusion, output_fusion
from cmtkd_graph.losses import FitNetAdapter
from cmtkd_graph.methods import BuildContext, Method, MethodContext, method_for
from cmtkd_graph.models.builders import build_model, read_state_dict
from cmtkd_graph.models.meta_device import no_init_on_meta
from cmtkd_graph.passes.activations import explicit_activations
from cmtkd_graph.passes.common import (
    AUX,
    EACH_AUX,
    EACH_LOGITS,
    EXTRAS,
    FEATURES,
    LOGITS,
    META,
    SHARED,
    fusion_key,
)
from cmtkd_graph.passes.compose import check_tap_shapes, compose_teachers
from cmtkd_graph.passes.graph_pass import finish, graph_modules
from cmtkd_graph.passes.inplace import inplace_where_safe
from cmtkd_graph.passes.outputs import expose_taps, keep_main_output
from cmtkd_graph.passes.precision import LayerRule
from cmtkd_graph.passes.quantize import quantize
from cmtkd_graph.passes.recompute import checkpoint_segments
from cmtkd_graph.passes.shapes import copy_shapes, propagate_shapes
from cmtkd_graph.passes.stack import stack_teachers
from cmtkd_graph.passes.surgery import run_surgery
from cmtkd_graph.passes.taps import AUTO, Tap, resolve_taps
from cmtkd_graph.passes.tracer import copy_graph_module, trace
from cmtkd_graph.quantizers import FULL_PRECISION, build_quantizer_family
from cmtkd_graph.spec import ModelSpec, Spec, SurgerySpec
from cmtkd_graph.system_output import SystemOutput
from cmtkd_graph.tasks import task_record

log = logging.getLogger("cmtkd_graph")


@dataclass
class NetworkInfo:
    """What was built for one network (for summaries and inspection)."""

    label: str  # "student" or "teacher{k}"
    spec: ModelSpec
    taps: list[Tap] = field(default_factory=list)
    weights_report: str = ""


def float_network(
    model: ModelSpec, surgery: list[SurgerySpec], *, device: str | torch.device = "cpu"
) -> fx.GraphModule:
    """The traced float network: main output only, explicit activations, surgery applied."""
    return finish(_float_graph(model, surgery, device))


def _float_graph(
    model: ModelSpec, surgery: list[SurgerySpec], device: str | torch.device, *, aux: bool = False
) -> fx.GraphModule:
    """``float_network`` before code generation. The traced graph belongs to this function alone, so
    the passes run in place, and the caller generates code once, after its own passes. ``aux``: keep the
    task's auxiliary output where the model has one (a network that trains)."""
    gm = trace(instantiate(model, device), train=True)
    task = task_record(model.arch)
    keep_main_output.in_place(gm, key=task.main_output, aux_key=task.aux_output if aux else None)
    explicit_activations.in_place(gm)
    for step in surgery:
        run_surgery(gm, step.name, step.options, in_place=True)
    return gm


def build_network(
    model: ModelSpec, spec: Spec, *, device: str | torch.device = "cpu", network: str = "student"
) -> fx.GraphModule:
    """One network through the pass pipeline (no taps yet). ``device="meta"`` allocates nothing;
    ``network`` (student or teacher) is what the precision rules' ``network`` selector sees."""
    graph = _float_graph(model, spec.surgery_for(model), device)
    return finish(quantize_network(graph, model, spec, network))


def quantize_network(gm: fx.GraphModule, model: ModelSpec, spec: Spec, network: str) -> fx.GraphModule:
    """The quantization pass of ``build_network``, in place and before code generation: ``build_system``
    copies the teachers' nodes into the composed graph and never runs their own code, and generates the
    student's after exposing its taps."""
    q = spec.quantizer
    quantize.in_place(
        gm,
        build_quantizer_family(q.name, q.options),
        weight_bits=model.weight_bits,
        act_bits=model.act_bits,
        first_layer_bits=q.first_layer_bits,
        last_layer_bits=q.last_layer_bits,
        rules=layer_rules(spec),
        network=network,
    )
    return gm


def layer_rules(spec: Spec) -> list[LayerRule]:
    """The spec's ``quantizer.rules`` as the quantize pass takes them (``passes/precision.py``)."""
    rules = []
    for i, rule in enumerate(spec.quantizer.rules):
        weight_bits, act_bits = rule.bits()
        family = None if rule.quantizer is None else _rule_family(i, rule.quantizer, rule.options)
        rules.append(
            LayerRule(
                f"quantizer.rules[{i}]",
                **rule.match.model_dump(),
                weight_bits=weight_bits,
                act_bits=act_bits,
                family=family,
            )
        )
    return rules


def _rule_family(index: int, name: str, options: dict):
    """The quantizer family a rule asks for; a bad option is named at the rule's own key."""
    try:
        return build_quantizer_family(name, options)
    except UserError as err:
        message = str(err).replace("quantizer.options", f"quantizer.rules[{index}].options")
        raise type(err)(message) from None


def warn_rules_on_float_teachers(
    spec: Spec, teachers: list[nn.Module], teacher_specs: list[ModelSpec]
) -> None:
    """A rule without a ``network`` selector also quantizes a full-precision teacher's layers: allowed
    (as first_layer_bits does), but said, since it is rarely meant."""
    for k, (gm, model) in enumerate(zip(teachers, teacher_specs, strict=True)):
        if model.weight_bits != FULL_PRECISION or model.act_bits != FULL_PRECISION:
            continue
        decided: dict[str, int] = {}
        for node in (node for graph in graph_modules(gm) for node in graph.graph.nodes):
            info = node.meta.get(META, {})
            label = info.get("rule_label")
            if label and (info["weight_bits"], info["act_bits"]) != (FULL_PRECISION, FULL_PRECISION):
                decided[label] = decided.get(label, 0) + 1
        for label, count in decided.items():
            log.warning(
                f"{label} quantizes {count} layer(s) of teacher{k} ({model.arch} {model.bits_label}, a "
                "full-precision network); add network: student to its match to leave the teacher float"
            )


def check_rules_used(spec: Spec, networks: list[nn.Module]) -> None:
    """Every precision rule decides at least one layer of ``networks`` (a rule that matches nothing is a
    typo in a name or a role the architecture does not have: one line, not a silent no-op)."""
    graphs = [gm for network in networks for gm in graph_modules(network)]
    used = {node.meta.get(META, {}).get("rule_label") for gm in graphs for node in gm.graph.nodes}
    for label in (f"quantizer.rules[{i}]" for i in range(len(spec.quantizer.rules))):
        if label not in used:
            rule = next(r for r in layer_rules(spec) if r.label == label)
            where = (
                "`cmtkd-graph inspect SPEC` lists the layers with their names, positions and roles"
                if "inspect" not in task_record(spec.student.arch).missing_verbs
                else "layers are named as in the model's state dict (`torchvision.models.get_model(ARCH)"
                ".named_modules()`)"
            )
            raise UserError(
                f"{label}: matches no layer of {spec.student.arch} or its teachers ({rule.selectors}), or "
                f"only layers an earlier rule decides; {where}"
            )


def instantiate(model: ModelSpec, device: str | torch.device) -> nn.Module:
    """The float torchvision model of ``model`` on ``device`` (on meta: nothing allocated or initialised)."""
    if torch.device(device).type != "meta":
        return build_model(model.arch, model.kwargs).to(device)
    from accelerate import init_empty_weights

    if model.arch in BUILT_BY_RUNNING:
        return build_model(model.arch, model.kwargs).to("meta")
    # Parameters only (tensor-valued builder arithmetic, e.g. RegNet's widths, must stay real).
    with init_empty_weights(include_buffers=False), no_init_on_meta():
        module = build_model(model.arch, model.kwargs)
    return module.to("meta")


BUILT_BY_RUNNING = frozenset({"ssdlite320_mobilenet_v3_large"})
"""Builders that run their layers while building (SSDlite runs its backbone to count its channels): on the
meta device they are built on the CPU and moved."""


def load_weights(gm: fx.GraphModule, source: str, *, label: str) -> str:
    """Load a checkpoint / torchvision weights into a built network; return a one-line report.

    Keys whose shapes differ (a new classifier, a CIFAR stem) are skipped and reported; missing
    quantizer state (steps initialised from data) is expected.
    """
    state = read_state_dict(source)
    own = gm.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    result = gm.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys if "quantizer" not in k and k not in mismatched]
    unexpected = sorted(k for k in state if k not in own)
    report = f"{label}: loaded {len(usable)} tensors from {source}"
    if mismatched:
        report += f"; skipped {len(mismatched)} with other shapes ({', '.join(mismatched[:4])}...)"
    if missing:
        report += f"; {len(missing)} not in the checkpoint ({', '.join(missing[:4])}...)"
    if unexpected:
        report += f"; {len(unexpected)} unused ({', '.join(unexpected[:4])}...)"
    if not usable:
        raise UserError(f"{label}.weights: nothing in {source} matches the model (wrong architecture?)")
    return report


class SystemBase(nn.Module):
    """What every system has, whatever its networks: the spec, its task and method, the student, the
    teachers (``teacher{k}`` submodules holding each one's parameters, and ``fusion``), the FitNet adapters
    and the method's modules; frozen teachers kept in eval mode; the importance of the fusions. Subclasses
    set ``student``, ``teachers``, ``adapters``, ``method_modules`` and ``networks``, then call
    :meth:`_freeze`."""

    def __init__(self, spec: Spec, method: Method | None = None):
        super().__init__()
        self.spec = spec
        # systems of networks rewritten part by part: the part of every network whose output the teachers'
        # fusion of that name (``teachers.fusion.<name>``) combines, where eager code runs it (for inspect)
        self.output_parts: dict[str, str] = {}
        self.mutual_label: str | None = None  # their mutual-learning loss, where not the method's own
        self.task = task_record(spec.student.arch)  # what the outputs mean (looked up once, not per step)
        self.method = method if method is not None else method_for(spec)
        self.frozen_teachers = [k for k, t in enumerate(spec.teachers) if not t.trainable]
        # The fractional epoch of the step being trained, for methods whose objective changes with it
        # (the trainer sets it); a tensor, so that a compiled step does not recompile as it moves.
        self.register_buffer("epoch", torch.zeros(()), persistent=False)

    @property
    def num_teachers(self) -> int:
        return len(self.spec.teachers)

    @property
    def teacher_trains(self) -> bool:
        """At least one teacher is trained (its task loss is a loss term)."""
        return len(self.frozen_teachers) < self.num_teachers

    @property
    def method_context(self) -> MethodContext:
        """What the method's step hooks see of this system (its modules, the adapters, teacher_trains,
        the epoch)."""
        return MethodContext(
            self.method_modules, self.adapters, self.teacher_trains, self.epoch, self.task.labels_may_ignore
        )

    def _freeze(self) -> None:
        for k in self.frozen_teachers:
            teacher = self.teachers.get_submodule(f"teacher{k}")
            teacher.eval()
            teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> SystemBase:
        super().train(mode)
        if self.teachers is not None:
            self._freeze()  # loaded, frozen teachers always run in eval mode
        return self

    def importance(self) -> dict[str, Tensor]:
        """Softmax importance weights per tap (and ``output``), each a Tensor[K] (detached)."""
        if self.teachers is None or not hasattr(self.teachers, "fusion"):
            return {}
        fusions = self.teachers.get_submodule("fusion")
        weights = {m.tap: m.weights().detach() for m in fusions.children() if isinstance(m, ImportanceFusion)}
        return {tap: w if w.is_meta else w.cpu() for tap, w in weights.items()}


class DistillationSystem(SystemBase):
    """The student, the teachers, the FitNet adapters and the method's modules, trained by one objective.

    ``system(images)`` returns a :class:`SystemOutput`; ``system.losses(out, labels)`` the loss terms of
    the spec's method (``system.method``, see ``cmtkd_graph.methods``): CMT-KD's or any other registered
    method's. (``CMTKDSystem`` is the same class under its first name.)
    """

    def __init__(
        self,
        spec: Spec,
        student: fx.GraphModule,
        teachers: fx.GraphModule | None,
        adapters: nn.ModuleDict,
        networks: list[NetworkInfo],
        method: Method | None = None,
        method_modules: nn.ModuleDict | None = None,
    ):
        super().__init__(spec, method)
        self.student = student
        self.teachers = teachers
        self.adapters = adapters
        self.method_modules = method_modules if method_modules is not None else nn.ModuleDict()
        self.networks = networks
        self._freeze()

    def num_classes(self) -> int | None:
        """The number of classes the student outputs (known from shape propagation)."""
        for node in self.student.graph.nodes:
            if node.op == "output":
                val = node.args[0][LOGITS].meta.get("val")
                return None if val is None else int(val.shape[1])  # [B, classes, ...]
        return None

    def forward(
        self, images: Tensor, labels: Tensor | None = None
    ) -> SystemOutput | tuple[SystemOutput, dict[str, Tensor]]:
        """The networks' outputs; with ``labels``, also the loss terms, so that one call (which
        ``train.compile`` compiles and DDP wraps) covers the whole forward and objective."""
        s = self.student(images)
        out = SystemOutput(
            student_logits=s[LOGITS],
            student_features=s[FEATURES],
            extras=dict(s.get(EXTRAS, {})),
            student_aux=s.get(AUX),
        )
        if self.teachers is not None:
            if self.teacher_trains:
                t = self.teachers(images)
            else:
                with torch.no_grad():
                    t = self.teachers(images)
            out.each_teacher_logits = tuple(t[EACH_LOGITS])
            out.each_teacher_aux = tuple(t.get(EACH_AUX, ()))
            out.teacher_logits = t.get(LOGITS)
            out.shared_features = dict(t.get(SHARED, {}))
            features = t.get(FEATURES, {})
            hints = {k: v for k, v in features.items() if not k.endswith(LEARNER)}
            out.hints = dict(t[SHARED]) if SHARED in t else hints
            out.teacher_features = {
                k.removesuffix(LEARNER): v for k, v in features.items() if k.endswith(LEARNER)
            }
        self.method.complete(self.method_context, out)
        if labels is None:
            return out
        return out, self.losses(out, labels)

    def losses(self, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        """Every term of the method's objective, plus ``total`` (see ``cmtkd_graph.methods``), on the
        task's samples (a segmentation network's pixels); and ``aux``, the auxiliary heads' loss."""
        task = self.task
        samples, labels = out.as_samples(task), task.sample_labels(labels)
        terms = self.method.losses(self.method_context, samples, labels)
        aux = self.aux_loss(samples, labels)
        if aux is not None:
            terms["aux"] = aux
            terms["total"] = terms["total"] + task.aux_weight * self.spec.distill.alpha * aux
        return terms

    def aux_loss(self, samples: SystemOutput, labels: Tensor) -> Tensor | None:
        """The cross-entropy of every auxiliary head that trains (the student's, each trained teacher's),
        summed; weighted like the networks' own cross-entropy times the task's ``aux_weight`` (None: no
        network kept one). Only networks that train are built with their head (``_float_graph``)."""
        heads = [samples.student_aux, *samples.each_teacher_aux]
        ce = [self.method.ce(z, labels) for z in heads if z is not None]
        return torch.stack(ce).sum() if ce else None


CMTKDSystem = DistillationSystem
"""The first name of :class:`DistillationSystem`, kept for code written against it."""


def build_system(spec: Spec, *, device: str | torch.device = "cpu", load: bool = True) -> DistillationSystem:
    """Build the whole system described by ``spec`` (see module docstring).

    ``device="meta"`` builds the structure without allocating weights (large models, inspection);
    ``load=False`` skips the ``weights:`` of every network. A task whose networks do not trace whole
    builds its own system (``Task.system_builder``: optical flow's ``cmtkd_graph.flow_system``).
    """
    builder = task_record(spec.student.arch).system_builder
    if builder is not None:
        module, function = builder.split(":")
        return getattr(importlib.import_module(module), function)(spec, device=device, load=load)
    method = method_for(spec)
    input_shape = (2, *spec.data.input_shape())
    meta = torch.device(device).type == "meta"
    networks: list[NetworkInfo] = []

    built: dict[str, fx.GraphModule] = {}  # architecture+kwargs+surgery -> first network built
    float_graphs: dict[str, fx.GraphModule] = {}  # the same key -> its float graph (meta only)

    def float_graph(model: ModelSpec, key: str, aux: bool) -> fx.GraphModule:
        if not meta:  # every network gets its own random initialisation
            return _float_graph(model, spec.surgery_for(model), device, aux=aux)
        # Without values, networks of one graph differ in nothing: copying is half the cost of tracing.
        if key not in float_graphs:
            float_graphs[key] = _float_graph(model, spec.surgery_for(model), device, aux=aux)
        return copy_graph_module(float_graphs[key], tensors="meta")

    def make(model: ModelSpec, label: str, network: str) -> fx.GraphModule:
        aux = model.trainable  # a frozen teacher's auxiliary head would compute for nothing
        surgery = [s.model_dump() for s in spec.surgery_for(model)]
        same_graph = json.dumps([model.arch, model.kwargs, surgery, aux])
        gm = quantize_network(float_graph(model, same_graph, aux), model, spec, network)
        info = NetworkInfo(label, model)
        if load and model.weights and not meta:
            info.weights_report = load_weights(gm, model.weights, label=label)
            log.info(info.weights_report)
        if same_graph not in built or not copy_shapes(built[same_graph], gm):
            propagate_shapes(gm, input_shape)
            built.setdefault(same_graph, gm)
        networks.append(info)
        return gm

    student = make(spec.student, "student", "student")
    teacher_specs = spec.resolved_teachers()
    teachers = [make(t, f"teacher{k}", "teacher") for k, t in enumerate(teacher_specs)]
    check_rules_used(spec, [student, *teachers])
    warn_rules_on_float_teachers(spec, teachers, teacher_specs)
    for line in method.share_parameters(student, teachers):
        log.info(f"{spec.method}: {line}")

    feature_loss = spec.distill.feature_loss != "none"
    student_taps: list[Tap] = []
    hint_taps: list[Tap] = []  # the teacher tap each student tap learns from (for the adapters)
    composed = None
    if method.arrangement == "composed":
        teacher_taps: list[list[Tap]] = [[] for _ in teachers]
        if method.fuses_at_taps():
            teacher_taps = composed_teacher_taps(teachers, teacher_specs, spec, networks)
        if feature_loss and teacher_taps and teacher_taps[0]:
            student_taps = paired_student_taps(student, spec, teacher_taps[0])
            hint_taps = teacher_taps[0]
        composed = compose_teachers(teachers, teacher_taps, combine=method.combine())
    elif method.arrangement == "side_by_side":
        exposed: list[dict[str, Tap]] = [{} for _ in teachers]
        if feature_loss:
            student_taps, hint_taps = _hint_pairs(method, student, teachers, teacher_specs, spec, networks)
            for j, (s_tap, t_tap) in enumerate(zip(student_taps, hint_taps, strict=True)):
                exposed[method.hint_teacher(j, len(teachers))][s_tap.name] = t_tap
            learner = method.hint_learner()
            if learner is not None:
                learner_taps = _learner_taps(teachers[learner], teacher_specs[learner], spec, student_taps)
                networks[learner + 1].taps = learner_taps
                for s_tap, l_tap in zip(student_taps, learner_taps, strict=True):
                    exposed[learner][s_tap.name + LEARNER] = l_tap
        composed = stack_teachers(teachers, exposed)
    if composed is not None:
        inplace_where_safe.in_place(composed)  # the graph is final: activations and adds in place where safe
        composed = finish(composed)
        if spec.train.activation_checkpointing and not meta:
            composed = checkpoint_segments(composed)  # for training; inspection (meta) shows the plain graph
    if student_taps:
        networks[0].taps = student_taps
        _warn_constant_attention(spec, student_taps)

    extras = method.student_extras(student)
    method_modules = method.build_modules(BuildContext(spec, student, teachers, student_taps, extras))
    expose_taps.in_place(student, student_taps, extras)
    inplace_where_safe.in_place(student)
    student_gm = finish(student)
    adapters = fitnet_adapters(spec, student_taps, hint_taps, meta=meta)
    method_modules.to(device)
    return DistillationSystem(spec, student_gm, composed, adapters, networks, method, method_modules)


def composed_teacher_taps(
    teachers: list[fx.GraphModule], teacher_specs: list[ModelSpec], spec: Spec, networks: list[NetworkInfo]
) -> list[list[Tap]]:
    """Each teacher's taps (``taps.teachers``) where composition fuses them, recorded in ``networks``;
    the teachers' maps at every tap must have one shape."""
    teacher_taps = [
        resolve_taps(gm, spec.taps.teachers, arch=t.arch, model=f"teacher{k} ({t.arch})")
        for k, (gm, t) in enumerate(zip(teachers, teacher_specs, strict=True))
    ]
    for k, taps in enumerate(teacher_taps):
        networks[k + 1].taps = taps
    check_tap_shapes(
        teacher_taps, [f"teacher{k} ({t.arch} {t.bits_label})" for k, t in enumerate(teacher_specs)]
    )
    return teacher_taps


@dataclass
class ComposedParts:
    """What :func:`compose_part_teachers` builds for a system of networks rewritten part by part: the
    composed teachers (None: no teachers), the student's taps and the FitNet adapters."""

    teachers: fx.GraphModule | None
    student_taps: list[Tap]
    adapters: nn.ModuleDict


def compose_part_teachers(
    spec: Spec,
    student_part: fx.GraphModule,
    teacher_parts: list[fx.GraphModule],
    teacher_rests: list[dict[str, nn.Module]],
    networks: list[NetworkInfo],
    *,
    fusions: tuple[str, ...],
    device: str | torch.device,
) -> ComposedParts:
    """For networks rewritten part by part (RAFT, detectors): the teachers' tapped parts (``teacher_parts``:
    RAFT's feature encoders, the detectors' backbones) composed at their taps with shared knowledge
    (``compose_teachers(..., combine=None)``: each teacher's own maps come out), each teacher's other
    modules (``teacher_rests``, by name) attached beside its part's layers under ``teacher{k}``, one
    output fusion per name of ``fusions`` under ``fusion``; the student's part exposing its taps (where
    a feature loss reads them) and the FitNet adapters. ``networks`` records the taps."""
    meta = torch.device(device).type == "meta"
    student_taps: list[Tap] = []
    hint_taps: list[Tap] = []
    composed = None
    if teacher_parts:
        teacher_specs = spec.resolved_teachers()
        teacher_taps = composed_teacher_taps(teacher_parts, teacher_specs, spec, networks)
        hint_taps = teacher_taps[0]
        composed = compose_teachers(teacher_parts, teacher_taps, combine=None)
        inplace_where_safe.in_place(composed)
        composed = finish(composed)
        for k, rest in enumerate(teacher_rests):
            holder = composed.get_submodule(f"teacher{k}")
            for name, module in rest.items():
                holder.add_module(name, module)
        combine = method_for(spec).combine()
        for name in fusions:
            fusion = output_fusion(len(teacher_parts), combine, name).to(device)
            composed.get_submodule("fusion").add_module(name, fusion)
        if spec.distill.feature_loss != "none":
            student_taps = paired_student_taps(student_part, spec, hint_taps)
            networks[0].taps = student_taps
    expose_taps.in_place(student_part, student_taps)
    finish(student_part)
    hints = hint_taps if student_taps else []
    return ComposedParts(composed, student_taps, fitnet_adapters(spec, student_taps, hints, meta=meta))


def fitnet_adapters(
    spec: Spec, student_taps: list[Tap], hint_taps: list[Tap], *, meta: bool
) -> nn.ModuleDict:
    """With ``feature_loss: fitnet``, one adapter per student tap from its shape to its hint's (else none)."""
    adapters = nn.ModuleDict()
    if spec.distill.feature_loss == "fitnet":
        for s_tap, t_tap in zip(student_taps, hint_taps, strict=True):
            adapters[fusion_key(s_tap.name)] = FitNetAdapter(s_tap.shape, t_tap.shape)
    return adapters.to("meta") if meta else adapters


def _hint_pairs(
    method: Method,
    student: fx.GraphModule,
    teachers: list[fx.GraphModule],
    teacher_specs: list[ModelSpec],
    spec: Spec,
    networks: list[NetworkInfo],
) -> tuple[list[Tap], list[Tap]]:
    """Side-by-side teachers: the student's taps and, for each, the tap of the teacher it learns from
    (``method.hint_teacher``), at the same position in that teacher's own tap list."""
    names = spec.taps.student if spec.taps.student is not None else spec.taps.teachers
    s_label = f"student ({spec.student.arch})"
    student_taps = resolve_taps(student, names, arch=spec.student.arch, model=s_label)
    resolved: dict[int, list[Tap]] = {}
    hints = []
    for j, s_tap in enumerate(student_taps):
        k = method.hint_teacher(j, len(teachers))
        t = teacher_specs[k]
        if k not in resolved:
            label = f"teacher{k} ({t.arch})"
            resolved[k] = resolve_taps(teachers[k], spec.taps.teachers, arch=t.arch, model=label)
            if len(resolved[k]) != len(student_taps):
                raise UserError(
                    f"taps: the student has {len(student_taps)} taps "
                    f"({', '.join(x.name for x in student_taps)}) but {label} has {len(resolved[k])} "
                    f"({', '.join(x.name for x in resolved[k])}); list taps.teachers and taps.student"
                )
        t_tap = resolved[k][j]
        if (
            spec.distill.feature_loss == "attention"
            and s_tap.shape
            and t_tap.shape
            and len(s_tap.shape) != len(t_tap.shape)
        ):
            raise UserError(
                f"tap {s_tap.name!r}: student {list(s_tap.shape)} and teacher{k} {list(t_tap.shape)} "
                "differ in rank"
            )
        hints.append(Tap(s_tap.name, t_tap.node, t_tap.shape, t_tap.channels_last))
    for k in resolved:
        networks[k + 1].taps = [h for j, h in enumerate(hints) if method.hint_teacher(j, len(teachers)) == k]
    return student_taps, hints


LEARNER = "@learner"
"""The output key suffix of a teacher tap that learns from the hints (``Method.hint_learner``)."""


def _learner_taps(
    teacher: fx.GraphModule, model: ModelSpec, spec: Spec, student_taps: list[Tap]
) -> list[Tap]:
    """The taps of a teacher that learns from the hints, as many as the student's, at the same positions."""
    label = f"the learning teacher ({model.arch})"
    taps = resolve_taps(teacher, spec.taps.teachers, arch=model.arch, model=label)
    if len(taps) != len(student_taps):
        raise UserError(
            f"taps: the student has {len(student_taps)} taps but {label} has {len(taps)}; list taps.teachers"
        )
    return taps


def _warn_constant_attention(spec: Spec, taps: list[Tap]) -> None:
    """The attention map of a 1x1 (1x1x1) feature map is always 1: such a tap gives no signal."""
    if spec.distill.feature_loss != "attention":
        return
    flat = [t.name for t in taps if t.shape and len(t.shape) >= 3 and math.prod(t.shape[1:]) == 1]
    if flat:
        log.warning(
            f"taps {', '.join(flat)}: the student's feature map is a single position at input "
            f"{'x'.join(map(str, spec.data.input_shape()[1:]))}, "
            "so its attention map is constant and the attention loss there is always 0 "
            "(use larger inputs, a cifar_stem surgery, or other taps)"
        )


def paired_student_taps(student: fx.GraphModule, spec: Spec, teacher_taps: list[Tap]) -> list[Tap]:
    """The student's taps, keyed by the teachers' tap names so the pairs line up."""
    names = spec.taps.student
    if names is None:
        names = spec.taps.teachers
    label = f"student ({spec.student.arch})"
    resolved = resolve_taps(student, names, arch=spec.student.arch, model=label)
    if len(resolved) != len(teacher_taps):
        raise UserError(
            f"taps: the student has {len(resolved)} taps ({', '.join(t.name for t in resolved)}) but the "
            f"teachers have {len(teacher_taps)} ({', '.join(t.name for t in teacher_taps)}); set taps.student"
        )
    out = []
    for s, t in zip(resolved, teacher_taps, strict=True):
        if spec.distill.feature_loss == "attention" and s.shape and t.shape and len(s.shape) != len(t.shape):
            raise UserError(
                f"tap {t.name!r}: student {list(s.shape)} and teachers {list(t.shape)} differ in rank"
            )
        out.append(Tap(t.name, s.node, s.shape, s.channels_last))
    return out


__all__ = [
    "AUTO",
    "CMTKDSystem",
    "DistillationSystem",
    "NetworkInfo",
    "SystemOutput",
    "build_network",
    "build_system",
    "load_weights",
]
