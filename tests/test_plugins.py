"""Components of a user's own (tests/plugins/my_components.py: a method, a quantizer, a dataset and a
surgery pass, none in the package) through every verb and a study, named by the spec's ``plugins:``, by
``--plugin`` and by an installed entry point. Every command is a fresh ``cmtkd-graph`` process started
in the user's project directory, as a user types it (the console script, which, unlike ``python -m``,
does not put the working directory on the Python path)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

PLUGIN = Path(__file__).parent / "plugins" / "my_components.py"
CLI = Path(sys.executable).with_name("cmtkd-graph")
TRAIN = {
    "max_steps": 2,
    "log_every": 1,
    "progress_bar": False,
    "mixed_precision": "no",
    "channels_last": False,
    "checkpoints": False,
}


def cli(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def write_spec(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's project directory: their components in my_components.py, their specs beside it."""
    root = tmp_path_factory.mktemp("user_project")
    shutil.copy(PLUGIN, root / "my_components.py")
    return root


def test_a_users_components_work_through_every_verb_and_a_study(project):
    data = {"dataset": "stripes", "batch_size": 16, "num_workers": 0, "eval_subset": 16}
    resnet = {"arch": "resnet18", "kwargs": {"num_classes": 4}}
    # the teacher: a .py file named in the spec, relative to the working directory
    write_spec(
        project / "teacher.yaml",
        name="teacher",
        plugins=["./my_components.py"],
        method="single",
        student={**resnet, "weight_bits": 32, "act_bits": 32},
        surgery=["drop_first_maxpool"],
        data=data,
        train={**TRAIN, "output_dir": "runs/teacher"},
    )
    shown = ok(cli(project, "validate", "teacher.yaml"))
    assert "stripes" in shown, shown
    # the same file named as a module too (--plugin) is one plugin, loaded once
    assert "stripes" in ok(
        cli(project, "--plugin", "my_components", "validate", "teacher.yaml", "--no-build")
    )
    ok(cli(project, "train", "teacher.yaml"))
    teacher_dir = project / "runs" / "teacher"
    identity = json.loads((teacher_dir / "identity.json").read_text())
    plugin_hash = hashlib.sha256((project / "my_components.py").read_bytes()).hexdigest()
    assert identity["inputs"] == {"plugins[0]": {"sha256": plugin_hash}}

    # the student: a module name, in a study whose runs are fresh processes
    write_spec(
        project / "student.yaml",
        name="student",
        plugins=["my_components"],
        method="logit_matching",
        student={**resnet, "weight_bits": 2, "act_bits": 2},
        teachers=[
            {
                "weight_bits": 32,
                "act_bits": 32,
                "trainable": False,
                "weights": "runs/teacher/student.safetensors",
            }
        ],
        quantizer={"name": "minmax", "options": {"clip": 3.0}},
        surgery=["drop_first_maxpool"],
        distill={"beta": 0.5, "options": {"scale": 2.0}},
        data=data,
        train={**TRAIN, "output_dir": "runs/student"},
    )
    study = {"name": "mine", "base": "student.yaml", "rows": [{"name": "logits", "label": "logit matching"}]}
    (project / "study.yaml").write_text(yaml.safe_dump(study))
    ok(cli(project, "study", "study.yaml"))
    (run_dir,) = (p for p in (project / "runs" / "study-mine" / "logits").iterdir() if p.is_dir())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2]
    assert all(r["loss/logit_mse"] > 0 and r["loss/total"] > r["loss/ce_student"] for r in train_lines)
    final = json.loads((run_dir / "final.json").read_text())
    assert {"acc1/student", "acc1/teacher0"} <= set(final["accuracy"]) and "acc1/combined" not in final[
        "accuracy"
    ]

    evaluated = ok(cli(project, "eval", str(run_dir), "--out", "eval.json"))
    assert "student" in evaluated and json.loads((project / "eval.json").read_text())
    ok(cli(project, "export", str(run_dir), "--out", "exported", "--format", "codes"))
    image = project / "horizontal.png"
    rows = np.arange(32)[:, None] % 6 < 3
    Image.fromarray(np.where(rows, 200, 16).astype(np.uint8).repeat(32, 1)).convert("RGB").save(image)
    answer = json.loads(ok(cli(project, "predict", "exported", str(image), "--json")))
    assert answer[0]["predictions"][0]["class"] in {"horizontal", "vertical", "diagonal", "antidiagonal"}
    ok(cli(project, "inspect", "student.yaml", "--out", "graph.json"))
    graph = (project / "graph.json").read_text()
    assert "logit regression" in graph and "maxpool" not in graph
    taps = ok(
        cli(
            project,
            "--plugin",
            "my_components",
            "taps",
            "resnet18",
            "--input-size",
            "32",
            "--surgery",
            "drop_first_maxpool",
        )
    )
    assert "layer1" in taps and "maxpool" not in taps

    # the plugin's code is part of what a run is: editing it makes the run stale
    with (project / "my_components.py").open("a") as f:
        f.write("\n# edited\n")
    dry = ok(cli(project, "study", "study.yaml", "--dry-run"))
    assert "stale" in dry and "plugins[0]: the plugin's code changed" in dry, dry


def test_a_plugin_that_cannot_be_imported_is_one_line(project):
    (project / "broken.py").write_text("import math\n\nvalue = math.sqrt(-1)\n")
    spec = write_spec(
        project / "broken.yaml",
        name="b",
        plugins=["./broken.py"],
        student={"arch": "resnet18", "weight_bits": 2, "act_bits": 2},
        data={"dataset": "fashion_mnist"},
    )
    result = cli(project, "validate", spec.name)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: plugins[0]: plugin './broken.py' failed to import: ValueError: math domain error "
        "(broken.py, line 3)"
    ], result.stderr
    result = cli(project, "validate", spec.name, "--set", "plugins=[not_installed.methods]")
    assert result.returncode == 2 and "no module named 'not_installed'" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    result = cli(project, "validate", spec.name, "--set", "plugins=[]", "--set", "method=logit_matching")
    assert result.returncode == 2 and "name its module under the spec's plugins:" in result.stderr


def test_an_installed_plugin_is_loaded_by_every_verb(tmp_path):
    """An entry point of the group cmtkd_graph.plugins, as `pip install` of a user's package leaves it."""
    site = tmp_path / "site"
    shutil.copytree(PLUGIN.parent, site / "my_package", ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "my_package-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cmtkd_graph.plugins]\nmine = my_package.my_components\n")
    env = {"PYTHONPATH": str(site)}
    schema = json.loads(ok(cli(tmp_path, "schema", env=env)))  # what an editor completes
    names = {k: schema["$defs"][k]["properties"]["name"]["enum"] for k in ("QuantizerSpec", "SurgerySpec")}
    assert "minmax" in names["QuantizerSpec"] and "drop_first_maxpool" in names["SurgerySpec"]
    assert "logit_matching" in schema["properties"]["method"]["enum"]
    assert "stripes" in schema["$defs"]["DataSpec"]["properties"]["dataset"]["enum"]
    assert "logit_matching" in ok(cli(tmp_path, "schema", "--markdown", env=env))
    spec = write_spec(
        tmp_path / "s.yaml",
        name="s",
        method="single",
        student={"arch": "resnet18", "kwargs": {"num_classes": 4}, "weight_bits": 2, "act_bits": 2},
        quantizer={"name": "minmax"},
        data={"dataset": "stripes"},
    )
    assert "minmax" in ok(cli(tmp_path, "validate", spec.name, "--no-build", env=env))

    (site / "my_package" / "my_components.py").write_text("raise RuntimeError('half installed')\n")
    result = cli(tmp_path, "validate", spec.name, env=env)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: plugin mine = my_package.my_components (entry point of my-package) failed to import: "
        "RuntimeError: half installed (my_components.py, line 1); reinstall or uninstall my-package"
    ], result.stderr
