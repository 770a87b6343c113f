"""Tasks: what a model's output means (``cmtkd_graph.tasks.base``), one file per task, registered by
name in ``cmtkd_graph.registry.TASKS``. Importing this package registers the built-in tasks."""

from cmtkd_graph.tasks import classification, detection, flow, segmentation, video  # noqa: F401  (registration)
from cmtkd_graph.tasks.base import IGNORE, Task, register_task, task_of_model, task_record

__all__ = ["IGNORE", "Task", "register_task", "task_of_model", "task_record"]
