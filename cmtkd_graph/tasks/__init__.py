"""Tasks: what a model's output means (``cmtkd_graph.tasks.base``), one file per task, registered by
name in ``cmtkd_graph.registry.TASKS``. Importing this package registers the built-in tasks."""

from cmtkd_graph.tasks import classification  # noqa: F401  (registration)
from cmtkd_graph.tasks.base import Task, register_task, task_of_model

__all__ = ["Task", "register_task", "task_of_model"]
