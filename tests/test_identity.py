"""Run identity: the spec's content, weights as content, the code that trained a run."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import cmtkd_graph as cg
from cmtkd_graph.identity import (
    IDENTITY,
    code_identity,
    digest,
    flatten,
    source_identity,
    spec_content,
    weight_sources,
    write_identity,
)
from cmtkd_graph.spec.io import load_spec


def test_flatten_names_every_value_by_its_key_path():
    data = {"a": {"b": [1, {"c": 2}], "d": [], "e": None}, "f": "x"}
    assert flatten(data) == {"a.b[0]": 1, "a.b[1].c": 2, "a.d": [], "a.e": None, "f": "x"}
    assert digest({"b": 1, "a": [1.5]}) == hashlib.sha256(b'{"a":[1.5],"b":1}').hexdigest()


def test_spec_content_is_what_is_trained_not_where_it_is_written():
    one = load_spec("quickstart", ["train.output_dir=runs/a", "train.progress_bar=true"])
    two = load_spec("quickstart", ["train.output_dir=runs/b", "train.progress_bar=false"])
    assert spec_content(one) == spec_content(two)
    assert spec_content(one)["teachers[1].weight_bits"] == 8 and "train.output_dir" not in spec_content(one)
    seeded = load_spec("quickstart", ["train.seed=1"])
    assert digest(spec_content(seeded)) != digest(spec_content(one))


def test_weights_are_identified_by_their_content(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x00" * 3000)
    spec = load_spec(
        "quickstart", [f"teachers[1].weights={weights}", "student.weights=ResNet18_Weights.DEFAULT"]
    )
    assert weight_sources(spec) == {
        "student.weights": "ResNet18_Weights.DEFAULT",
        "teachers[1].weights": str(weights),
    }
    assert source_identity(str(weights)) == {"sha256": hashlib.sha256(b"\x00" * 3000).hexdigest()}
    weights.write_bytes(b"\x01" * 3000)  # same size, new content: not a stale cache entry
    assert source_identity(str(weights)) == {"sha256": hashlib.sha256(b"\x01" * 3000).hexdigest()}
    assert source_identity("ResNet18_Weights.DEFAULT") == {"name": "ResNet18_Weights.DEFAULT"}


def test_the_code_is_the_version_and_the_checkout_commit():
    code = code_identity()
    assert code["version"] == cg.__version__
    repo = Path(cg.__file__).resolve().parent.parent
    if not (repo / ".git").exists():  # an installed wheel has no commit
        assert code["commit"] is None and code["dirty"] is None
        return
    git = ["git", "-C", str(repo)]
    assert (
        code["commit"]
        == subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    status = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    assert code["dirty"] == bool(status.stdout.strip())


def test_a_run_resumed_with_other_code_says_so(tmp_path):
    spec = load_spec("quickstart")
    fresh = write_identity(tmp_path, spec, resumed=False)
    assert fresh["code"] == code_identity() and fresh["spec_sha256"] == digest(spec_content(spec))
    assert write_identity(tmp_path, spec, resumed=True) == fresh  # same code: nothing to add
    older = {**fresh, "code": {"version": "0.0.9", "commit": "0" * 40, "dirty": False}}
    (tmp_path / IDENTITY).write_text(json.dumps(older))
    resumed = write_identity(tmp_path, spec, resumed=True)
    assert resumed["code"] == older["code"]  # who started it
    assert [r["code"] for r in resumed["resumed_with"]] == [code_identity()]
    assert write_identity(tmp_path, spec, resumed=True)["resumed_with"] == resumed["resumed_with"]


def test_a_revised_component_is_part_of_the_identity_of_the_runs_that_use_it(monkeypatch):
    """A method or quantizer that computes otherwise for the same spec raises its ``revision``: the
    runs that use it change identity, the others keep theirs (no key changes for revision 1)."""
    from cmtkd_graph.methods.cmtkd import CMTKD
    from cmtkd_graph.methods.ctkd import CTKD

    quickstart = load_spec("quickstart")
    before = spec_content(quickstart)
    assert not [k for k in before if k.startswith("revision of")]
    assert spec_content(load_spec("ctkd"))["revision of method ctkd"] == CTKD.revision == 2
    monkeypatch.setattr(CMTKD, "revision", 2)
    assert spec_content(quickstart) == {**before, "revision of method cmtkd": 2}


def test_runs_whose_generic_auto_taps_moved_change_identity():
    """The generic stage-ends rule now reads stages at 224x224: a composed run with `auto` taps on a
    generic network at another size may have other taps, so its identity holds the rule's revision;
    the ResNets (a family row), runs at 224 and runs without teachers keep their keys."""
    key = "revision of auto taps (stage ends)"
    small = ["student.arch=mobilenet_v2", "surgery=[]", "taps={teachers: auto}", "data.image_size=32"]
    assert spec_content(load_spec("quickstart", small))[key] == 2
    assert key not in spec_content(load_spec("quickstart", [*small, "data.image_size=224"]))
    assert key not in spec_content(load_spec("quickstart", ["taps={teachers: auto}", "data.image_size=32"]))
    alone = [*small, "method=single", "teachers=[]", "distill={}"]
    assert key not in spec_content(load_spec("quickstart", alone))
