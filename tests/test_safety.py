"""Loading never runs code hidden in a file: malicious pickles are refused with one line and exit 2.

The payload of every pickle below creates a marker file when unpickled; each test checks the marker
was never written.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cmtkd_graph as cg
from cmtkd_graph.errors import UserError

from .conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this opens (creates) ``marker`` for writing: code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def evil_torch_file(path: Path, marker: Path) -> Path:
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    assert not marker.exists()
    return path


def small_quickstart(tmp_path: Path, *overrides: str) -> list[str]:
    """Arguments of a quickstart run on 64 training images, writing tmp_path/run."""
    small = [f"train.output_dir={tmp_path / 'run'}", "data.train_subset=64", "data.eval_subset=16"]
    small += ["train.mixed_precision=no", "train.channels_last=false"]
    return ["quickstart"] + [a for o in [*small, "data.batch_size=32", *overrides] for a in ("--set", o)]


def one_error_line(result) -> str:
    """The one ``error:`` line of a command that exited 2 (training's progress lines may precede it)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_a_malicious_checkpoint_is_refused_by_eval_export_and_load_student(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(cg.dump_spec(cg.load_spec("quickstart")))
    evil = evil_torch_file(tmp_path / "evil.pt", marker)
    line = one_error_line(run_cli(tmp_path, "eval", str(run), "--checkpoint", str(evil)))
    assert "refused" in line and "evil.pt" in line
    line = one_error_line(
        run_cli(tmp_path, "export", str(run), "--out", str(tmp_path / "x"), "--checkpoint", str(evil))
    )
    assert "refused" in line
    # a pickle posing as the final student (safetensors) is not a safetensors file
    shutil.copy(evil, run / "student.safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        cg.load_student(run)
    assert not marker.exists()


def test_malicious_initial_weights_are_refused(tmp_path, marker, fashion_mnist):
    evil = evil_torch_file(tmp_path / "evil.pt", marker)
    result = run_cli(tmp_path, "train", *small_quickstart(tmp_path, f"student.weights={evil}"))
    line = one_error_line(result)
    assert "weights" in line and "refused" in line and ".open" in line
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_malicious_cifar_batch_is_refused(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {
        "data": np.zeros((2, 3072), np.uint8),
        "labels": [0, 1],
        "batch_label": "x",
        "filenames": ["a", "b"],
    }
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2)
    )
    (folder / "data_batch_1").write_bytes(pickle.dumps({**good, "data": Payload(marker)}, protocol=2))
    overrides = ["data.dataset=cifar10", f"data.root={tmp_path}", "data.image_size=32"]
    overrides.append(f"train.output_dir={tmp_path / 'run'}")
    result = run_cli(tmp_path, "train", "quickstart", *[a for o in overrides for a in ("--set", o)])
    line = one_error_line(result)
    assert "precision auto" not in result.stderr  # the data is checked before any probing
    assert "data_batch_1" in line and "refused" in line and ".open" in line
    assert not marker.exists()
    # the same files without the payload load (the restricted unpickler admits what CIFAR batches hold)
    (folder / "data_batch_1").write_bytes(pickle.dumps(good, protocol=2))
    from cmtkd_graph.data.cifar import read_cifar

    splits = read_cifar("cifar10", str(tmp_path), download=False)
    assert splits.train[0].shape == (10, 3, 32, 32) and splits.classes[3] == "c3"


def test_resume_refuses_a_malicious_optimizer_state_and_checkpoints_hold_no_custom_pickle(
    tmp_path, marker, fashion_mnist
):
    args = small_quickstart(tmp_path, "train.epochs=1", "train.progress_bar=false")
    assert run_cli(tmp_path, "train", *args).returncode == 0
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the scheduler state is JSON now
    assert "scheduler" in (checkpoint / "trainer_state.json").read_text()
    evil_torch_file(checkpoint / "optimizer.bin", marker)
    line = one_error_line(
        run_cli(tmp_path, "train", "--resume", str(tmp_path / "run"), "--set", "train.epochs=2")
    )
    assert "--resume" in line and "refused" in line and ".open" in line
    assert not marker.exists()


# --- hostile or careless inputs are bounded and end in one line (issue #46, 4-7) ----------------------


def cli_errors(argv: list[str], capsys) -> list[str]:
    """The ``error:`` lines of ``cmtkd-graph ARGV`` run in this process, which must exit 2 without a
    traceback."""
    from cmtkd_graph import cli

    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error: ")]


ALIAS_BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["name: *a8", "student: {arch: resnet18, weight_bits: 2, act_bits: 2}", "data: {dataset: cifar10}"]
)


@pytest.mark.timeout(60)
def test_a_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path, capsys):
    """9 aliases x 9 levels (387 million values once expanded) took 11.6 GB and printed a 2 GB line."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(ALIAS_BOMB)
    (line,) = cli_errors(["validate", str(spec), "--no-build"], capsys)
    assert "expands to more than 100000 values" in line and len(line) < 300
    (line,) = cli_errors(
        ["validate", "quickstart", "--no-build", "--set", f"taps.teachers={ALIAS_BOMB}"], capsys
    )
    assert "invalid YAML" in line or "expands to more than" in line


@pytest.mark.timeout(60)
def test_large_deep_and_recursive_yaml_is_one_line(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\nnotes: [" + "1, " * 600_000 + "1]\n")  # the 54 MB list, in small
    (line,) = cli_errors(["validate", str(big), "--no-build"], capsys)
    assert "bytes; a spec file may have at most 1048576" in line
    for depth in (100, 1000, 5000):  # deeper than the interpreter's recursion limit too
        deep = tmp_path / f"deep{depth}.yaml"
        deep.write_text("name: " + "[" * depth + "]" * depth + "\n")
        (line,) = cli_errors(["validate", str(deep), "--no-build"], capsys)
        assert "nested too deeply (at most 64 levels)" in line
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("name: &a [*a]\n")
    (line,) = cli_errors(["validate", str(recursive), "--no-build"], capsys)
    assert "refers to a value that contains it" in line or "invalid YAML" in line


def test_long_values_are_cut_in_error_lines_and_long_names_refused(tmp_path, capsys):
    (line,) = cli_errors(
        ["validate", "quickstart", "--no-build", "--set", "train.epochs=" + "9x" * 50_000], capsys
    )
    assert line.startswith("error: train.epochs: ") and "more characters" in line and len(line) < 300
    (line,) = cli_errors(["validate", "quickstart", "--no-build", "--set", "name=" + "n" * 200], capsys)
    assert line == "error: name: at most 128 characters, got 200"


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path, capsys):
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: café\n".encode("latin-1"))
    (line,) = cli_errors(["validate", str(spec), "--no-build"], capsys)
    assert line == f"error: {spec}: not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8"


@pytest.mark.parametrize(
    "override, complaint",
    [
        ("optim.lr=1e309", "optim.lr: Input should be a finite number"),
        ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
        ("train.seed=4294967296", "train.seed: Input should be less than or equal to 4294967295"),
        ("data.std=[0, 0, 0]", "data.std: every value must be > 0"),
    ],
)
def test_values_train_would_choke_on_are_refused_by_validate(capsys, override, complaint):
    (line,) = cli_errors(["validate", "quickstart", "--no-build", "--set", override], capsys)
    assert complaint in line


@pytest.mark.parametrize("where", ["name", "row"])
def test_a_study_or_row_named_dot_dot_is_refused(tmp_path, where):
    """A study or row named `..` wrote results.json/results.png over the working directory's."""
    from cmtkd_graph.study import load_study

    study = tmp_path / "study.yaml"
    names = {"name": ("..", "a"), "row": ("s", "..")}[where]
    study.write_text(f"name: '{names[0]}'\nbase: quickstart\nrows: [{{name: '{names[1]}'}}]\n")
    with pytest.raises(UserError, match=r"must name one directory"):
        load_study(study)
