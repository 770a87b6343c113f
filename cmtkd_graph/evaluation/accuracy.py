"""The task's metrics (classification: top-1/top-5; segmentation: mIoU, pixel accuracy) of the student,
each teacher and the combined teacher: one pass over a loader.

Shared by training (``Trainer.evaluate``) and ``cmtkd-graph eval`` (``evaluation.run``). Under
``accelerate launch`` each process sees its shard; each image's metric row (``Task.metric_rows``) is
gathered with ``gather_for_metrics``, which drops the samples the last batch repeats to even out the
shards: every image is counted once.
"""

from __future__ import annotations

import torch
from torch import nn

from cmtkd_graph.passes.common import LOGITS
from cmtkd_graph.runtime.layout import channels_last_tensor
from cmtkd_graph.system_output import SystemOutput
from cmtkd_graph.tasks import Task


class StudentOnly(nn.Module):
    """A student graph alone, answering like the system (a run's final student, the weights' moving
    average)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> SystemOutput:
        return SystemOutput(student_logits=self.student(images)[LOGITS])


OBJECTS = "objects"
"""The record's key of each network's objects (detections as COCO results) where the task collects them:
``eval`` writes them beside its record; callers that do not write them pop the key."""


def _scored_dataset(dataset):
    """The dataset that holds the ground truth (``ground_truth()``), under the wrappers a loader adds."""
    while not hasattr(dataset, "ground_truth") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


@torch.no_grad()
def evaluate(model, loader, accelerator, *, task: type[Task], channels_last: bool = False) -> dict:
    """``{"samples": N, "acc1/student": %, "acc5/student": %, ..., "importance/<stat>": [...]}`` (the
    metric names are the task's: ``miou/student``...; detection adds :data:`OBJECTS`).

    Leaves ``model`` in eval mode. ``importance/<stat>`` are the method's statistics (e.g. AMTML-KD's
    instance weights) averaged over the images.
    """
    model.eval()
    states: dict[str, torch.Tensor] = {}
    objects: dict[str, list] = {}
    stats: dict[str, torch.Tensor] = {}
    seen, stats_seen = 0, 0
    for images, labels in loader:
        if channels_last:
            images = channels_last_tensor(images)
        out = model(images)
        named = {"student": out.student_logits}
        if out.teacher_logits is not None:
            named["combined"] = out.teacher_logits
        named.update({f"teacher{k}": z for k, z in enumerate(out.each_teacher_logits)})
        for name, value in out.stats.items():  # batch means, weighted by the batch size
            stats[name] = stats.get(name, 0.0) + value.float() * len(labels)
        stats_seen += len(labels) if out.stats else 0
        if task.collects_objects:  # each image's objects, gathered as Python objects, scored at the end
            for name, z in named.items():
                rows = accelerator.gather_for_metrics(task.metric_rows(z, labels), use_gather_object=True)
                objects.setdefault(name, []).extend(rows)
            seen += len(rows)
            continue
        rows = [task.metric_rows(z.float(), labels) for z in named.values()]
        gathered = accelerator.gather_for_metrics(rows)
        seen += gathered[0].shape[0]
        for name, row in zip(named, gathered, strict=True):
            states[name] = states.get(name, 0) + row.long().sum(0)  # counts, exact at any size
    record: dict = {"samples": seen}
    for name, state in states.items():
        record.update({f"{key}/{name}": value for key, value in task.metric_values(state.cpu()).items()})
    for name, rows in objects.items():
        values, found = task.score_objects(rows, _scored_dataset(loader.dataset))
        record.update({f"{key}/{name}": value for key, value in values.items()})
        record.setdefault(OBJECTS, {})[name] = found
    for name, total in sorted(stats.items()):
        pair = torch.cat([total.flatten(), total.new_tensor([stats_seen])])  # one reduce: sum and count
        pair = accelerator.reduce(pair, reduction="sum") if accelerator.num_processes > 1 else pair
        record[f"importance/{name}"] = (pair[:-1] / pair[-1]).tolist()
    return record


def eval_line(record: dict, task: type[Task]) -> str:
    """``eval (top-1/top-5 %, N images): student a/b, combined c/d, teacher0 ...`` (clips for video)."""
    keys = list(task.metric_titles)
    first = keys[0]
    parts = []
    teachers = sorted(k.split("/")[1] for k in record if k.startswith(f"{first}/teacher"))
    for name in ["student", "student_ema", "combined", *teachers]:
        if f"{first}/{name}" in record:
            parts.append(f"{name} " + "/".join(f"{record.get(f'{k}/{name}', 0):.2f}" for k in keys))
    titles = list(task.metric_titles.values())
    if all(title.endswith(" %") for title in titles):  # top-1/top-5 %
        heading = "/".join(title.removesuffix(" %") for title in titles) + " %"
    else:  # EPE (px)/>1px %/...
        heading = "/".join(titles)
    return f"eval ({heading}, {record['samples']} {task.sample_noun}s): " + ", ".join(parts)
