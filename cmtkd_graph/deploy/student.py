"""The trained student alone: found in a run, a checkpoint or an export, loaded as a plain ``nn.Module``.

The student is rebuilt from the run's resolved spec by the same passes that built it for training
(``build_network``: trace, surgery, quantize), so its graph and parameter names are those of training
and its outputs are bit-identical to the trained system's student on the same device. It returns the
logits alone: no taps, teachers, adapters, importance logits or auxiliary head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, fx

from cmtkd_graph.errors import UserError
from cmtkd_graph.safe_files import read_json_object, read_tensors
from cmtkd_graph.spec import Spec

SPEC_FILE = "spec.yaml"
STUDENT_FILE = "student.safetensors"
MANIFEST_FILE = "manifest.json"
SYSTEM_FILE = "model.safetensors"  # what accelerate's save_state writes into a checkpoint
STUDENT_PREFIX = "student."


@dataclass
class StudentSource:
    """Where a student was found: its resolved spec and its state dict (torchvision names)."""

    spec: Spec
    state: dict[str, Tensor]
    origin: Path
    run_dir: Path | None  # the training run, when the source is one or lies inside one

    def __post_init__(self) -> None:
        # a network trained with an auxiliary head (segmentation's aux_loss) is deployed without it
        from cmtkd_graph.tasks import task_record

        self.state = task_record(self.spec.student.arch).without_aux_head(self.state)


def find_student(
    path: str | Path, *, checkpoint: str | None = None, overrides: Sequence[str] = ()
) -> StudentSource:
    """The student of an export directory, a run directory (its final ``student.safetensors``, or
    ``checkpoint``: ``latest`` or a path) or one of a run's checkpoint directories."""
    path = Path(path).expanduser()
    if path.is_file():
        raise UserError(
            f"{path}: give the directory (an export, a run or a checkpoint), not a file: the student's "
            "architecture comes from the spec.yaml beside it"
        )
    if not path.is_dir():
        raise UserError(f"{path} does not exist (expected an export, run or checkpoint directory)")
    if (path / SYSTEM_FILE).is_file() and not (path / SPEC_FILE).is_file():  # RUN/checkpoints/step-N
        run_dir = path.parent.parent
        return StudentSource(_spec(run_dir, overrides), _checkpoint_student(path), path, run_dir)
    if not (path / SPEC_FILE).is_file():
        raise UserError(f"{path} has no {SPEC_FILE}: it is not a run, checkpoint or export directory")
    spec = _spec(path, overrides)
    run_dir = None if (path / MANIFEST_FILE).is_file() else path
    if checkpoint is not None and run_dir is not None:
        origin = resolve_checkpoint(run_dir, checkpoint)
        if origin.is_dir():
            return StudentSource(spec, _checkpoint_student(origin), origin, run_dir)
        return StudentSource(spec, _student_keys(read_tensors(origin, what="--checkpoint")), origin, run_dir)
    if (path / STUDENT_FILE).is_file():
        file = export_file(path, STUDENT_FILE) if run_dir is None else path / STUDENT_FILE
        return StudentSource(spec, read_tensors(file, what="student"), path, run_dir)
    if run_dir is not None:  # an unfinished run: its last checkpoint
        origin = resolve_checkpoint(run_dir, "latest")
        return StudentSource(spec, _checkpoint_student(origin), origin, run_dir)
    raise UserError(f"{path} has no {STUDENT_FILE}")


def resolve_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """``latest`` (the run's last complete checkpoint) or a checkpoint directory / tensor file path."""
    if checkpoint == "latest":
        from cmtkd_graph.checkpoint import checkpoints_dir, latest_checkpoint

        if not (checkpoints_dir(run_dir) / "latest").is_file():
            raise UserError(
                f"--checkpoint latest: {run_dir} has no checkpoint (train.checkpoints was off, or the run "
                "stopped before its first one); its final student.safetensors holds the student only"
            )
        return latest_checkpoint(run_dir)
    path = Path(checkpoint).expanduser()
    if not path.is_absolute() and not path.exists():
        path = run_dir / checkpoint
    if path.is_dir() and not (path / SYSTEM_FILE).is_file():
        raise UserError(f"--checkpoint: {path} has no {SYSTEM_FILE} (not a checkpoint directory)")
    if not path.exists():
        raise UserError(f"--checkpoint: {checkpoint} does not exist (in {run_dir} or as a path)")
    return path


def read_system_state(checkpoint: Path) -> dict[str, Tensor]:
    """The whole system's state dict saved in a checkpoint directory or tensor file."""
    file = checkpoint / SYSTEM_FILE if checkpoint.is_dir() else checkpoint
    state = read_tensors(file, what="--checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_student(spec: Spec, verb: str = "export") -> fx.GraphModule:
    """The spec's student network (float weights random), as training built it, in eval mode; ``verb``:
    what needs it (a task without that verb yet says so in one line)."""
    from cmtkd_graph.system import build_network, build_system
    from cmtkd_graph.tasks import task_record

    task = task_record(spec.student.arch)
    task.require(verb)
    if task.system_builder is not None:  # rewritten part by part: the task's system builds its student
        alone = spec.model_copy(update={"teachers": [], "method": "single"})
        return build_system(alone, load=False).student.eval()
    return build_network(spec.student, spec).eval()


def load_student(
    path: str | Path,
    *,
    checkpoint: str | None = None,
    inference: bool = False,
    integer_kernels: bool | None = None,
) -> fx.GraphModule:
    """The trained student of an export, run or checkpoint directory, in eval mode, on the CPU.

    ``student(images)`` returns the logits, bit-identical on CPU to the trained system's student (a task
    whose networks are rewritten part by part, flow and detection: the network's dict, its ``logits`` the
    flow or the detections; as trained only, no ``inference`` form).
    ``inference=True``: its inference form (``deploy.inference``: weights decoded once, BatchNorm
    folded), the same levels computed faster; its logits agree within float rounding of BatchNorm.
    ``integer_kernels`` (inference form only; default: where this PyTorch has them): its quantized
    convolutions on oneDNN's int8 kernels (``deploy.onednn_int8``), with the same float epilogue. A max
    pooling gets a channels-last input where that is timed faster here (``deploy.inference``).
    """
    source = find_student(path, checkpoint=checkpoint)
    student = build_student(source.spec, "load_student")
    load_state(student, source.state, origin=source.origin)
    if not inference:
        return student
    if not isinstance(student, fx.GraphModule):
        raise UserError(
            f"inference=True: not for {source.spec.resolved_task} students in this version (rewritten part "
            "by part, they run as trained)"
        )
    from cmtkd_graph.deploy.inference import (
        inference_form,
        pool_in_channels_last,
        pools_faster_in_channels_last,
    )
    from cmtkd_graph.deploy.onednn_int8 import (
        chain_integer_convolutions,
        integer_kernels_available,
        use_integer_kernels,
    )
    from cmtkd_graph.passes.graph_pass import finish

    form = inference_form(student)
    if integer_kernels is None:
        integer_kernels = integer_kernels_available()
    elif integer_kernels and not integer_kernels_available():
        raise UserError("integer_kernels=True: this PyTorch build has no oneDNN int8 convolution (x86 CPUs)")
    if integer_kernels:
        use_integer_kernels(form)
        chain_integer_convolutions(form)
        finish(form)
    example = torch.randn(1, *source.spec.data.input_shape(), generator=torch.Generator().manual_seed(0))
    pool_in_channels_last(form, pools_faster_in_channels_last(form, example))
    return form


def load_state(module: torch.nn.Module, state: dict[str, Tensor], *, origin: Path) -> None:
    """Load ``state`` strictly, reporting a mismatch (another architecture, a damaged file) in one line.
    A parameter two networks share (CTKD's stem) is saved once, under its first name: its other names
    are not missing."""
    result = module.load_state_dict(state, strict=False)
    names_of: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    aliases = {n for names in names_of.values() if any(m in state for m in names) for n in names}
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_few(result.unexpected_keys)}")
        raise UserError(f"{origin}: the weights do not fit the spec's student ({'; '.join(parts)})")


def _spec(directory: Path, overrides: Sequence[str] = ()) -> Spec:
    from cmtkd_graph.spec.io import load_spec

    file = directory / SPEC_FILE
    if not file.is_file():
        raise UserError(f"{directory} has no {SPEC_FILE} (is it a run directory?)")
    return load_spec(export_file(directory, SPEC_FILE), overrides)


def read_manifest(directory: Path) -> dict | None:
    """An export directory's ``manifest.json`` (None where there is none: a run directory)."""
    file = directory / MANIFEST_FILE
    if not file.is_file():
        return None
    return read_json_object(file, what="export", fix="export again")


def export_file(directory: Path, name: str) -> Path:
    """``directory/name``, checked against the SHA-256 its export's manifest records: a file changed or
    left over from another export is refused in one line, never served. Exports written before the
    manifest recorded hashes, and run directories, are read as they are."""
    from cmtkd_graph.identity import file_sha256

    path = directory / name
    manifest = read_manifest(directory)
    if manifest is None or "sha256" not in manifest:
        return path
    recorded = manifest["sha256"].get(name)
    if recorded is None:
        raise UserError(f"{path}: not part of this export ({MANIFEST_FILE} lists no such file); export again")
    if not path.is_file():
        raise UserError(f"{path}: missing from this export; export again")
    if file_sha256(path) != recorded:
        raise UserError(
            f"{path}: its content differs from what {MANIFEST_FILE} recorded at export (changed or replaced "
            "since); export again"
        )
    return path


def _checkpoint_student(checkpoint: Path) -> dict[str, Tensor]:
    return _student_keys(read_system_state(checkpoint))


def _student_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The student's entries of a system state dict (or the state as it is, if it is a student's)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(STUDENT_PREFIX) for k in state):
        return state
    return {k.removeprefix(STUDENT_PREFIX): v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def _few(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
