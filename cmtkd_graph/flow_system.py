"""``build_flow_system(spec)``: CMT-KD for optical flow, RAFT students and teachers in one module.

RAFT does not trace whole (its refinement loop), so each network is rewritten part by part
(``cmtkd_graph.models.parts``: feature and context encoders, update block, mask predictor through the
same passes as any network) and run by :func:`refine`, torchvision's ``RAFT.forward`` after the feature
encoder, written out so that the encoder's output can come from elsewhere:

* the teachers' **feature encoders are composed** into one graph (``passes.compose``, ``combine=None``):
  at every tap an importance-weighted fusion forms the shared knowledge, which feeds every teacher's later
  encoder layers and is distilled into the student's tap (attention or FitNet), as in classification;
* each teacher refines from its own composed feature maps with its own context encoder, correlation and
  update block; the **combined teacher** is the importance-weighted fusion of the teachers' flows (one
  fusion, the same weights for every refinement);
* the objective (docs/tasks.md#optical-flow): RAFT's sequence loss for the student and, where a teacher
  trains, for the combined teacher (CMT-KD's CE_S and CE_T); mutual learning on the final flows, each of
  the two pulled (L1) towards the per-pixel flow of whichever has the smaller end-point error
  (``losses.min_error_flow``, our reading of KDCL-MinLogit for a regression output); the feature terms.

``method: single`` trains the student alone with its sequence loss.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow
from torchvision.models.optical_flow.raft import RAFT

from cmtkd_graph import losses
from cmtkd_graph.models.parts import build_part_network
from cmtkd_graph.passes.common import EACH_LOGITS, FEATURES, LOGITS, SHARED
from cmtkd_graph.passes.compose import OUTPUT_FUSION
from cmtkd_graph.passes.shapes import propagate_shapes
from cmtkd_graph.spec import ModelSpec, Spec
from cmtkd_graph.system import (
    NetworkInfo,
    SystemBase,
    check_rules_used,
    compose_part_teachers,
    warn_rules_on_float_teachers,
)
from cmtkd_graph.system_output import SystemOutput
from cmtkd_graph.tasks import task_record

log = logging.getLogger("cmtkd_graph")

FLOWS = "flows"
"""A flow network's output key: every refinement's flow, first to last (the last is ``LOGITS``)."""
RAFT_PARTS = ("feature_encoder", "context_encoder", "corr_block", "update_block", "mask_predictor")
"""What a RAFT is made of (torchvision's attribute names, hence its state-dict keys)."""


def split_pair(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, 3, 2, H, W]`` -> the first images and the second images, each ``[B, 3, H, W]``."""
    return pairs[:, :, 0], pairs[:, :, 1]


def refine(raft: nn.Module, fmaps: Tensor, first: Tensor, updates: int) -> list[Tensor]:
    """RAFT's estimates after its feature encoder: ``fmaps`` are the encoder's maps of the first images
    and then the second ones (``[2B, C, H/8, W/8]``), ``first`` the first images; ``raft`` holds the other
    parts (:data:`RAFT_PARTS`). Computes what ``RAFT.forward`` does (tests compare the two)."""
    batch, _, height, width = first.shape
    fmap1, fmap2 = torch.chunk(fmaps, chunks=2, dim=0)
    raft.corr_block.build_pyramid(fmap1, fmap2)
    context_out = raft.context_encoder(first)
    hidden_size = raft.update_block.hidden_state_size
    hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
    hidden, context = torch.tanh(hidden), F.relu(context)
    coords0 = make_coords_grid(batch, height // 8, width // 8).to(fmap1.device)
    coords1 = coords0.clone()
    flows = []
    for _ in range(updates):
        coords1 = coords1.detach()  # no gradient through the coordinates (RAFT's paper)
        correlation = raft.corr_block.index_pyramid(centroids_coords=coords1)
        hidden, delta = raft.update_block(hidden, context, correlation, coords1 - coords0)
        coords1 = coords1 + delta
        mask = None if raft.mask_predictor is None else raft.mask_predictor(hidden)
        flows.append(upsample_flow(flow=coords1 - coords0, up_mask=mask))
    return flows


class FlowNetwork(nn.Module):
    """One RAFT as a network of the tool: pairs ``[B, 3, 2, H, W]`` in, ``{LOGITS: the last flow,
    FLOWS: every flow, FEATURES: the tap features}`` out. Holds RAFT's parts under RAFT's names, so its
    state dict is torchvision's (plus quantizer state)."""

    def __init__(self, raft: RAFT, updates: int):
        super().__init__()
        for name in RAFT_PARTS:
            setattr(self, name, getattr(raft, name))
        self.updates = updates

    def forward(self, pairs: Tensor) -> dict:
        first, second = split_pair(pairs)
        encoded = self.feature_encoder(torch.cat([first, second], dim=0))
        fmaps, features = (encoded[LOGITS], encoded[FEATURES]) if isinstance(encoded, dict) else (encoded, {})
        flows = refine(self, fmaps, first, self.updates)
        return {LOGITS: flows[-1], FLOWS: flows, FEATURES: features}

    def extra_repr(self) -> str:
        return f"updates={self.updates}"


class FlowSystem(SystemBase):
    """The student and the teachers of an optical flow spec, trained by one objective (module docstring).

    Answers as :class:`~cmtkd_graph.system.DistillationSystem` does where the trainer and the evaluation
    ask: ``system(pairs, flows)`` -> (:class:`SystemOutput`, loss terms), with flows as ``*_logits``;
    ``teachers`` holds ``teacher{k}`` (every parameter of teacher k) and ``fusion``."""

    def __init__(
        self,
        spec: Spec,
        student: FlowNetwork,
        teachers: fx.GraphModule | None,
        adapters: nn.ModuleDict,
        networks: list[NetworkInfo],
    ):
        super().__init__(spec)
        self.student = student
        self.teachers = teachers
        self.adapters = adapters
        self.method_modules = nn.ModuleDict()
        self.networks = networks
        self.output_parts = {OUTPUT_FUSION: "update_block"}  # its flow head gives the flows
        self.mutual_label = "min-error flow L1 (mutual)"  # losses.min_error_flow
        self._freeze()

    def num_classes(self) -> int | None:
        return None  # flows, not classes

    def forward(
        self, pairs: Tensor, flows: Tensor | None = None
    ) -> SystemOutput | tuple[SystemOutput, dict[str, Tensor]]:
        s = self.student(pairs)
        out = SystemOutput(
            student_logits=s[LOGITS], student_features=dict(s[FEATURES]), extras={"flows/student": s[FLOWS]}
        )
        if self.teachers is not None:
            # frozen teachers run without gradients, their output fusion included (as composed graphs do)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.teacher_trains):
                each, shared = self._teacher_flows(pairs)
                fusion = self.teachers.get_submodule(f"fusion.{OUTPUT_FUSION}")
                combined = [fusion(*step) for step in zip(*each, strict=True)]
            out.each_teacher_logits = tuple(seq[-1] for seq in each)
            out.teacher_logits = combined[-1]
            out.extras["flows/combined"] = combined
            out.shared_features = shared
            out.hints = dict(shared)
        if flows is None:
            return out
        return out, self.losses(out, flows)

    def _teacher_flows(self, pairs: Tensor) -> tuple[list[list[Tensor]], dict[str, Tensor]]:
        """Every teacher's flows, and the shared knowledge of their composed encoders at the taps."""
        first, second = split_pair(pairs)
        composed = self.teachers(torch.cat([first, second], dim=0))
        each = [
            refine(self.teachers.get_submodule(f"teacher{k}"), fmaps, first, self.student.updates)
            for k, fmaps in enumerate(composed[EACH_LOGITS])
        ]
        return each, dict(composed[SHARED])

    def losses(self, out: SystemOutput, flows: Tensor) -> dict[str, Tensor]:
        """The objective's terms (module docstring) and ``total``."""
        d = self.spec.distill
        terms = {"seq_student": losses.sequence_loss(out.extras["flows/student"], flows)}
        total = d.alpha * terms["seq_student"]
        if out.teacher_logits is None:
            terms["total"] = total
            return terms
        if self.teacher_trains:
            terms["seq_teacher"] = losses.sequence_loss(out.extras["flows/combined"], flows)
            total = total + d.alpha * terms["seq_teacher"]
        if d.mutual_learning:
            target = losses.min_error_flow(out.teacher_logits, out.student_logits, flows)
            terms["ml_student"] = losses.flow_l1(out.student_logits, target, flows)
            terms["ml_teacher"] = losses.flow_l1(out.teacher_logits, target, flows)
            total = total + d.beta * (terms["ml_student"] + terms["ml_teacher"])
        terms["total"] = self.method.add_feature_terms(self.method_context, out, terms, total)
        return terms


def build_flow_system(spec: Spec, *, device: str | torch.device = "cpu", load: bool = True) -> FlowSystem:
    """Build the flow system of ``spec`` (module docstring). ``device="meta"`` builds the structure
    without allocating weights; ``load=False`` skips every network's ``weights:``."""
    task = task_record(spec.student.arch)
    channels, _, height, width = spec.data.input_shape()
    encoder_input = (4, channels, height, width)  # both images of a batch of 2
    networks: list[NetworkInfo] = []

    def make(model: ModelSpec, label: str, network: str) -> RAFT:
        raft = build_part_network(
            model, spec, label=label, network=network, networks=networks, device=device, load=load
        )
        propagate_shapes(raft.feature_encoder, encoder_input)
        return raft

    updates = task.flow_updates(spec.student.kwargs)
    student = make(spec.student, "student", "student")
    teacher_specs = spec.resolved_teachers()
    teachers = [make(t, f"teacher{k}", "teacher") for k, t in enumerate(teacher_specs)]
    check_rules_used(spec, [student, *teachers])
    warn_rules_on_float_teachers(spec, teachers, teacher_specs)

    rests = [{name: getattr(raft, name) for name in RAFT_PARTS[1:]} for raft in teachers]
    parts = compose_part_teachers(
        spec,
        student.feature_encoder,
        [t.feature_encoder for t in teachers],
        rests,
        networks,
        fusions=(OUTPUT_FUSION,),
        device=device,
    )
    return FlowSystem(spec, FlowNetwork(student, updates), parts.teachers, parts.adapters, networks)
