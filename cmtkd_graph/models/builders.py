"""Building torchvision models by name (the builders the registered tasks cover), and loading initial
weights into them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmtkd_graph.errors import UserError, closest, first_line
from cmtkd_graph.safe_files import TORCH_SUFFIXES, read_tensors

QUANTIZED_PREFIX = "quantized_"
"""torchvision's ``quantized_*`` builders (``torchvision.models.quantization``): torch.ao's versions of float
classifiers, refused in favour of the float builder, which the quantize pass rewrites itself."""


def model_names() -> tuple[str, ...]:
    """The torchvision builders the registered tasks cover (``cmtkd_graph.tasks``), in task order."""
    from cmtkd_graph.registry import TASKS

    return tuple(name for task in TASKS for name in TASKS.get(task).model_names())


def check_arch(name: str) -> str:
    """Return ``name`` if a registered task covers it, else raise with close names (or, for a torchvision
    builder of another kind, the tasks that are supported)."""

    from cmtkd_graph.registry import TASKS

    names = model_names()
    if name in names:
        return name
    tasks = ", ".join(f"{t} ({', '.join(TASKS.get(t).builder_modules)})" for t in TASKS)
    float_name = name.removeprefix(QUANTIZED_PREFIX)
    if name.startswith(QUANTIZED_PREFIX) and float_name in names and name in _every_torchvision_builder():
        raise ValueError(
            f"{name!r} is torch.ao's 8-bit eager-mode version of {float_name!r} (quantization stubs and "
            "fused modules for post-training quantization); cmtkd-graph quantizes the float network itself "
            f"at any bits: use arch: {float_name} (and `cmtkd-graph export` for its int8 forms)"
        )
    if name in _every_torchvision_builder():
        raise ValueError(
            f"{name!r} is a torchvision builder of a task this version does not train; the tasks: {tasks}"
        )
    near = closest(name, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise ValueError(f"unknown torchvision model {name!r}{hint} (the builders of the tasks: {tasks})")


@functools.cache
def _every_torchvision_builder() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


def build_model(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build an untrained torchvision model (weights are loaded later, into the rewritten graph)."""
    import torchvision

    from cmtkd_graph.tasks import task_record

    check_arch(arch)
    try:
        return torchvision.models.get_model(arch, weights=None, **task_record(arch).builder_kwargs(kwargs))
    except TypeError as err:
        raise UserError(f"{arch}: bad builder kwargs {kwargs}: {err}") from None
    except (AssertionError, ValueError, NotImplementedError) as err:  # the builder's own checks
        raise UserError(f"{arch}: the builder refuses kwargs {kwargs}: {first_line(err)}") from None


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint file or a torchvision weights name (``ResNet18_Weights.DEFAULT``).

    Files may hold a plain state_dict, ``{"state_dict": ...}`` / ``{"model": ...}``, or safetensors.
    Torchvision weights are read from the local torch hub cache or downloaded (users with internet).
    """
    path = Path(source).expanduser()
    if path.suffix in {".safetensors", *TORCH_SUFFIXES} or path.exists():
        obj = read_tensors(path, what="weights")
        for key in ("state_dict", "model", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"weights: {str(path)!r} does not hold a state_dict")
        return obj
    import torchvision

    try:
        weights = torchvision.models.get_weight(source)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"weights: {source!r} is neither an existing checkpoint file nor a torchvision weights name "
            "such as ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    return weights.get_state_dict(progress=False)
