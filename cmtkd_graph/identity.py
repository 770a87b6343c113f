"""What a run is, exactly: the content of its resolved spec, the identity of every weights file it reads,
and the code that trained it (the project's version, its git commit, whether the tree had uncommitted
changes).

Training writes it to ``RUN_DIR/identity.json``; a study keys its runs by the same facts, so that editing a
spec file, an override or an upstream row's weights shows which results no longer describe the study
(docs/studies.md#run-identity-and-stale-runs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from cmtkd_graph.version import __version__

IDENTITY = "identity.json"
# where a run writes, how chatty it is, where its metrics are also sent and how evaluation is batched,
# not what it trains
NOT_CONTENT = ("train.output_dir", "train.progress_bar", "train.log_with", "data.eval_batch_size")


def digest(data: Any) -> str:
    """sha256 of ``data``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as one mapping of key paths (``teachers[0].weights``) to scalars."""
    if isinstance(data, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in data.items()]
    elif isinstance(data, list) and data:
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(data)]
    else:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, key))
    return flat


REVISION = "revision of "


def spec_content(spec) -> dict[str, Any]:
    """The resolved spec as key paths and values, without the fields that do not change what is trained,
    and the revision of each of its components whose computation was revised (:func:`revisions`)."""
    flat = flatten(spec.model_dump(mode="json"))
    return {**{k: v for k, v in flat.items() if not k.startswith(NOT_CONTENT)}, **revisions(spec)}


def revisions(spec) -> dict[str, int]:
    """``{"revision of method ctkd": 2}``: the spec's method and quantizer family where their ``revision``
    is above 1. A component raises it when what it computes for the same spec changes (a new reading of
    its source), so that exactly the runs that used it become stale; the keys of the others stay."""
    from cmtkd_graph.registry import METHODS, QUANTIZERS

    found = {
        f"method {spec.method}": getattr(METHODS.get(spec.method), "revision", 1),
        f"quantizer {spec.quantizer.name}": getattr(QUANTIZERS.get(spec.quantizer.name), "revision", 1),
    }
    if _generic_auto_taps_below_their_reference(spec):
        from cmtkd_graph.models.facts import StageEnds

        found["auto taps (stage ends)"] = StageEnds.revision
    return {REVISION + name: number for name, number in found.items() if number > 1}


def _generic_auto_taps_below_their_reference(spec) -> bool:
    """Teachers, ``auto`` taps, a network under the generic stage-ends rule and images of another size
    than the one the rule reads stages at: the runs whose taps that rule's revision changed."""
    from cmtkd_graph.models.facts import StageEnds, family_of
    from cmtkd_graph.passes.taps import AUTO, REFERENCE_SIZE

    shape = spec.data.input_shape()
    networks = [spec.student, *spec.resolved_teachers()]
    return (
        bool(spec.teachers)
        and AUTO in (spec.taps.teachers, spec.taps.student)
        and any(isinstance(family_of(m.arch).auto_taps, StageEnds) for m in networks)
        and len(shape) == 3
        and tuple(shape[1:]) != REFERENCE_SIZE
    )


def weight_sources(spec) -> dict[str, str]:
    """Every weights source the spec reads, by key path: files, torchvision weight names, placeholders."""
    models = {"student": spec.student, **{f"teachers[{i}]": t for i, t in enumerate(spec.teachers)}}
    return {f"{name}.weights": m.weights for name, m in models.items() if m.weights}


def plugin_sources(spec) -> dict[str, str]:
    """The source file of each plugin the spec names, by key path (``plugins[0]``): its code is part of
    what trains, so a run's identity holds its hash (of the module's own file, not of what it imports)."""
    from cmtkd_graph.plugins import plugin_file

    files = {f"plugins[{i}]": plugin_file(ref) for i, ref in enumerate(spec.plugins)}
    return {key: str(file) for key, file in files.items() if file is not None}


def input_sources(spec) -> dict[str, str]:
    """Every file or published name a run reads besides the spec: weights, then plugins."""
    return {**weight_sources(spec), **plugin_sources(spec)}


def file_sha256(path: str | Path) -> str:
    """The content hash of a file (cached while its size and modification time stay the same)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_identity(source: str) -> dict[str, str | None]:
    """A weights source as content: a local file's hash, or the name of a published weights set."""
    if Path(source).expanduser().is_file():
        return {"sha256": file_sha256(Path(source).expanduser())}
    return {"name": source}


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, Any]:
    """The project's version and, when it runs from a git checkout, its commit and whether tracked files
    have uncommitted changes (``dirty``); both None for an installed wheel."""
    package = Path(__file__).resolve().parent
    commit = dirty = None
    top = git(package, "rev-parse", "--show-toplevel")
    if top and (Path(top) / package.name).resolve() == package:
        commit = git(package, "rev-parse", "HEAD")
        status = git(package, "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"version": __version__, "commit": commit, "dirty": dirty}


def git(where: Path, *args: str) -> str | None:
    """``git -C where ARGS``'s output, or None where it fails (not a repository, no git installed)."""
    try:
        result = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def run_identity(spec) -> dict[str, Any]:
    """What a training run records about itself: the spec's content hash, its weights' identities and
    the code."""
    return {
        "spec_sha256": digest(spec_content(spec)),
        "inputs": {field: source_identity(src) for field, src in input_sources(spec).items()},
        "code": code_identity(),
    }


def write_identity(run_dir: Path, spec, *, resumed: bool) -> dict[str, Any]:
    """Write ``RUN_DIR/identity.json`` at a fresh start; a resume with other code adds it to
    ``resumed_with`` (a run continued after a commit says so)."""
    path = run_dir / IDENTITY
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if resumed and path.is_file():
        record = json.loads(path.read_text())
        code = code_identity()
        if code != record["code"] and code not in [r["code"] for r in record.get("resumed_with", [])]:
            record.setdefault("resumed_with", []).append({"code": code, "at": now})
    else:
        record = {**run_identity(spec), "started": now}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / IDENTITY
    return json.loads(path.read_text()) if path.is_file() else None
