"""Reading a spec: YAML file (or a packaged example by name) + ``--set key.path=value`` overrides.

Validation errors become one line per problem, each naming the key path
(``teachers[1].weight_bits: must be 1..8 or 32, got 0``) and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cmtkd_graph.errors import SpecError, closest
from cmtkd_graph.spec.schema import Spec

_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> Spec:
    """Load and validate a spec file, applying ``key.path=value`` overrides (values parsed as YAML).

    ``path`` may also name a packaged example (``"quickstart"``, ``"resnet18"``).
    Raises :class:`SpecError` with one line per problem.
    """
    data = read_spec_file(path)
    for item in overrides:
        apply_override(data, item)
    return validate_spec(data)


def validate_spec(data: Any) -> Spec:
    """Validate a mapping as a :class:`Spec`; errors become :class:`SpecError` lines."""
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_errors(err)) from None


def find_spec_file(path: str | Path) -> Path:
    """The file for ``path``, or the packaged example spec of that name."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix in {".yaml", ".yml"} else f"{p.name}.yaml"
    packaged = resources.files("cmtkd_graph.specs").joinpath(name)
    if len(p.parts) <= 2 and packaged.is_file():
        return Path(str(packaged))
    examples = sorted(
        f.name.removesuffix(".yaml")
        for f in resources.files("cmtkd_graph.specs").iterdir()
        if f.name.endswith(".yaml")
    )
    raise SpecError(f"spec file {str(path)!r} not found (packaged examples: {', '.join(examples)})")


def read_spec_file(path: str | Path) -> dict[str, Any]:
    return read_yaml_mapping(find_spec_file(path), "a spec")


def read_yaml_mapping(file: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; a syntax error names its line and column."""
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{file}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{file}: {what} must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def parse_key_path(key: str) -> list[str | int]:
    """``teachers[1].weight_bits`` or ``teachers.1.weight_bits`` -> ``['teachers', 1, 'weight_bits']``."""
    parts: list[str | int] = []
    for seg in key.split("."):
        if seg.isdigit():
            parts.append(int(seg))
            continue
        m = _SEGMENT.match(seg)
        if not m:
            raise ValueError(f"bad key segment {seg!r}")
        parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``key.path=value`` override in place (the value is parsed as a YAML scalar/flow value)."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise SpecError(f"override {item!r}: expected key.path=value, e.g. train.epochs=1")
    try:
        path = parse_key_path(key)
        value = yaml.safe_load(raw) if raw.strip() else None
    except (ValueError, yaml.YAMLError) as err:
        raise SpecError(f"override {item!r}: {str(err).splitlines()[0]}") from None
    node: Any = data
    for i, seg in enumerate(path):
        last = i == len(path) - 1
        where = format_loc(path[: i + 1])
        if isinstance(seg, int):
            if not isinstance(node, list):
                raise SpecError(f"override {item!r}: {format_loc(path[:i])} is not a list")
            if not -len(node) <= seg < len(node):
                raise SpecError(
                    f"override {item!r}: {format_loc(path[:i])} has {len(node)} entries, no [{seg}]"
                )
        elif not isinstance(node, dict):
            raise SpecError(f"override {item!r}: {format_loc(path[:i])} is not a mapping")
        if last:
            node[seg] = value
        else:
            if isinstance(node, dict) and node.get(seg) is None:
                node[seg] = [] if isinstance(path[i + 1], int) else {}
            node = node[seg]
            if not isinstance(node, dict | list):
                raise SpecError(f"override {item!r}: {where} is a value, not a mapping")


def format_loc(loc: typing.Sequence[str | int]) -> str:
    out = ""
    for seg in loc:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def format_errors(err: ValidationError) -> list[str]:
    """One line per problem: ``key.path: message``."""
    lines: list[str] = []
    for e in err.errors():
        loc = list(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key{_unknown_key_hint(loc)}"
        elif e["type"] == "missing":
            msg = "required"
        elif e["type"] not in {"value_error", "assertion_error"} and "input" in e:
            msg = f"{msg}, got {e['input']!r}"
        where = format_loc(loc)
        for problem in msg.split("\n"):
            named = re.match(r"^([\w\[\].]+): ", problem)
            if named and named.group(1).startswith(where):
                lines.append(problem)  # model-level checks already name their full key path
            else:
                lines.append(f"{where or 'spec'}: {problem}")
    return list(dict.fromkeys(lines))


def _unknown_key_hint(loc: list[str | int]) -> str:
    """'; did you mean X?': a close sibling key, else the same key elsewhere, else the valid keys."""
    key = str(loc[-1])
    siblings = _fields_at(Spec, loc[:-1])
    near = closest(key, siblings, n=1, cutoff=0.75)
    if near:
        return f"; did you mean {near[0]!r}?"
    paths = _all_key_paths(Spec)
    elsewhere = [p for p in paths if p.rsplit(".", 1)[-1] == key] or closest(key, paths, n=1, cutoff=0.8)
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    near = closest(key, siblings, n=1, cutoff=0.5)
    if near:
        return f"; did you mean {near[0]!r}?"
    return f"; valid keys: {', '.join(siblings)}" if siblings else ""


def _all_key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        inner = model_in(field.annotation)
        if inner is not None and inner is not model:
            out.extend(_all_key_paths(inner, f"{prefix}{name}."))
    return out


def _fields_at(model: type[BaseModel], loc: list[str | int]) -> list[str]:
    """Field names of the (nested) pydantic model found at ``loc``, or [] if none."""
    current: Any = model
    for seg in loc:
        if isinstance(seg, int):
            continue
        if (
            not (isinstance(current, type) and issubclass(current, BaseModel))
            or seg not in current.model_fields
        ):
            return []
        current = model_in(current.model_fields[seg].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def model_in(annotation: Any) -> Any:
    """The BaseModel class inside ``X``, ``list[X]``, ``X | None`` or ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = model_in(arg)
            if found is not None:
                return found
    return None


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML (saved with every run)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
