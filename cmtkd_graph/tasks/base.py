"""The task record: what a model's output means, and everything that follows from it.

A task is a subclass of :class:`Task` registered by name (``@register_task("name")``), like the
methods, quantizers and datasets. Its facts say which torchvision builders belong to it (the modules of
``torchvision.models`` whose ``list_models`` it covers) and, as the tool grows into segmentation, video,
detection and optical flow (docs/architecture.md#tasks), what the head outputs are, the task loss, the
metrics, the data formats it reads and what ``eval``, ``predict`` and ``export`` write. The rest of the
tool asks the spec's task and never branches on a task's name.

The spec's ``task:`` is inferred from the student's builder when not written.
"""

from __future__ import annotations

import functools
import importlib
from typing import ClassVar

from cmtkd_graph.registry import TASKS


class Task:
    """Base class of a task record (see the module docstring). Class attributes are the facts."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: what the models of this task compute
    builder_modules: ClassVar[tuple[str, ...]] = ()  # torchvision modules whose list_models() it covers

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """The torchvision builders of this task (``list_models(module=...)`` of its modules)."""
        return _builders(cls.builder_modules)


@functools.cache
def _builders(modules: tuple[str, ...]) -> tuple[str, ...]:
    import torchvision

    return tuple(
        name
        for module in modules
        for name in torchvision.models.list_models(module=importlib.import_module(module))
    )


def register_task(name: str):
    """Class decorator: register a :class:`Task` subclass under ``name`` (and set its ``name``)."""
    return TASKS.register_record(name)


def task_of_model(arch: str) -> str | None:
    """The registered task whose builders include ``arch`` (None: no task has it)."""
    return next((name for name in TASKS if arch in TASKS.get(name).model_names()), None)
