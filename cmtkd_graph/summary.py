"""Short human-readable summaries: of a spec (``validate``) and of a model's tap-able nodes (``taps``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtkd_graph.spec import Spec

if TYPE_CHECKING:
    from cmtkd_graph.system import CMTKDSystem


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def spec_summary(spec: Spec, system: CMTKDSystem | None = None, *, source: str = "spec") -> str:
    o, t, data = spec.optim, spec.train, spec.data
    rows = [("experiment", f"{spec.name} (method {spec.method})")]
    s = spec.student
    surgery = ", ".join(x.name for x in spec.surgery_for(s)) or "none"
    rows.append(("student", f"{s.arch} {s.bits_label}, quantizer {spec.quantizer.name}, surgery {surgery}"))
    if spec.teachers:
        teachers = ", ".join(
            f"{t.arch} {t.bits_label}{'' if t.trainable else ' (frozen)'}" for t in spec.resolved_teachers()
        )
        rows.append(("teachers", f"{len(spec.teachers)}: {teachers}"))
    if system is not None:
        for info in system.networks:
            if info.taps and info.label in ("student", "teacher0"):
                taps = ", ".join(f"{tap.name} {list(tap.shape or ())}" for tap in info.taps)
                rows.append((f"taps {info.label}", taps))
    rows.append(("objective", _objective(spec)))
    rows.append(
        (
            "data",
            f"{data.dataset} at {data.root or 'the default location'}, "
            f"input {'x'.join(map(str, data.input_shape()))}, "
            f"batch {data.batch_size}",
        )
    )
    importance_lr = o.importance_lr if o.importance_lr is not None else o.lr / 10
    rows.append(
        (
            "optimizer",
            f"{o.name} lr {o.lr:g} momentum {o.momentum:g}, importance lr {importance_lr:g}, weight decay "
            f"{o.weight_decay_low_bits:g} (<= {o.low_bits} bits) / {o.weight_decay:g}",
        )
    )
    sched = o.schedule
    detail = f" at {sched.milestones} x{sched.gamma:g}" if sched.name == "multistep" else ""
    warm = f", warm-up {sched.warmup_epochs:g} epochs" if sched.warmup_epochs else ""
    rows.append(("schedule", f"{sched.name}{detail}{warm}, stepped per {sched.step_every}"))
    rows.append(
        (
            "training",
            f"{t.epochs} epochs{f' (max {t.max_steps} steps)' if t.max_steps else ''}, seed {t.seed}, "
            f"mixed precision {t.mixed_precision or 'from accelerate config'}, run dir {spec.run_dir}",
        )
    )
    if system is not None:
        student = sum(p.numel() for p in system.student.parameters())
        teachers = sum(p.numel() for p in system.teachers.parameters()) if system.teachers is not None else 0
        rows.append(("parameters", f"student {_millions(student)}, teachers {_millions(teachers)}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{source}: valid"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _objective(spec: Spec) -> str:
    d = spec.distill
    if spec.method == "single":
        return f"{d.alpha:g} CE_S"
    if spec.method in ("kd", "average_teacher"):
        target = "averaged teacher softmax" if spec.method == "average_teacher" else "teacher"
        text = f"{d.alpha:g} CE_S + {d.beta:g} KD_S (from the {target}, tau {d.tau:g})"
    else:
        text = f"{d.alpha:g} (CE_T + CE_S)"
        if d.mutual_learning:
            text += f" + {d.beta:g} (KL_T + KL_S) [KDCL-MinLogit, tau {d.tau:g}]"
    if d.feature_loss != "none":
        text += f" + {d.feature_weight:g} {d.feature_loss} loss"
        text += " (no gradient to teachers)" if d.detach_shared else ""
    if spec.method == "cmtkd":
        text += f"; combined teacher: {d.combine}"
    return text


def taps_table(
    arch: str,
    *,
    input_size: int = 224,
    in_channels: int = 3,
    num_classes: int | None = None,
    surgery: list[str] = (),
    everything: bool = False,
) -> str:
    """The tap-able nodes of a float ``arch`` with output shapes; ``*`` marks the ``auto`` taps."""
    from cmtkd_graph.errors import UserError
    from cmtkd_graph.models import check_arch
    from cmtkd_graph.passes.shapes import propagate_shapes, shape_of
    from cmtkd_graph.passes.taps import auto_tap_names, resolve_tap, tappable_nodes
    from cmtkd_graph.passes.tracer import qualname
    from cmtkd_graph.spec import ModelSpec, SurgerySpec
    from cmtkd_graph.system import float_network

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
    gm = float_network(model, steps, device="meta")
    propagate_shapes(gm, (1, in_channels, input_size, input_size))
    auto_names = auto_tap_names(gm, arch)
    auto = {resolve_tap(gm, name) for name in auto_names}
    rows = []
    for node in tappable_nodes(gm):
        shape = shape_of(node)
        if not everything and (shape is None or len(shape) not in (3, 4)):
            continue
        kind = (
            type(gm.get_submodule(node.target)).__name__
            if node.op == "call_module"
            else str(getattr(node.target, "__name__", node.target))
        )
        rows.append(("*" if node in auto else " ", qualname(node), kind, list(shape[1:]) if shape else "-"))
    width = max(len(r[1]) for r in rows)
    kind_width = max(len(r[2]) for r in rows)
    header = f"{arch} at {in_channels}x{input_size}x{input_size}: {len(rows)} nodes, * = auto taps"
    lines = [header] + [f"{m} {n:<{width}}  {k:<{kind_width}}  {s}" for m, n, k, s in rows]
    lines.append(f"auto: {', '.join(auto_names)}")
    return "\n".join(lines)


def spec_reference() -> str:
    """The spec reference as a Markdown table (``cmtkd-graph schema --markdown``, pasted into the README)."""
    from cmtkd_graph.spec import Spec

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    _reference_rows(Spec, "", rows)
    return "\n".join(rows)


def _reference_rows(model, prefix: str, rows: list[str]) -> None:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from cmtkd_graph.spec_io import _model_in

    for name, field in model.model_fields.items():
        inner = _model_in(field.annotation)
        many = "[]" if _is_list(field.annotation) and inner is not None else ""
        key = f"{prefix}{name}{many}"
        if inner is not None and issubclass(inner, BaseModel) and inner is not model:
            meaning = field.description or (inner.__doc__ or "").strip().split("\n")[0]
            rows.append(f"| `{key}` | {'list of mappings' if many else 'mapping'} | | {meaning} |")
            _reference_rows(inner, f"{key}.", rows)
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()}`"
        else:
            default = f"`{field.default}`" if field.default is not None else "—"
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |")


def _is_list(annotation) -> bool:
    import typing

    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))


def _type_name(annotation) -> str:
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


__all__ = ["spec_reference", "spec_summary", "taps_table"]
