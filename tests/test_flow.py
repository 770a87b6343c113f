"""``task: flow`` (RAFT): the spec's checks, the pair datasets, the composed system against an eager
implementation of the same objective (values and gradients), and the quickstart trained by the CLI in two
processes, resumed and evaluated."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph import losses
from cmtkd_graph.data import build_datasets, build_loaders
from cmtkd_graph.data.flow_files import FlowPairs, pair_files, read_flo, read_pair
from cmtkd_graph.errors import UserError
from cmtkd_graph.flow_system import FlowNetwork, build_flow_system
from cmtkd_graph.inspection import support
from cmtkd_graph.models.parts import rewrite_parts
from cmtkd_graph.quantizers import FULL_PRECISION
from cmtkd_graph.registry import TASKS
from cmtkd_graph.spec.io import load_spec, validate_spec
from cmtkd_graph.tasks.flow import EPE_SCALE

from .conftest import REPO, cli, train_tiny_example

SIZE = 128  # RAFT's least input


def flow_spec(root: str = "unused", teachers: int = 2, bits: int = 2, **extra) -> cg.Spec:
    data = {"dataset": "fashion_flow", "root": root, "batch_size": 2, **extra.pop("data", {})}
    return validate_spec(
        {
            "name": "flow",
            "student": {
                "arch": "raft_small",
                "kwargs": {"num_flow_updates": 2},
                "weight_bits": bits,
                "act_bits": bits,
            },
            "teachers": [{"weight_bits": 4, "act_bits": 4}, {"weight_bits": 8, "act_bits": 8}][:teachers],
            "data": data,
            **extra,
        }
    )


# ---------------------------------------------------------------- the spec
def test_the_flow_task_covers_both_raft_builders_and_infers_from_them():
    assert TASKS.get("flow").model_names() == ("raft_large", "raft_small")
    spec = flow_spec()
    assert spec.resolved_task == "flow" and spec.data.input_shape() == (3, 2, SIZE, SIZE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "kd"}, "method: flow trains with cmtkd or single"),
        ({"data": {"image_size": 64}}, "data.image_size: RAFT needs pairs of at least 128x128"),
        ({"data": {"image_size": 132}}, "sides divisible by 8"),
        ({"student": {"kwargs": {"num_flow_updates": 0}}}, "student.kwargs.num_flow_updates: RAFT refines"),
        ({"surgery": [{"name": "cifar_stem"}]}, "surgery: not for flow models"),
        ({"data": {"dataset": "fashion_mnist"}}, "data.dataset: fashion_mnist holds classification data"),
        ({"data": {"augment": {"crop": "random_crop"}}}, "data.augment.crop: random_crop is not done"),
    ],
)
def test_a_flow_spec_the_task_cannot_run_is_one_line(change, message):
    raw = flow_spec().model_dump(mode="json", exclude_unset=True)
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    with pytest.raises(UserError) as err:
        validate_spec(raw)
    assert message in str(err.value)


def test_teachers_refining_another_number_of_times_and_settings_without_a_meaning_are_refused():
    raw = flow_spec().model_dump(mode="json", exclude_unset=True)
    raw["teachers"][0]["kwargs"] = {}  # torchvision's default: 12 refinements, the student 2
    raw["distill"] = {"label_smoothing": 0.1}
    raw["train"] = {"activation_checkpointing": True}
    with pytest.raises(UserError) as err:
        validate_spec(raw)
    assert err.value.problems == [
        "train.activation_checkpointing: not for flow models (rewritten part by part) in this version; drop "
        "it",
        "distill.label_smoothing: flow losses have no classes to smooth; drop it",
        "teachers[0].kwargs.num_flow_updates: 12, but the student refines 2 times; the combined teacher "
        "fuses the flows of every refinement, so every network refines as often",
    ]


# ---------------------------------------------------------------- data
def test_pairs_are_two_frame_samples_resized_and_flipped_with_their_flow(fashion_flow):
    train, _held_out = pair_files(fashion_flow)
    first, second, flow = read_pair(train[0])
    plain = FlowPairs(train[:1], size=SIZE, mean=None, std=None)
    images, label = plain[0]
    assert images.shape == (3, 2, SIZE, SIZE) and torch.equal(label, flow)
    assert torch.equal(images[:, 0], first.float() / 255) and torch.equal(images[:, 1], second.float() / 255)

    flipped = FlowPairs(train[:1], size=SIZE, mean=None, std=None, hflip=True)
    seen = set()
    for seed in range(8):  # half the pairs are mirrored: the flow's u changes sign, v does not
        torch.manual_seed(seed)
        images, label = flipped[0]
        mirrored = torch.equal(images, plain[0][0].flip(-1))
        seen.add(mirrored)
        if mirrored:
            assert torch.equal(label[0], -flow[0].flip(-1)) and torch.equal(label[1], flow[1].flip(-1))
    assert seen == {True, False}

    half = FlowPairs(train[:1], size=SIZE // 2, mean=None, std=None)[0]
    assert half[0].shape == (3, 2, SIZE // 2, SIZE // 2)
    # a uniform part of the flow halves with the image: compare the means, which bilinear resizing keeps
    assert half[1].mean((1, 2)) == pytest.approx((flow.mean((1, 2)) / 2).tolist(), abs=0.05)


def test_the_dataset_record_reads_normalised_pairs_into_batches(fashion_flow):
    spec = flow_spec(str(fashion_flow), data={"num_workers": 0, "eval_subset": 3}).data
    bundle = build_datasets(spec)
    assert (len(bundle.train), len(bundle.eval), bundle.input_shape) == (27, 3, (3, 2, SIZE, SIZE))
    _train, evaluation = build_loaders(bundle, spec, train_batch_size=2, eval_batch_size=2, seed=0)
    pairs, flows = next(iter(evaluation))
    assert pairs.shape == (2, 3, 2, SIZE, SIZE) and flows.shape == (2, 2, SIZE, SIZE)
    assert -1 <= pairs.min() < 0 < pairs.max() <= 1  # RAFT's [-1, 1]
    assert torch.equal(flows[0], read_flo(pair_files(fashion_flow)[1][0].flow))


def test_metric_rows_sum_end_point_errors_exactly():
    task = TASKS.get("flow")
    target = torch.zeros(2, 2, 4, 4)
    target[1, 0] = 1e10  # unknown flow: counted nowhere
    predicted = torch.zeros(2, 2, 4, 4)
    predicted[0, 0, 0, 0], predicted[0, 1, 0, 0] = 3.0, 4.0  # one pixel 5 px off
    predicted[0, 0, 1, 1] = 1.25
    rows = task.metric_rows(predicted, target)
    assert rows.tolist() == [[16, 6250, 2, 1, 0], [0, 0, 0, 0, 0]]
    values = task.metric_values(rows.long().sum(0))
    assert values == {"epe": 6.25 / 16, "out1": 200 / 16, "out3": 100 / 16, "out5": 0.0}
    assert EPE_SCALE == 1000


# ---------------------------------------------------------------- the networks and the objective
def test_a_flow_network_computes_what_torchvision_raft_computes():
    torch.manual_seed(0)
    raft = torchvision.models.get_model("raft_small", weights=None)
    reference = torchvision.models.get_model("raft_small", weights=None)
    reference.load_state_dict(raft.state_dict())
    rewrite_parts(raft, lambda gm, part: gm)
    network = FlowNetwork(raft, updates=3).eval()
    reference.eval()
    pairs = torch.rand(2, 3, 2, SIZE, SIZE)
    with torch.no_grad():
        out = network(pairs)
        expected = reference(pairs[:, :, 0], pairs[:, :, 1], num_flow_updates=3)
    assert len(out["flows"]) == 3 and all(
        torch.equal(a, b) for a, b in zip(out["flows"], expected, strict=True)
    )
    assert torch.equal(out["logits"], expected[-1])
    assert set(network.state_dict()) == set(reference.state_dict())  # torchvision's names


def _eager_copy(system, k: int | None) -> nn.Module:
    """Torchvision's RAFT holding the system's student (k None) or teacher k weights (float system)."""
    raft = torchvision.models.get_model("raft_small", weights=None)
    if k is None:
        state = system.student.state_dict()
    else:
        holder = system.teachers.get_submodule(f"teacher{k}").state_dict()
        rest = ("context_encoder.", "update_block.", "mask_predictor.", "corr_block.")
        state = {(n if n.startswith(rest) else f"feature_encoder.{n}"): v for n, v in holder.items()}
    raft.load_state_dict(state)
    return raft


def test_the_composed_flow_system_equals_an_eager_objective_in_values_and_gradients():
    """A float student and one float teacher (one teacher: its shared knowledge is its own feature,
    the combined teacher is its flow): every term and the gradients of the total equal torchvision's
    RAFTs run eagerly with the objective written out here (sequence loss, the per-pixel min-error target,
    L1 towards it, attention at the two taps, read by forward hooks)."""
    torch.manual_seed(0)
    spec = flow_spec(teachers=1, bits=FULL_PRECISION)
    spec.teachers[0].weight_bits = spec.teachers[0].act_bits = FULL_PRECISION
    system = build_flow_system(spec)
    assert [t.node for t in system.networks[0].taps] == [
        "feature_encoder.layer1.1.relu",
        "feature_encoder.layer2.1.relu",
    ]
    pairs, truth = torch.rand(2, 3, 2, SIZE, SIZE) * 2 - 1, torch.randn(2, 2, SIZE, SIZE) * 3
    truth[0, :, :8] = 500.0  # moves too far: the sequence loss and L1 leave it out
    system.train()
    _out, terms = system(pairs, truth)
    terms["total"].backward()

    student, teacher = _eager_copy(system, None), _eager_copy(system, 0)
    taps: dict[str, list] = {"student": [], "teacher": []}
    for name, net in (("student", student), ("teacher", teacher)):
        for block in (net.feature_encoder.layer1[1].relu, net.feature_encoder.layer2[1].relu):
            block.register_forward_hook(lambda m, i, o, name=name: taps[name].append(o))
    s_flows = student.train()(pairs[:, :, 0], pairs[:, :, 1], num_flow_updates=2)
    t_flows = teacher.train()(pairs[:, :, 0], pairs[:, :, 1], num_flow_updates=2)
    keep = (truth.norm(dim=1, keepdim=True) < 400).float()

    def sequence(flows):
        return sum(
            0.8 ** (len(flows) - 1 - i) * ((f - truth).abs() * keep).mean() for i, f in enumerate(flows)
        )

    with torch.no_grad():
        t_err, s_err = (
            (t_flows[-1] - truth).norm(dim=1, keepdim=True),
            (s_flows[-1] - truth).norm(dim=1, keepdim=True),
        )
        target = torch.where(t_err <= s_err, t_flows[-1], s_flows[-1])
    expected = {
        "seq_student": sequence(s_flows),
        "seq_teacher": sequence(t_flows),
        "ml_student": ((s_flows[-1] - target).abs() * keep).mean(),
        "ml_teacher": ((t_flows[-1] - target).abs() * keep).mean(),
    }
    for j, tap in enumerate(t.name for t in system.networks[0].taps):
        expected[f"feature/{tap}"] = losses.attention_loss(taps["teacher"][j], taps["student"][j])
    d = spec.distill
    expected["total"] = (
        d.alpha * (expected["seq_student"] + expected["seq_teacher"])
        + d.beta * (expected["ml_student"] + expected["ml_teacher"])
        + d.gamma * sum(v for k, v in expected.items() if k.startswith("feature/"))
    )
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-5), key
    expected["total"].backward()
    pairs_of_params = [
        (system.student.state_dict(keep_vars=True), dict(student.named_parameters()), ""),
        (
            {
                f"feature_encoder.{n}" if not n.startswith(("context", "update")) else n: p
                for n, p in system.teachers.get_submodule("teacher0").named_parameters()
            },
            dict(teacher.named_parameters()),
            "teacher ",
        ),
    ]
    for ours, theirs, label in pairs_of_params:
        for name, param in theirs.items():
            assert param.grad is not None, label + name
            torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=label + name)
    assert system.teachers.get_submodule("fusion.output").logits.grad is not None


def test_a_w2a2_student_with_two_teachers_trains_every_part():
    torch.manual_seed(0)
    system = build_flow_system(flow_spec())
    out, terms = system(torch.rand(2, 3, 2, SIZE, SIZE), torch.randn(2, 2, SIZE, SIZE))
    terms["total"].backward()
    assert set(terms) >= {"seq_student", "seq_teacher", "ml_student", "ml_teacher", "feature", "total"}
    assert len(out.each_teacher_logits) == 2 and out.teacher_logits.shape == (2, 2, SIZE, SIZE)
    for name, param in system.named_parameters():
        if param.requires_grad and "quantizer" not in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert set(system.importance()) == {*(t.name for t in system.networks[0].taps), "output"}


def test_the_student_alone_trains_with_its_sequence_loss():
    spec = flow_spec(teachers=0, method="single")
    system = build_flow_system(spec)
    _, terms = system(torch.rand(1, 3, 2, SIZE, SIZE), torch.zeros(1, 2, SIZE, SIZE))
    assert set(terms) == {"seq_student", "total"} and system.teachers is None


# ---------------------------------------------------------------- the CLI
def test_the_flow_quickstart_trains_resumes_and_evaluates(tmp_path, capsys, fashion_flow):
    """specs/flow_quickstart.yaml in tiny mode: two training processes, resumed by one; validate names
    the objective; eval reports the end-point error of the student, the teachers and the combined one;
    predict writes a pair's flow (.flo, colour PNG), what the student computes on it."""
    summary = cli(tmp_path, "validate", "flow_quickstart", "--set", f"data.root={fashion_flow}")
    assert "task flow" in summary and "SEQ_T + SEQ_S" in summary and "input 3x2x128x128" in summary
    sets = [
        f"data.root={fashion_flow}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.train_subset=8",
        "data.eval_subset=4",
        "student.kwargs.num_flow_updates=2",
        *(f"{net}.weights=null" for net in ("student", "teachers[0]", "teachers[1]")),  # no float run here
    ]
    run, train = train_tiny_example("flow_quickstart.yaml", sets, cwd=tmp_path, port=29591)
    assert all(r["loss/seq_student"] > 0 and r["loss/feature"] > 0 for r in train)
    final = json.loads((run / "final.json").read_text())
    assert set(final["accuracy"]) == {
        f"{m}/{n}"
        for m in ("epe", "out1", "out3", "out5")
        for n in ("student", "combined", "teacher0", "teacher1")
    }
    table = cli(tmp_path, "eval", str(run))
    assert "EPE (px)" in table
    record = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert record["task"] == "flow" and record["samples"] == 4
    assert record["epe/student"] == pytest.approx(final["accuracy"]["epe/student"])
    # predict: a pair's flow written as .flo and PNG, what the student computes on the dataset's pair
    from cmtkd_graph.cli import main
    from cmtkd_graph.deploy.integer import integer_student
    from cmtkd_graph.deploy.student import load_student

    # export: torch, codes and the Q/DQ ONNX; MACs per pair counted on what every part ran on, times its calls
    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    manifest = json.loads((tmp_path / "exported" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"torch", "codes", "onnx"} and manifest["model"]["sample"] == "pair"
    assert "not for flow students" in manifest["onnx_int8"]["skipped"]
    macs = {layer["name"]: layer["macs"] for layer in manifest["layers"]}
    assert macs["feature_encoder.convnormrelu.0"] == 2 * (64 * 64 * 32) * (3 * 7 * 7)  # both images
    assert macs["update_block.flow_head.conv2"] == 2 * (16 * 16 * 2) * (128 * 3 * 3)  # two updates
    assert "update_block x2" in manifest["cost"]["note"]
    _the_onnx_computes_the_students_flow(tmp_path / "exported", manifest)
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--format", "onnx-int8", "--force"]) == 2
    assert "error: onnx-int8 export: not for flow students" in capsys.readouterr().err

    pair = pair_files(fashion_flow)[1][0]
    argv = ["predict", str(run), str(pair.first), str(pair.second), "--json", "--draw", str(tmp_path / "f")]
    assert main(argv) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["pair"] == [str(pair.first), str(pair.second)] and answer["size"] == [SIZE, SIZE]
    assert (tmp_path / "f" / f"0000-{pair.first.stem}.png").is_file()
    sample, _ = FlowPairs([pair], size=SIZE, mean=[0.5] * 3, std=[0.5] * 3)[0]
    with torch.no_grad():
        expected = load_student(run)(sample[None])["logits"][0]
    torch.testing.assert_close(read_flo(answer["flo"]), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the integer reference of the codes: every part's layers on integers
        integer = integer_student(tmp_path / "exported")(sample[None])["logits"][0]
    torch.testing.assert_close(integer, expected, rtol=1e-3, atol=1e-3)
    # predict from the ONNX: onnxruntime's flow of the pair as the .flo (its images are the input's size)
    argv = ["predict", str(tmp_path / "exported"), str(pair.first), str(pair.second), "--backend", "onnx"]
    assert main([*argv, "--json", "--draw", str(tmp_path / "o")]) == 0
    (from_onnx,) = json.loads(capsys.readouterr().out)
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(tmp_path / "exported" / "student.onnx"), providers=["CPUExecutionProvider"]
    )
    (flow,) = session.run(None, {"images": sample[None].numpy()})
    torch.testing.assert_close(read_flo(from_onnx["flo"]), torch.from_numpy(flow[0]), rtol=1e-5, atol=1e-5)
    assert main(["predict", str(run), str(pair.first)]) == 2
    assert "1 image(s) is not a number of pairs" in capsys.readouterr().err


def _the_onnx_computes_the_students_flow(exported: Path, manifest: dict) -> None:
    """The Q/DQ ONNX takes one pair and answers the last flow: every layer's weights are DequantizeLinear
    of their integers; on pairs, onnxruntime's flow is the student's up to activations that round to a
    neighbouring level (sums in another order), which W2A2 RAFT's updates carry on."""
    import onnx
    import onnxruntime as ort

    section = manifest["onnx"]
    assert section["batch"] == 1 and section["check_images"] == 4, section  # the run's evaluation pairs
    assert section["check_source"].startswith("the run's evaluation data"), section
    model = onnx.load(str(exported / "student.onnx"))
    ops = Counter(node.op_type for node in model.graph.node)
    quantized = [layer for layer in manifest["layers"] if layer.get("onnx")]
    assert ops["DequantizeLinear"] >= sum(len(layer["onnx"]["weights"]) for layer in quantized) > 40
    assert ops["GridSample"] > 0 and ops["QuantizeLinear"] > 0
    stored = [(i.data_type, tuple(i.dims), i.raw_data) for i in model.graph.initializer if i.raw_data]
    assert len(stored) == len(set(stored))  # the update block's integers once, not once per update
    session = ort.InferenceSession(str(exported / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 3, 2, SIZE, SIZE]]


def test_single_images_do_not_check_the_onnx_of_a_flow_student(tmp_path):
    """``export --images`` naming a folder of single images: RAFT reads pairs, so the ONNX check runs on
    random pairs, and the manifest says why."""
    from PIL import Image

    from cmtkd_graph.deploy.export import _onnx_check_images

    for i in range(2):
        Image.new("RGB", (40, 40), (100 * i, 50, 50)).save(tmp_path / f"{i}.png")
    spec = load_spec(REPO / "specs" / "flow_quickstart.yaml")
    images, why = _onnx_check_images(spec, tmp_path, 8)
    shape = spec.data.input_shape()
    assert images is None and why == f"{tmp_path} are not samples of the student's input shape {shape}"


def test_the_onnx_of_a_flow_student_is_pytorchs_flow_where_activations_do_not_round(tmp_path):
    """With float activations (2-bit weights, written as their integers and DequantizeLinear), nothing
    rounds at a level boundary: onnxruntime's flows equal the student's within float rounding, so the
    unrolled updates, the correlation lookups and every part's weights are written as PyTorch runs them.
    (With 2-bit activations, onnxruntime's sums in another order move values across levels, and RAFT's
    updates carry that on: the quickstart's W2A2 export differs by about 0.8 px; docs/tasks.md.)"""
    from cmtkd_graph.deploy.codes import quantized_layers
    from cmtkd_graph.deploy.onnx_export import export_onnx
    from cmtkd_graph.deploy.student import build_student

    overrides = ["student.act_bits=32", "student.weights=null", "teachers=[]", "method=single"]
    spec = load_spec("flow_quickstart", overrides)
    student = build_student(spec)
    layers = quantized_layers(student)
    records = [{} for _ in layers]
    path = tmp_path / "flow.onnx"
    section = export_onnx(student, layers, records, path, input_shape=spec.data.input_shape(), answers="flow")
    assert section["batch"] == 1 and section["images_within_tolerance"] == section["check_images"] == 8
    assert section["mean_end_point_difference"] < 1e-4 and section["max_abs_diff"] < 1e-3, section
    assert not any(r["onnx"]["inputs"] for r in records)  # first/last layers float: no weights either
    assert sum(len(r["onnx"]["weights"]) for r in records) == len(records) - 3 > 40
    assert {w["type"] for r in records for w in r["onnx"]["weights"]} <= {"INT2", "INT4", "INT8"}


def test_taps_lists_the_encoders_nodes(tmp_path):
    table = cli(tmp_path, "taps", "raft_small", "--input-size", "128")
    assert table.startswith("raft_small (feature_encoder, on each image) at 3x128x128")
    assert table.splitlines()[-1] == "auto: feature_encoder.layer1.1.relu, feature_encoder.layer2.1.relu"


def test_inspect_shows_every_part_the_shared_knowledge_and_the_fused_flows():
    """The summary and the graph of the quickstart: every part's layers (encoders, update block) with
    their precision, the taps with their shapes, the flows' fusion from each teacher's update block and
    its mutual-learning loss with the student's."""
    from cmtkd_graph.inspection.graph import system_graph
    from cmtkd_graph.inspection.output import summary_table

    system = cg.build_system(load_spec(REPO / "specs" / "flow_quickstart.yaml"), device="meta", load=False)
    table = summary_table(system)
    assert "student (raft_small W2A2)" in table and "weight quantizers  50 x 2 bits" in table
    assert "update_block.flow_head.conv2 Conv2d (last layer kept full precision)" in table
    assert "feature_encoder.layer1.1.relu [4, 32, 64, 64]" in table  # both images of a batch of 2
    assert "? <- teacher0/update_block:output, teacher1/update_block:output" in table
    assert "min-error flow L1 (mutual) on output" in table
    graph = system_graph(system)
    layer = graph.nodes["student/update_block.motion_encoder.convcorr1.0"]
    assert layer["weight_bits"] == 2 and layer["output_shape"] == [2, 96, 16, 16]
    assert graph.nodes["teacher1/context_encoder.layer1.0.convnormrelu1.0"]["weight_bits"] == 8
    assert graph.has_edge("student/update_block:output", "loss/output")
    assert graph.has_edge("fusion/output", "loss/output")
    # a system with real weights is inspected through a copy on the meta device: nothing of it changes
    system = cg.build_system(load_spec(REPO / "specs" / "flow_quickstart.yaml"), load=False)
    before = {k: v.clone() for k, v in system.state_dict().items()}
    modes = [m.training for m in system.modules()]
    assert summary_table(system) == table
    assert [m.training for m in system.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in system.state_dict().items())
    assert graph.has_edge(
        "student/update_block.motion_encoder.convcorr1.0.weight_quantizer",
        "student/update_block.motion_encoder.convcorr1.0",
    )


@pytest.mark.parametrize("arch", ["raft_small", "raft_large"])
def test_both_rafts_compose_with_two_teachers_as_the_models_page_says(arch):
    """W2A2 student and two W2A2 teachers at the auto taps, forward and backward on the meta device:
    the row of docs/models.md is what this build shows."""
    spec = support.support_spec(arch)
    system = support.compose_check(spec)
    row = support.read_page((REPO / "docs" / "models.md").read_text())[arch]
    assert (row.task, row.composes) == ("flow", "yes")
    assert row.structure() == support.structure(spec, system)
