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

from cmtkd_graph.errors import SpecError, closest, first_line, shorten
from cmtkd_graph.spec.schema import Spec

_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> Spec:
    """Load and validate a spec file, applying ``key.path=value`` overrides (values parsed as YAML).

    ``path`` may also name a packaged example (``"quickstart"``, ``"resnet18"``).
    Raises :class:`SpecError` with one line per problem.
    """
    return validate_spec(apply_overrides(read_spec_file(path), overrides))


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


MAX_FILE_BYTES = 1 << 20
"""A spec or study file larger than this is refused before it is parsed (the largest here: ~8 KB)."""
MAX_NODES = 100_000
"""YAML values after aliases are expanded: an alias bomb (9 aliases x 9 levels) is refused, not built."""
MAX_DEPTH = 64
"""Nesting depth of a YAML value (a spec nests 4 levels)."""


def read_yaml_mapping(file: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; a syntax error names its line and column. Bounded: a file
    too large, not UTF-8, nested too deep or expanding too far through aliases is one line."""
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise SpecError(f"{file}: {size} bytes; {what} file may have at most {MAX_FILE_BYTES} (1 MiB)")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise SpecError(
            f"{file}: not UTF-8 text (byte 0x{byte:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    data = parse_yaml(text, where=str(file))
    if not isinstance(data, dict):
        raise SpecError(f"{file}: {what} must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def parse_yaml(text: str, *, where: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing values that expand beyond :data:`MAX_NODES` or nest
    deeper than :data:`MAX_DEPTH` before they are built; errors name ``where``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise SpecError(f"{where}: invalid YAML{at}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{where}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, where: str) -> None:
    """Count the nodes of ``root`` as if its aliases were expanded (each shared node counted once per
    use, computed once), and its depth, without building anything."""
    expanded: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()  # on the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in expanded:
            continue
        children = _children(node)
        if not children_done:
            if id(node) in open_:
                raise SpecError(f"{where}: a YAML alias refers to a value that contains it")
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in expanded)
            continue
        open_.discard(id(node))
        expanded[id(node)] = 1 + sum(expanded[id(c)] for c in children)
        depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
        if expanded[id(node)] > MAX_NODES:
            raise SpecError(
                f"{where}: the YAML expands to more than {MAX_NODES} values (aliases included); refused"
            )
        if depth[id(node)] > MAX_DEPTH:
            raise SpecError(f"{where}: nested too deeply (at most {MAX_DEPTH} levels)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


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


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``key.path=value`` of ``overrides`` applied (in place; returned too)."""
    for item in overrides:
        apply_override(data, item)
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``key.path=value`` override in place (the value is parsed as a YAML scalar/flow value)."""
    key, eq, raw = item.partition("=")
    shown = shorten(item, 80)
    key = key.strip()
    if not eq or not key:
        raise SpecError(f"override {shown!r}: expected key.path=value, e.g. train.epochs=1")
    try:
        path = parse_key_path(key)
        value = parse_yaml(raw, where=f"override {shorten(key, 80)}") if raw.strip() else None
    except ValueError as err:
        raise SpecError(f"override {shown!r}: {first_line(err)}") from None
    node: Any = data
    for i, seg in enumerate(path):
        last = i == len(path) - 1
        where = format_loc(path[: i + 1])
        if isinstance(seg, int):
            if not isinstance(node, list):
                raise SpecError(f"override {shown!r}: {format_loc(path[:i])} is not a list")
            if not -len(node) <= seg < len(node):
                raise SpecError(
                    f"override {shown!r}: {format_loc(path[:i])} has {len(node)} entries, no [{seg}]"
                )
        elif not isinstance(node, dict):
            raise SpecError(f"override {shown!r}: {format_loc(path[:i])} is not a mapping")
        if last:
            node[seg] = value
        else:
            if isinstance(node, dict) and node.get(seg) is None:
                node[seg] = [] if isinstance(path[i + 1], int) else {}
            node = node[seg]
            if not isinstance(node, dict | list):
                raise SpecError(f"override {shown!r}: {where} is a value, not a mapping")


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
            msg = f"{msg}, got {shorten(repr(e['input']), 80)}"
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
