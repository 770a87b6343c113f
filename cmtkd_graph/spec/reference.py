"""The spec reference in Markdown, generated from the spec's models and the method registry.

``cmtkd-graph schema --markdown`` prints it; ``docs/spec.md`` holds it between two markers and
``tests/test_docs.py`` fails when it is not what this module generates now.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cmtkd_graph.registry import METHODS
from cmtkd_graph.spec.io import model_in
from cmtkd_graph.spec.schema import Spec


def spec_reference() -> str:
    """The spec reference as a Markdown table and the methods' sections (``cmtkd-graph schema
    --markdown``; ``docs/spec.md`` holds it between two markers, kept current by a test)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    _reference_rows(Spec, "", rows)
    return "\n".join(rows) + "\n\n" + methods_reference()


def methods_reference() -> str:
    """One section per registered method: objective, teachers, defaults, options, source."""
    parts = ["### Methods (`method:`)", ""]
    for name in METHODS:
        m = METHODS.get(name)
        parts.append(f"#### `{name}` — {m.summary}")
        parts.append("")
        parts.append(f"- objective: `L = {m.formula}`")
        parts.append(f"- teachers: {_teacher_rule(m)}")
        defaults = {**m.defaults, "feature_loss": m.feature_losses[0]}
        if m.mutual_learning is not None:
            defaults["mutual_learning"] = m.mutual_learning
        gammas = ", ".join(f"{k} {v:g}" for k, v in m.gamma_defaults.items() if k in m.feature_losses and v)
        text = ", ".join(f"`{k}: {v}`" for k, v in defaults.items())
        parts.append(f"- defaults: {text}" + (f"; gamma by feature loss: {gammas}" if gammas else ""))
        if m.feature_losses != ("none",):
            parts.append(f"- feature losses: {', '.join(m.feature_losses)}")
        for key, field in m.Options.model_fields.items():
            default = field.default if field.default is not None else "—"
            parts.append(f"- `distill.options.{key}` (default `{default}`): {field.description}")
        if m.source:
            parts.append(f"- source: {m.source}")
        parts.append("")
    return "\n".join(parts).rstrip()


def _teacher_rule(m) -> str:
    low, high = m.min_teachers, m.max_teachers
    if high == 0:
        return "none"
    count = f"exactly {low}" if low == high else f"{low} or more" if high is None else f"{low} to {high}"
    how = "composed into one graph with fusion nodes" if m.arrangement == "composed" else "run side by side"
    text = f"{count}, {how}"
    if m.teacher_roles:
        text += "; " + ", ".join(f"`teachers[{i}]` = {r}" for i, r in enumerate(m.teacher_roles))
    if m.frozen_teachers_only:
        text += "; every teacher loaded (`weights:`) and frozen (`trainable: false`)"
    return text


def _reference_rows(model, prefix: str, rows: list[str]) -> None:
    for name, field in model.model_fields.items():
        inner = model_in(field.annotation)
        many = "[]" if _is_list(field.annotation) and inner is not None else ""
        key = f"{prefix}{name}{many}"
        if inner is not None and issubclass(inner, BaseModel) and inner is not model:
            meaning = _cell(field.description or (inner.__doc__ or "").strip().split("\n")[0])
            rows.append(f"| `{key}` | {'list of mappings' if many else 'mapping'} | | {meaning} |")
            _reference_rows(inner, f"{key}.", rows)
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()}`"
        else:
            default = f"`{field.default}`" if field.default is not None else "—"
        meaning = _cell(field.description or "")
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {meaning} |")


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _is_list(annotation) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))


def _type_name(annotation) -> str:
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


__all__ = ["methods_reference", "spec_reference"]
