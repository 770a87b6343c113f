"""Short human-readable summaries: of a spec (``validate``) and of a model's tap-able nodes (``taps``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtkd_graph.methods import METHODS, method_for
from cmtkd_graph.passes.graph_pass import graph_modules
from cmtkd_graph.registry import TASKS
from cmtkd_graph.spec import Spec

if TYPE_CHECKING:
    from cmtkd_graph.system import DistillationSystem


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def spec_summary(spec: Spec, system: DistillationSystem | None = None, *, source: str = "spec") -> str:
    o, t, data = spec.optim, spec.train, spec.data
    task = spec.resolved_task + ("" if spec.task else f" (inferred from {spec.student.arch})")
    rows = [("experiment", f"{spec.name} (method {spec.method}, task {task})")]
    s = spec.student
    surgery = ", ".join(x.name for x in spec.surgery_for(s)) or "none"
    rows.append(("student", f"{s.arch} {s.bits_label}, quantizer {spec.quantizer.name}, surgery {surgery}"))
    if spec.teachers:
        roles = METHODS.get(spec.method).teacher_roles
        teachers = ", ".join(
            f"{t.arch} {t.bits_label}{_teacher_notes(t.trainable, roles[k] if k < len(roles) else None)}"
            for k, t in enumerate(spec.resolved_teachers())
        )
        rows.append(("teachers", f"{len(spec.teachers)}: {teachers}"))
    if system is not None:
        shown: list[str] = []
        for info in system.networks:
            taps = ", ".join(f"{tap.name} {list(tap.shape or ())}" for tap in info.taps)
            if taps and (info.label == "student" or taps not in shown):  # identical teachers: once
                rows.append((f"taps {info.label}", taps))
                shown.append(taps)
    if system is not None and spec.quantizer.rules:
        rows.append(("precision rules", _rules_text(system)))
    objective = TASKS.get(spec.resolved_task).objective(spec) or METHODS.get(spec.method).describe(spec)
    rows.append(("objective", objective + _aux_text(spec)))
    rows.append(
        (
            "data",
            f"{data.dataset} at {data.root or 'the default location'}, "
            f"input {'x'.join(map(str, data.input_shape()))}, "
            f"batch {data.batch_size}",
        )
    )
    recipe = _recipe_text(spec)
    if recipe:
        rows.append(("recipe", recipe))
    rows.append(
        (
            "optimizer",
            f"{o.name} lr {o.lr:g} momentum {o.momentum:g}, "
            + (f"importance lr {o.importance_lr:g}, " if _composed(spec) else "")
            + "weight decay "
            f"{o.weight_decay_low_bits:g} (<= {o.low_bits} bits) / {o.weight_decay:g}",
        )
    )
    sched = o.schedule
    detail = f" at {sched.milestones} x{sched.gamma:g}" if sched.name == "multistep" else ""
    warm = f", warm-up {sched.warmup_epochs:g} epochs" if sched.warmup_epochs else ""
    text = f"{sched.name}{detail}{warm}, stepped per {sched.step_every}"
    own = method_for(spec).lr_factors(lambda epoch: 1.0)
    if own:  # the method schedules some groups itself (its objective line says how)
        groups = "every group" if "*" in own else ", ".join(sorted(own)) + " group(s)"
        text += f"; {groups}: the method's own schedule (see objective)"
    rows.append(("schedule", text))
    rows.append(
        (
            "training",
            f"{t.epochs} epochs{f' (max {t.max_steps} steps)' if t.max_steps else ''}, seed {t.seed}, "
            f"mixed precision {t.mixed_precision or 'from accelerate config'}, channels_last "
            f"{t.channels_last}, run dir {spec.run_dir}",
        )
    )
    if system is not None:
        student = sum(p.numel() for p in system.student.parameters())
        teachers = sum(p.numel() for p in system.teachers.parameters()) if system.teachers is not None else 0
        text = f"student {_millions(student)}, teachers {_millions(teachers)}"
        for name, module in system.method_modules.items():
            text += f", {name} {sum(p.numel() for p in module.parameters()):,}"
        rows.append(("parameters", text))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{source}: valid"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _recipe_text(spec: Spec) -> str:
    """``policy trivialaugment_wide, random erasing 0.1, mixup 0.2 or cutmix 1, label smoothing 0.1``:
    the recipe options set beyond the crop and flip (docs/training.md), or ''."""
    a = spec.data.augment
    parts = [f"{spec.recipe} (filling what the spec leaves unset)"] if spec.recipe else []
    if a.policy != "none":
        parts.append(f"policy {a.policy}")
    if a.random_erasing:
        parts.append(f"random erasing {a.random_erasing:g}")
    mixes = [
        f"{name} {alpha:g}" for name, alpha in (("mixup", a.mixup_alpha), ("cutmix", a.cutmix_alpha)) if alpha
    ]
    if mixes:
        parts.append(" or ".join(mixes) + " per batch")
    if spec.distill.label_smoothing:
        parts.append(f"label smoothing {spec.distill.label_smoothing:g}")
    ema = spec.train.ema
    if ema is not None:
        use = "the final student" if ema.student else "evaluated beside the student"
        parts.append(f"EMA of the student's weights (decay {ema.decay:g} every {ema.every} step(s), {use})")
    return ", ".join(parts)


def _rules_text(system: DistillationSystem) -> str:
    """``quantizer.rules[0]: student 11 layers at W8A8, teachers 22 layers``: what each rule decided."""
    from collections import Counter

    from cmtkd_graph.inspection.graph import precision_label
    from cmtkd_graph.passes.common import META

    decided: Counter = Counter()
    for network, module in (("student", system.student), ("teachers", system.teachers)):
        for node in (node for gm in graph_modules(module) for node in gm.graph.nodes):
            info = node.meta.get(META, {})
            if info.get("rule_label"):
                bits = precision_label(info["weight_bits"], info["act_bits"]) if network == "student" else ""
                decided[info["rule_label"], network, bits] += 1
    parts = []
    for i in range(len(system.spec.quantizer.rules)):
        label = f"quantizer.rules[{i}]"
        counts = [
            f"{net} {n} layer{'s' if n > 1 else ''}{f' at {bits}' if bits else ''}"
            for (rule, net, bits), n in sorted(decided.items())
            if rule == label
        ]
        parts.append(f"{label}: {', '.join(counts)}")
    return "; ".join(parts)


def _aux_text(spec: Spec) -> str:
    """`` + w CE_aux (...)``: the auxiliary heads that train (segmentation's aux_loss), or ''."""
    from cmtkd_graph.tasks import task_record

    task = task_record(spec.student.arch)
    networks = [
        ("student", spec.student),
        *((f"teacher{k}", t) for k, t in enumerate(spec.resolved_teachers())),
    ]
    heads = [label for label, m in networks if m.trainable and (m.kwargs or {}).get("aux_loss")]
    if task.aux_output is None or not heads:
        return ""
    return f" + {task.aux_weight * spec.distill.alpha:g} CE_aux ({', '.join(heads)}: auxiliary heads)"


def _composed(spec: Spec) -> bool:
    return METHODS.get(spec.method).arrangement == "composed"


def _teacher_notes(trainable: bool, role: str | None) -> str:
    notes = [n for n in (role, None if trainable else "frozen") if n]
    return f" ({', '.join(notes)})" if notes else ""


def taps_table(
    arch: str,
    *,
    input_size: int = 224,
    in_channels: int = 3,
    num_classes: int | None = None,
    surgery: list[str] = (),
    everything: bool = False,
    frames: int = 16,
) -> str:
    """The tap-able nodes of a float ``arch`` with output shapes; ``*`` marks the ``auto`` taps. A video
    model is traced on clips of ``frames`` frames."""
    from cmtkd_graph.errors import UserError
    from cmtkd_graph.models.builders import check_arch
    from cmtkd_graph.models.parts import float_part
    from cmtkd_graph.passes.shapes import propagate_shapes, shape_of
    from cmtkd_graph.passes.taps import auto_tap_names, resolve_tap, tappable_nodes
    from cmtkd_graph.passes.tracer import qualname
    from cmtkd_graph.spec import ModelSpec, SurgerySpec
    from cmtkd_graph.system import float_network
    from cmtkd_graph.tasks import task_record

    try:
        check_arch(arch)
    except ValueError as err:
        raise UserError(str(err)) from None
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = ModelSpec(arch=arch, kwargs=kwargs, weight_bits=32, act_bits=32)
    try:
        steps = [SurgerySpec(name=name) for name in surgery]
    except ValueError as err:
        raise UserError(f"--surgery: {err}") from None
    task = task_record(arch)
    time = (frames,) if task.clips else ()
    input_shape = (in_channels, *time, input_size, input_size)
    where = ""
    if task.tap_part is None:
        gm = float_network(model, steps, device="meta")
    else:  # a network rewritten part by part: its taps are in one part (RAFT: the images' encoder)
        if steps:
            raise UserError(f"--surgery: not for {task.name} models (they are rewritten part by part)")
        gm = float_part(model, task.tap_part)
        where = f" ({task.tap_part}{', on each image' if task.frames else ''})"
    propagate_shapes(gm, (1, *input_shape))
    auto_names = auto_tap_names(gm, arch)
    auto = {resolve_tap(gm, name) for name in auto_names}
    rows = []
    for node in tappable_nodes(gm):
        shape = shape_of(node)
        if not everything and (shape is None or len(shape) not in (3, 4, 5)):
            continue
        kind = (
            type(gm.get_submodule(node.target)).__name__
            if node.op == "call_module"
            else str(getattr(node.target, "__name__", node.target))
        )
        rows.append(("*" if node in auto else " ", qualname(node), kind, list(shape[1:]) if shape else "-"))
    width = max(len(r[1]) for r in rows)
    kind_width = max(len(r[2]) for r in rows)
    header = f"{arch}{where} at {'x'.join(map(str, input_shape))}: {len(rows)} nodes, * = auto taps"
    lines = [header] + [f"{m} {n:<{width}}  {k:<{kind_width}}  {s}" for m, n, k, s in rows]
    lines.append(f"auto: {', '.join(auto_names)}")
    return "\n".join(lines)


__all__ = ["spec_summary", "taps_table"]
