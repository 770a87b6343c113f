"""The README stays true: its commands are what CI runs, its quickstart spec is the packaged one, and it
stays a front door (the reference material lives in docs/, checked by test_docs.py)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import yaml

from cmtkd_graph.spec.io import load_spec, validate_spec

from .conftest import REPO

README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(b for b in _bash_blocks() if "pytest" in b)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command.strip() in ci.splitlines()


def test_the_test_command_gives_each_worker_its_share_of_the_cores():
    """Under the README's `-n 2` each worker is pinned to its half of the cores (conftest.py) and torch
    sized its thread pool from that, so the two workers do not oversubscribe the machine."""
    assert "pytest -n 2 --dist loadfile" in next(b for b in _bash_blocks() if "pytest" in b)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or not hasattr(os, "sched_getaffinity"):
        pytest.skip("runs under the README's test command (pytest -n 2)")
    mine = os.sched_getaffinity(0)
    everything = os.sched_getaffinity(os.getppid())  # the pytest controller keeps the whole set
    assert mine < everything or len(everything) < workers, (mine, everything)
    assert len(mine) >= max(1, len(everything) // workers) and torch.get_num_threads() == len(mine)


def test_quickstart_command_launches_the_quickstart_spec():
    quickstart = _bash_blocks()[0]
    assert "accelerate launch -m cmtkd_graph.train specs/quickstart.yaml" in quickstart
    assert "dataset-fashion-mnist" in quickstart and "pip install" in quickstart
    assert (REPO / "specs" / "quickstart.yaml").is_file()


def test_the_commented_quickstart_spec_is_the_packaged_one():
    """The README's commented spec, read as YAML, is specs/quickstart.yaml: the same keys, the same
    values, the same resolved spec."""
    shown = re.findall(r"```yaml\n(.*?)\n```", README, flags=re.S)
    assert len(shown) == 1
    data = yaml.safe_load(shown[0])
    assert data == yaml.safe_load((REPO / "specs" / "quickstart.yaml").read_text())
    assert validate_spec(data).model_dump() == load_spec("quickstart").model_dump()


def test_every_example_spec_is_listed():
    for path in sorted((REPO / "specs").glob("*.yaml")):
        assert f"`{path.name}`" in README or path.stem in README, path.name


def test_the_readme_is_a_front_door_with_a_map_of_the_docs():
    """At most 250 lines (the details live on the pages), and every page of docs/ in its map."""
    assert len(README.splitlines()) <= 250
    documentation = README.split("## Documentation", 1)[1]
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in documentation, page.name


def test_no_placeholders_left():
    assert not re.search(
        r"\b(QUICKSTART_TIME|QUICKSTART_RESULT|TEST_TIME|MODEL_SUPPORT|PERFORMANCE)\b", README
    )
