"""``cmtkd-graph inspect``: the dumped graphs, read back with networkx/pydot, show what the passes built."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import networkx as nx
import pydot
import pytest
import torch
from safetensors.torch import save_file

import cmtkd_graph as cg
from cmtkd_graph.cli import main
from cmtkd_graph.errors import UserError
from cmtkd_graph.inspection import system_graph
from cmtkd_graph.inspection.output import summary_table, write_graph

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydot")  # pydot's own parser

TEACHER_BITS = (4, 6, 8)
STUDENT_BITS = 2
TAPS = ("layer1", "layer2", "layer3", "layer4")
PAPER = "resnet18"  # specs/resnet18.yaml: CIFAR-100 ResNet18 (3x3 stem), W2A2 student, 4/6/8-bit teachers


@pytest.fixture(scope="module")
def system() -> cg.CMTKDSystem:
    """The paper's resnet18 system (W2A2 student, teachers at 4/6/8 bits, layer1..4), on the meta device."""
    return cg.build_system(cg.load_spec(PAPER), device="meta", load=False)


@pytest.fixture(scope="module")
def full(system: cg.CMTKDSystem) -> nx.DiGraph:
    return system_graph(system)


def read_dot(path: Path) -> nx.DiGraph:
    """A DOT file read with pydot, values turned back into ints/bools where they look like them."""

    def value(text: str) -> object:
        text = text.strip('"')
        if text in ("True", "False"):
            return text == "True"
        return int(text) if text.lstrip("-").isdigit() else text

    (dot,) = pydot.graph_from_dot_file(str(path))
    graph = nx.DiGraph()
    for node in dot.get_nodes():
        name = node.get_name().strip('"')
        if name not in ("node", "edge", "graph"):
            graph.add_node(name, **{k: value(v) for k, v in node.get_attributes().items()})
    for edge in dot.get_edges():
        attrs = {k: value(v) for k, v in edge.get_attributes().items()}
        graph.add_edge(edge.get_source().strip('"'), edge.get_destination().strip('"'), **attrs)
    return graph


@pytest.fixture(scope="module")
def read_back(full: nx.DiGraph, tmp_path_factory: pytest.TempPathFactory) -> dict[str, nx.DiGraph]:
    """The full system graph written as GraphML, node-link JSON and DOT, and read back from the files."""
    root = tmp_path_factory.mktemp("dumps")
    write_graph(full, root / "system.graphml")
    write_graph(full, root / "system.json")
    write_graph(full, root / "system.dot")
    return {
        "graphml": nx.read_graphml(root / "system.graphml"),
        "json": nx.node_link_graph(json.loads((root / "system.json").read_text()), edges="edges"),
        "dot": read_dot(root / "system.dot"),
    }


FORMATS = ["graphml", "json", "dot"]


def nodes_where(graph: nx.DiGraph, **wanted: object) -> list[str]:
    return [n for n, a in graph.nodes(data=True) if all(a.get(k) == v for k, v in wanted.items())]


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_fusion_node_per_tap_plus_the_output(read_back: dict[str, nx.DiGraph], fmt: str) -> None:
    graph = read_back[fmt]
    fusions = nodes_where(graph, role="fusion")
    assert sorted(fusions) == sorted([f"fusion/{t}" for t in TAPS] + ["fusion/output"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_fusion_nodes_join_every_teacher_and_feed_every_teacher(
    read_back: dict[str, nx.DiGraph], fmt: str
) -> None:
    graph = read_back[fmt]
    everyone = set(range(len(TEACHER_BITS)))
    for fusion in nodes_where(graph, role="fusion"):
        sources = [graph.nodes[p].get("teacher") for p in graph.predecessors(fusion)]
        assert len(sources) == len(TEACHER_BITS) and set(sources) == everyone, fusion
        consumers = {graph.nodes[s].get("teacher") for s in graph.successors(fusion)} - {None}
        assert consumers == (set() if fusion == "fusion/output" else everyone), fusion


@pytest.mark.parametrize("fmt", FORMATS)
def test_nothing_flows_from_the_student_into_a_teacher(read_back: dict[str, nx.DiGraph], fmt: str) -> None:
    graph = read_back[fmt]
    student = nodes_where(graph, network="student")
    teachers = {n for n, a in graph.nodes(data=True) if "teacher" in a}
    assert len(student) > 50 and len(teachers) > 150
    reached = set().union(*(nx.descendants(graph, n) for n in student))
    assert not reached & teachers
    # ...while the distillation edges do connect both sides, at the loss nodes:
    assert set(graph.predecessors("loss/layer1")) == {"fusion/layer1", "student/layer1.1.relu_1"}
    assert set(graph.predecessors("loss/logits")) == {"fusion/output", "student/fc"}
    assert "loss/layer1" in reached and "loss/layer1" in nx.descendants(graph, "teacher0/conv1")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_quantized_conv_has_one_weight_and_one_input_quantizer(
    read_back: dict[str, nx.DiGraph], fmt: str
) -> None:
    graph = read_back[fmt]
    declared = {"student": STUDENT_BITS} | {f"teacher{k}": b for k, b in enumerate(TEACHER_BITS)}
    for network, bits in declared.items():
        convs = nodes_where(graph, network=network, module_type="QuantConv2d")
        assert len(convs) == 19, network  # resnet18: 20 convs, the first one stays float
        for conv in convs:
            quantizers = [
                graph.nodes[p] for p in graph.predecessors(conv) if graph.nodes[p]["role"] == "quantizer"
            ]
            assert sorted(q["kind"] for q in quantizers) == ["activation", "weight"], conv
            assert [q["bits"] for q in quantizers] == [bits, bits], conv
            assert graph.nodes[conv]["weight_bits"] == bits
        for float_layer in ("conv1", "fc"):
            node = f"{network}/{float_layer}"
            assert graph.nodes[node]["reason"].endswith("layer kept full precision")
            assert not [p for p in graph.predecessors(node) if graph.nodes[p]["role"] == "quantizer"]


def test_shapes_dtypes_and_roles(read_back: dict[str, nx.DiGraph]) -> None:
    graph = read_back["graphml"]  # lists are JSON strings in GraphML
    assert json.loads(graph.nodes["fusion/layer1"]["output_shape"]) == [2, 64, 32, 32]
    assert json.loads(graph.nodes["teacher2/layer4.1.relu_1"]["output_shape"]) == [2, 512, 4, 4]
    assert graph.nodes["student/fc"]["dtype"] == "float32"
    assert nodes_where(graph, role="input") == ["input"]
    for network in ("student", "teacher0", "teacher1", "teacher2"):
        taps = {graph.nodes[n]["tap"]: n for n in nodes_where(graph, role="tap", network=network)}
        assert taps == {t: f"{network}/{t}.1.relu_1" for t in TAPS}
    assert graph.nodes["teacher1/layer2.0.conv1.input_quantizer"]["signed"] is False


def test_parameter_counts_add_up_to_each_network(system: cg.CMTKDSystem, full: nx.DiGraph) -> None:
    def total(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def in_graph(**wanted: object) -> int:
        return sum(full.nodes[n]["params"] for n in nodes_where(full, **wanted))

    assert in_graph(network="student") == total(system.student)
    for k in range(len(TEACHER_BITS)):
        assert in_graph(network=f"teacher{k}") == total(system.teachers.get_submodule(f"teacher{k}"))
    assert in_graph(role="fusion") == total(system.teachers.get_submodule("fusion")) == 5 * 3


def test_block_view_is_small_and_keeps_the_fusion_nodes(system: cg.CMTKDSystem, full: nx.DiGraph) -> None:
    blocks = system_graph(system, view="blocks")
    assert blocks.number_of_nodes() < 150 < full.number_of_nodes()
    assert set(nodes_where(blocks, role="fusion")) == set(nodes_where(full, role="fusion"))
    assert blocks.nodes["teacher0/layer1.1"]["role"] == "tap"
    assert blocks.nodes["student/layer2.0"]["layer_bits"] == "W2A2"
    assert set(blocks.predecessors("fusion/layer2")) == {f"teacher{k}/layer2.1" for k in range(3)}
    assert set(blocks.successors("fusion/layer2")) >= {f"teacher{k}/layer3.0" for k in range(3)}
    student = nodes_where(blocks, network="student")
    teachers = {n for n, a in blocks.nodes(data=True) if "teacher" in a}
    assert not set().union(*(nx.descendants(blocks, n) for n in student)) & teachers


def test_which_selects_one_graph(system: cg.CMTKDSystem) -> None:
    teachers = system_graph(system, which="teachers")
    student = system_graph(system, which="student")
    assert not nodes_where(teachers, network="student") and nodes_where(teachers, role="fusion")
    assert {a.get("network") for _, a in student.nodes(data=True)} == {"student", None}
    assert "input" in student and "input" in teachers
    single = cg.build_system(
        cg.load_spec(PAPER, ["method=single", "teachers=[]", "distill={}"]),
        device="meta",
    )
    assert len(system_graph(single)) == len(system_graph(single, which="student"))
    with pytest.raises(UserError, match="has no teachers"):
        system_graph(single, which="teachers")


def test_fitnet_adapters_sit_between_student_taps_and_losses() -> None:
    spec = cg.load_spec(PAPER, ["distill.feature_loss=fitnet"])
    graph = system_graph(cg.build_system(spec, device="meta", load=False))
    adapters = nodes_where(graph, role="adapter")
    assert sorted(adapters) == [f"adapter/{t}" for t in TAPS]
    for tap in TAPS:
        assert list(graph.predecessors(f"adapter/{tap}")) == [f"student/{tap}.1.relu_1"]
        assert list(graph.successors(f"adapter/{tap}")) == [f"loss/{tap}"]
        assert graph.nodes[f"adapter/{tap}"]["output_shape"] == graph.nodes[f"fusion/{tap}"]["output_shape"]


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_svg_is_rendered_by_graphviz(system: cg.CMTKDSystem, tmp_path: Path) -> None:
    out = write_graph(system_graph(system, view="blocks"), tmp_path / "blocks.svg")
    text = out.read_text()
    assert text.startswith("<?xml") and "<svg" in text and "fusion/layer3" in text


def test_without_graphviz_the_cli_writes_the_dot_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # what graphviz_dot() searches
    out = tmp_path / "blocks.png"
    assert main(["inspect", PAPER, "--view", "blocks", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "Graphviz `dot` is not installed" in error and str(tmp_path / "blocks.dot") in error
    assert not out.exists()
    assert "fusion/layer1" in read_dot(tmp_path / "blocks.dot")


def test_cli_writes_the_file_named_by_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "teachers.graphml"
    assert main(["inspect", PAPER, "--out", str(out), "--which", "teachers", "--view", "blocks"]) == 0
    graph = nx.read_graphml(out)
    assert len(nodes_where(graph, role="fusion")) == len(TAPS) + 1
    assert not nodes_where(graph, network="student")
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["inspect", PAPER, "--out", str(tmp_path / "graph.txt")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err


def test_cli_summary_counts_layers_taps_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", PAPER]) == 0
    text = capsys.readouterr().out
    student = cg.build_system(cg.load_spec(PAPER), device="meta", load=False).student
    params = sum(p.numel() for p in student.parameters())
    section = text.split("\nteacher0")[0]
    assert f"student (resnet18 W2A2): {params:,} parameters" in section
    assert "  quantized layers   W2A2: 19 QuantConv2d\n" in section
    assert (
        "  full precision     conv1 Conv2d (first layer kept full precision), "
        "fc Linear (last layer kept full precision)\n"
    ) in section
    assert "  input quantizers   19 (19 unsigned, 0 signed)\n" in section
    assert "layer4 = layer4.1.relu_1 [2, 512, 4, 4]" in section
    assert "teacher2 (resnet18 W8A8)" in text and "W8A8: 19 QuantConv2d" in text
    assert "fusion: 5 nodes, 15 parameters" in text


def write_run(run_dir: Path, logits: dict[str, list[float]]) -> None:
    """A run directory as training leaves it: ``checkpoints/latest`` and accelerate's model.safetensors."""
    checkpoint = run_dir / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    tensors = {f"teachers.fusion.{key}.logits": torch.tensor(v) for key, v in logits.items()}
    tensors["student.fc.bias"] = torch.zeros(10)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    (run_dir / "checkpoints" / "latest").write_text(json.dumps({"checkpoint": checkpoint.name, "step": 10}))


def test_cli_checkpoint_puts_softmax_importance_on_fusion_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logits = {t: [0.0, 0.0, 0.0] for t in TAPS} | {
        "layer1": [0.0, math.log(3), 0.0],
        "output": [math.log(4), 0.0, 0.0],
    }
    write_run(tmp_path / "run", logits)
    out = tmp_path / "system.json"
    assert main(["inspect", PAPER, "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    graph = nx.node_link_graph(json.loads(out.read_text()), edges="edges")
    assert graph.nodes["fusion/layer1"]["importance"] == pytest.approx([0.2, 0.6, 0.2])
    assert graph.nodes["fusion/output"]["importance"] == pytest.approx([4 / 6, 1 / 6, 1 / 6], abs=1e-6)
    assert graph.nodes["fusion/layer2"]["importance"] == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=1e-6)
    capsys.readouterr()
    assert main(["inspect", PAPER, "--checkpoint", str(tmp_path / "run")]) == 0
    assert "; importance 0.200, 0.600, 0.200" in capsys.readouterr().out


def test_cli_checkpoint_errors_name_the_missing_piece(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", PAPER, "--checkpoint", str(tmp_path)]) == 2
    assert "checkpoints/latest is missing" in capsys.readouterr().err
    write_run(tmp_path / "run", {"layer1": [0.0, 1.0, 2.0]})
    assert main(["inspect", PAPER, "--checkpoint", str(tmp_path / "run")]) == 2
    assert "has no teachers.fusion.layer2.logits" in capsys.readouterr().err


def test_summary_table_matches_the_graph(system: cg.CMTKDSystem) -> None:
    text = summary_table(system, {"layer3": [0.2, 0.3, 0.5]})
    assert "teacher2 (resnet18 W8A8)" in text and "W6A6: 19 QuantConv2d" in text
    assert "; importance 0.200, 0.300, 0.500" in text
    assert "fusion: 5 nodes, 15 parameters\n" in text
