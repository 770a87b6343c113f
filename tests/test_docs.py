"""The documentation stays true: every link and anchor resolves, every `docs/PAGE.md#anchor` the code
cites exists, the generated spec reference is current, and the examples in the pages validate."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cmtkd_graph.models.facts import FAMILIES, BlocksAtDepth, FixedTaps
from cmtkd_graph.spec.reference import spec_reference

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
DOCS_CITATION = re.compile(r"docs/([a-z][\w-]*\.md)(?:#([\w-]+))?")


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks (a `#` comment in a code block is not a heading)."""
    return FENCE.sub("", text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation removed, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page; a repeated heading gets -1, -2... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), flags=re.M):
        base = github_anchor(heading)
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def test_github_anchors_are_computed_as_github_does():
    assert github_anchor("Mutual learning: KDCL-MinLogit (eq. 7-9)") == "mutual-learning-kdcl-minlogit-eq-7-9"
    assert github_anchor("`torch.compile`") == "torchcompile"
    assert github_anchor("The paper's training settings") == "the-papers-training-settings"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_and_anchor_resolves(page: Path):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: (no network in tests)
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_the_code_cites_exists_with_its_anchor():
    """Docstrings, spec descriptions, example specs and study files cite `docs/PAGE.md#anchor`."""
    sources = [
        *(REPO / "cmtkd_graph").rglob("*.py"),
        *(REPO / "passes").glob("*.py"),
        *(REPO / "specs").glob("*.yaml"),
        *(REPO / "studies").glob("*.yaml"),
        *(REPO / "bench").glob("*.py"),
        *(REPO / "tests").glob("*.py"),
    ]
    cited, broken = 0, []
    for source in sources:
        for page, anchor in DOCS_CITATION.findall(source.read_text()):
            cited += 1
            file = REPO / "docs" / page
            if not file.is_file():
                broken.append(f"{source.relative_to(REPO)}: docs/{page} does not exist")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{source.relative_to(REPO)}: docs/{page} has no #{anchor}")
    assert cited >= 10 and not broken, "\n".join(broken)


def test_nothing_cites_a_file_outside_the_repository():
    """The methods' source of truth is docs/methods.md, not a file a user who clones does not have."""
    for source in [*(REPO / "cmtkd_graph").rglob("*.py"), *(REPO / "passes").glob("*.py"), *PAGES]:
        assert "METHOD.md" not in source.read_text(), source


def test_the_spec_reference_is_generated_from_the_spec():
    text = (REPO / "docs" / "spec.md").read_text()
    block = text.split("<!-- spec-reference:start -->")[1].split("<!-- spec-reference:end -->")[0]
    assert block.strip() == spec_reference().strip(), "regenerate with `cmtkd-graph schema --markdown`"


def test_the_spec_reference_is_one_well_formed_table():
    """Every row of the keys table has its four cells (a `|` inside a description is escaped)."""
    rows = [line for line in spec_reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 80
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row


def test_the_study_file_example_is_a_valid_study(tmp_path):
    from cmtkd_graph.study import check_rows, load_study

    page = (REPO / "docs" / "studies.md").read_text()
    example, cluster = re.findall(r"```yaml\n(.*?)\n```", page, flags=re.S)
    data = yaml.safe_load(example)
    data.update(yaml.safe_load(cluster))  # the executor settings of "Running on a cluster"
    data["rows"][1]["spec"] = "resnet18"  # the example names a file relative to a checkout
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    study = load_study(tmp_path / "study.yaml")
    check_rows(study)
    assert [r.name for r in study.rows] == ["single_w2a2", "cmtkd"] and study.rows[0].seeds == 3
    assert study.executor.name == "slurm" and study.executor.slurm.gpus_per_node == 4


def test_the_architecture_page_shows_the_model_family_table():
    """docs/architecture.md's family table says what models/facts.py holds."""
    page = (REPO / "docs" / "architecture.md").read_text()
    table = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| ")}
    for family in FAMILIES:
        row = table[family.name]
        for prefix in family.prefixes:
            assert f"`{prefix.rstrip('_')}" in row, (family.name, prefix)
        rule = family.auto_taps
        if isinstance(rule, FixedTaps):
            assert rule.names[0] in row and (rule.names[-1] in row or rule.names[-1][-1] in row)
        elif isinstance(rule, BlocksAtDepth):
            assert "1/4, 1/2, 3/4 and full depth" in row
        assert ("NHWC" in row or "[B, T, H, W, C]" in row) == family.channels_last_features
        assert ("only" in row) == (family.fixed_input is not None), family.name  # e.g. "224 x 224 only"


def test_every_registered_method_and_quantizer_has_its_section_on_the_methods_page():
    """docs/methods.md has a heading `name` (anchor #name) for each; each method's `source` cites it."""
    from cmtkd_graph.methods import METHODS
    from cmtkd_graph.quantizers import QUANTIZERS

    page = REPO / "docs" / "methods.md"
    headings = set(re.findall(r"^#{2,3} `([\w]+)`$", prose(page.read_text()), flags=re.M))
    assert set(METHODS.names()) <= headings, set(METHODS.names()) - headings
    assert set(QUANTIZERS.names()) <= headings, set(QUANTIZERS.names()) - headings
    for name in METHODS:
        assert name in anchors(page)
        assert f"docs/methods.md#{name}" in METHODS.get(name).source, name


def test_every_page_names_a_machine_by_its_letter_in_the_machines_table():
    """docs/machines.md is the one table of machines: the letter a study's report gives a machine (its
    recorded description, in sorted order) is the table's letter for that description."""
    import json
    import re

    table = {
        m[1]: m[0]
        for m in re.findall(
            r"^\| ([A-Z]) \|.*\| `([^`]+)` \|$", (REPO / "docs/machines.md").read_text(), re.M
        )
    }
    studied = 0
    for results in sorted((REPO / "docs").glob("results*/runs")):
        machines = sorted({json.loads(f.read_text())["machine"] for f in results.rglob("seed*.json")})
        if len(machines) < 2:
            continue  # one machine: the report names it, without a letter
        for i, machine in enumerate(machines):
            assert table.get(machine) == chr(ord("A") + i), (results, machine)
            studied += 1
    assert studied >= 3


def test_the_layout_table_lists_every_module_of_the_package():
    layout = (REPO / "docs/architecture.md").read_text().split("## Layout")[1].split("\n## ")[0]
    modules = [*(REPO / "cmtkd_graph").rglob("*.py"), *(REPO / "passes").glob("*.py")]
    missing = [
        m.relative_to(REPO).as_posix()
        for m in modules
        if m.name != "__init__.py"
        and f"`{m.name}`" not in layout
        and m.relative_to(REPO).as_posix() not in layout
    ]
    assert not missing, f"docs/architecture.md#layout does not name {missing}"


def test_every_repository_file_a_page_names_exists():
    """A page, a spec, a study, a benchmark or pyproject.toml that names a file of the repository
    (`studies/x.yaml`, `specs/y.yaml`, `bench/z.py`, `cmtkd_graph/...`), in text or in a command, names one
    that is there; one that cites a section of a page (README, "Installing") cites a heading it has."""
    import re

    folders = "studies|specs|bench|tests|cmtkd_graph|passes|docs"
    named = re.compile(rf"(?<![\w/.-])((?:{folders})/[A-Za-z0-9_./-]+\.(?:yaml|py|md))\b")
    citing = [
        *PAGES,
        REPO / "pyproject.toml",
        *(REPO / "specs").glob("*.yaml"),
        *(REPO / "studies").glob("*.yaml"),
    ]
    citing += sorted((REPO / "bench").glob("*.py"))
    missing = [
        f"{file.name}: {path}"
        for file in citing
        for path in named.findall(file.read_text())
        if not (REPO / path).exists() and not re.search(r"\*|[A-Z]{3,}", path)
    ]
    assert not missing, missing
    section = re.compile(r"\((README|docs/[a-z0-9_-]+\.md), \"([^\"]+)\"\)")
    absent = [
        f"{file.name}: {page}, {title!r}"
        for file in citing
        for page, title in section.findall(file.read_text())
        if not re.search(
            rf"^#+ {re.escape(title)}$",
            (REPO / (page + ".md" if page == "README" else page)).read_text(),
            re.M | re.I,
        )
    ]
    assert not absent, absent
