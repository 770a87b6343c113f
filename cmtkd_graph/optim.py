"""One optimizer with parameter groups by role, and the learning-rate schedules (docs/training.md; the
paper's settings: docs/methods.md#the-papers-training-settings).

Groups (each has a ``name`` used in logs):

* ``student`` / ``teacher{k}`` — model weights, weight decay by that model's weight bit-width
  (``weight_decay_low_bits`` up to ``low_bits`` bits, else ``weight_decay``);
* ``student/norm`` / ``teacher{k}/norm`` — with ``optim.norm_weight_decay`` set, the parameters of the
  normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) with that decay instead (the
  ``--norm-weight-decay`` of torchvision's classification reference, which sets it to 0 for ConvNeXt,
  Swin and EfficientNetV2);
* ``importance`` — the fusion logits, their own lr (default lr / 10), no weight decay;
* ``quantizers`` — learned quantizer parameters (LSQ steps), no weight decay;
* ``quantizers/student``, ``quantizers/teacher{k}`` — learned quantizer parameters with an L2 decay of
  their own (PACT's clipping levels: lambda_alpha, by default the network's weight decay);
* ``adapters`` — FitNet adapters;
* the method's own groups (e.g. AMTML-KD's ``weighting``), from ``system.method.parameter_groups``.

Frozen parameters (loaded teachers) are in no group. Every group follows ``optim.schedule`` unless the
method gives it a schedule of its own (``Method.lr_factors``: AMTML-KD's two phases).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cmtkd_graph.fusion import Fusion
from cmtkd_graph.methods import method_for
from cmtkd_graph.quantizers import Quantizer
from cmtkd_graph.spec import FULL_PRECISION, OptimSpec, ScheduleSpec, Spec

NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
"""The normalisation layers whose parameters ``optim.norm_weight_decay`` decays (torchvision's
reference's ``norm_classes``)."""


def _role_of_parameters(
    module: nn.Module, weight_decay: float = 0.0
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter], list[tuple[nn.Parameter, float]]]:
    """Split ``module``'s trainable parameters into (weights, quantizer params, fusion logits, quantizer
    params with an L2 decay of their own and that decay), ``weight_decay`` being the module's."""
    special: dict[int, str] = {}
    decay: dict[int, float] = {}
    for sub in module.modules():
        if isinstance(sub, Quantizer):
            special.update({id(p): "quantizer" for p in sub.parameters()})
            decay.update({id(p): sub.parameter_decay(weight_decay) for p in sub.parameters()})
        elif isinstance(sub, Fusion):
            special.update({id(p): "fusion" for p in sub.parameters()})
    weights, quant, fusion, decayed = [], [], [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if decay.get(id(p)):
            decayed.append((p, decay[id(p)]))
            continue
        {"quantizer": quant, "fusion": fusion}.get(special.get(id(p)), weights).append(p)
    return weights, quant, fusion, decayed


def weight_decay_for(bits: int, optim: OptimSpec) -> float:
    """The paper's rule: 25e-6 for 1- or 2-bit models, 1e-4 above (both configurable)."""
    return (
        optim.weight_decay_low_bits
        if bits != FULL_PRECISION and bits <= optim.low_bits
        else optim.weight_decay
    )


def parameter_groups(system: nn.Module, spec: Spec) -> list[dict]:
    """The optimizer's parameter groups for a :class:`~cmtkd_graph.system.DistillationSystem`."""
    o = spec.optim
    groups: list[dict] = []
    quantizer_params: list[nn.Parameter] = []
    fusion_params: list[nn.Parameter] = []

    assigned: set[int] = set()  # a parameter two networks share (CTKD's stem) joins the first's group

    def add_model(name: str, module: nn.Module, bits: int) -> None:
        decay = weight_decay_for(bits, o)
        weights, quant, fusion, decayed = _role_of_parameters(module, decay)
        weights = [p for p in weights if id(p) not in assigned]
        assigned.update(id(p) for p in weights)
        quantizer_params.extend(quant)
        fusion_params.extend(fusion)
        if weights:
            groups.append({"name": name, "params": weights, "lr": o.lr, "weight_decay": decay})
        values = sorted({d for _, d in decayed})  # e.g. PACT's clipping levels (lambda_alpha)
        for value in values:
            params = [p for p, d in decayed if d == value]
            suffix = "" if len(values) == 1 else f"-{value:g}"
            groups.append(
                {
                    "name": f"quantizers/{name}{suffix}",
                    "params": params,
                    "lr": o.quantizer_lr,
                    "weight_decay": value,
                }
            )

    def add_norms(name: str, module: nn.Module) -> None:
        """Move the normalisation layers' parameters of group ``name`` into ``name/norm``."""
        if o.norm_weight_decay is None:
            return
        norms = {id(p) for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
        group = next((g for g in groups if g["name"] == name), None)
        if group is None or not norms:
            return
        moved = [p for p in group["params"] if id(p) in norms]
        group["params"] = [p for p in group["params"] if id(p) not in norms]
        if moved:
            groups.append(
                {"name": f"{name}/norm", "params": moved, "lr": o.lr, "weight_decay": o.norm_weight_decay}
            )
        if not group["params"]:
            groups.remove(group)

    add_model("student", system.student, spec.student.weight_bits)
    add_norms("student", system.student)
    if system.teachers is not None:
        for k, teacher in enumerate(spec.teachers):
            add_model(f"teacher{k}", system.teachers.get_submodule(f"teacher{k}"), teacher.weight_bits)
            add_norms(f"teacher{k}", system.teachers.get_submodule(f"teacher{k}"))
        if hasattr(system.teachers, "fusion"):  # composed teachers
            _, _, fusion, _ = _role_of_parameters(system.teachers.get_submodule("fusion"))
            fusion_params.extend(fusion)
    if fusion_params:
        groups.append(
            {"name": "importance", "params": fusion_params, "lr": o.importance_lr, "weight_decay": 0.0}
        )
    if quantizer_params:
        groups.append(
            {"name": "quantizers", "params": quantizer_params, "lr": o.quantizer_lr, "weight_decay": 0.0}
        )
    adapter_params = [p for p in system.adapters.parameters() if p.requires_grad]
    if adapter_params:
        groups.append(
            {"name": "adapters", "params": adapter_params, "lr": o.adapter_lr, "weight_decay": o.weight_decay}
        )
    groups.extend(system.method.parameter_groups(system.method_context))
    _check_disjoint(system, groups)
    return groups


def _check_disjoint(system: nn.Module, groups: list[dict]) -> None:
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in system.parameters() if p.requires_grad}
    if len(seen) != len(set(seen)) or set(seen) != trainable:
        raise RuntimeError("parameter groups must cover every trainable parameter exactly once")


def build_optimizer(system: nn.Module, spec: Spec) -> torch.optim.Optimizer:
    """SGD or AdamW over the groups above, with torch's fused kernels where the parameters' device has
    them (CPU and CUDA): one pass over each tensor per step instead of several per-tensor ops, about
    half the optimizer's time per step on CPU (``python -m bench.step --only c``)."""
    o = spec.optim
    groups = parameter_groups(system, spec)
    if o.name == "sgd":
        options = {"lr": o.lr, "momentum": o.momentum, "nesterov": o.nesterov}
        kind = torch.optim.SGD
    else:
        options = {"lr": o.lr, "betas": (o.momentum, 0.999)}
        kind = torch.optim.AdamW
    try:
        return kind(groups, fused=True, **options)
    except RuntimeError:  # a device without fused kernels (e.g. meta, an older torch on this device)
        return kind(groups, **options)


def lr_factor(epoch: float, schedule: ScheduleSpec, total_epochs: int, base_lr: float) -> float:
    """Multiplier of every group's base lr at (fractional) ``epoch``: warm-up, then the schedule."""
    if schedule.warmup_epochs and epoch < schedule.warmup_epochs:
        start = schedule.warmup_start_factor
        return start + (1 - start) * epoch / schedule.warmup_epochs
    if schedule.name == "multistep":
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    if schedule.name == "cosine":
        span = max(total_epochs - schedule.warmup_epochs, 1e-9)
        t = min(max(epoch - schedule.warmup_epochs, 0.0) / span, 1.0)
        floor = schedule.min_lr / base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: Spec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (``step_every: iteration``) or per epoch: every group
    on ``optim.schedule``, except the groups whose schedule the method sets (``Method.lr_factors``)."""
    sched = spec.optim.schedule
    per_iteration = sched.step_every == "iteration"

    def schedule(epoch: float) -> float:
        return lr_factor(epoch, sched, spec.train.epochs, spec.optim.lr)

    own = method_for(spec).lr_factors(schedule)

    def at_count(factor):
        return lambda count: factor(count / steps_per_epoch if per_iteration else float(count))

    factors = [at_count(own.get(g["name"], own.get("*", schedule))) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
