"""What a system computes for a batch (:class:`SystemOutput`), read by every method's loss terms.

The loss terms themselves belong to the methods (``cmtkd_graph/methods/``, one file each); this module
holds only what they share.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from cmtkd_graph.tasks.base import Task


@dataclass
class SystemOutput:
    """What the system computes for a batch (all logits [B, classes], features keyed by tap name)."""

    student_logits: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_logits: Tensor | None = None  # the combined teacher z_T (None: the method has none)
    each_teacher_logits: tuple[Tensor, ...] = ()
    shared_features: dict[str, Tensor] = field(default_factory=dict)  # CMT-KD's shared knowledge
    hints: dict[str, Tensor] = field(default_factory=dict)  # the teacher feature each student tap learns
    # a teacher's taps that learn from the hints instead of the student's (Method.hint_learner)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)  # method-specific values (student extras...)
    stats: dict[str, Tensor] = field(default_factory=dict)  # logged vectors, e.g. mean instance weights
    # auxiliary heads' logits (segmentation's aux_loss), trained by the task's loss alone (None: no head)
    student_aux: Tensor | None = None
    each_teacher_aux: tuple[Tensor | None, ...] = ()

    def as_samples(self, task) -> SystemOutput:
        """The same output with every logits tensor as the task's samples [N, classes] (a segmentation
        network's pixels; classification's are its images, unchanged)."""
        if task.sample_logits is Task.sample_logits:
            return self
        return replace(
            self,
            student_logits=task.sample_logits(self.student_logits),
            teacher_logits=None if self.teacher_logits is None else task.sample_logits(self.teacher_logits),
            each_teacher_logits=tuple(task.sample_logits(z) for z in self.each_teacher_logits),
            student_aux=None if self.student_aux is None else task.sample_logits(self.student_aux),
            each_teacher_aux=tuple(
                None if z is None else task.sample_logits(z) for z in self.each_teacher_aux
            ),
        )


def combined_from_probabilities(each_logits: tuple[Tensor, ...], weights: Tensor | None = None) -> Tensor:
    """Logits whose softmax is the (weighted) average of the teachers' softmax.

    ``weights``: per-sample teacher weights [B, K] summing to 1 (default: the plain average).
    """
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in each_logits])  # [K, B, C]
    probs = probs.mean(0) if weights is None else (weights.t().float().unsqueeze(-1) * probs).sum(0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
