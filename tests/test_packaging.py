"""The wheel: `passes/` ships as `cmtkd_graph.passes` (no top-level `passes`), specs are package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps`, built once for this module."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = out.glob("cmtkd_graph-*.whl")
    return path


def test_wheel_contains_the_passes_as_a_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "tracer",
        "graph_pass",
        "activations",
        "quantize",
        "surgery",
        "taps",
        "outputs",
        "compose",
        "stack",
        "common",
        "shapes",
    ):
        assert f"cmtkd_graph/passes/{module}.py" in names
    for method in ("base", "cmtkd", "single", "kd", "average_teacher", "amtml_kd", "ctkd"):
        assert f"cmtkd_graph/methods/{method}.py" in names
    for module in ("student", "codes", "packing", "cost", "integer", "onnx_export", "export", "predict"):
        assert f"cmtkd_graph/deploy/{module}.py" in names
    for package in (REPO / "cmtkd_graph").rglob("__init__.py"):  # every subpackage is listed in pyproject
        assert package.relative_to(REPO).as_posix() in names, package
    assert "cmtkd_graph/tasks/classification.py" in names
    assert not any(n.startswith("passes/") for n in names)  # no generic top-level module
    assert "cmtkd_graph/specs/quickstart.yaml" in names and "cmtkd_graph/specs/amtml_kd.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cmtkd-graph = cmtkd_graph.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_passes_outside_the_repository(wheel, tmp_path):
    """Install the wheel into a fresh target directory and import from somewhere else."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    code = (
        "import cmtkd_graph, cmtkd_graph.passes.compose as c, cmtkd_graph.spec.io as s; "
        "print(c.__file__); print(s.load_spec('quickstart').name)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    path, name = result.stdout.split()
    assert path.startswith(str(target)) and name == "quickstart"


def test_constraints_pin_every_dependency_within_its_declared_range():
    """pyproject.toml declares ranges (a user's torch stays); constraints.txt pins the tested set in them."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req}"
    torch_req = next(r for r in declared if r.name == "torch")
    assert not any(s.operator == "==" for s in torch_req.specifier)  # a range, never an exact pin


def test_the_python_the_readme_names_is_the_one_the_pinned_packages_need():
    """README and pyproject name one Python floor, and no package pinned in constraints.txt needs a
    newer one (numpy 2.4, scipy 1.17, networkx 3.6 and matplotlib 3.11 need 3.11)."""
    import re
    import tomllib
    from importlib.metadata import PackageNotFoundError, metadata

    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.11"
    assert "with Python 3.11+" in (REPO / "README.md").read_text()
    needed = []
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name = line.split("==")[0]
        try:
            requires = metadata(name).get("Requires-Python") or ""
        except PackageNotFoundError:
            continue
        found = re.search(r">=\s*3\.(\d+)", requires)
        if found:
            needed.append((int(found[1]), name))
    assert needed and max(needed)[0] <= 11, max(needed)
    assert max(needed)[0] == 11  # the floor is needed: some pin requires exactly it
