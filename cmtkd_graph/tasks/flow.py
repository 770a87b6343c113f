"""``task: flow`` — optical flow: a pair of images in, the motion of every pixel of the first out.

The builders of ``torchvision.models.optical_flow``: ``raft_small`` and ``raft_large`` (Teed and Deng,
ECCV 2020). A sample is a pair, stored as a two-frame clip ``[3, 2, H, W]`` (frame 0 the first image); its
label is the flow ``[2, H, W]`` of the first image's pixels to the second, in pixels ((u, v): right,
down). RAFT refines its estimate ``num_flow_updates`` times (a network's ``kwargs``; 12 unless set, as
torchvision's default) and is trained on every estimate by its sequence loss. The network is rewritten
part by part (``cmtkd_graph.models.parts``) and composed by ``cmtkd_graph.flow_system``, which also
writes the objective (docs/tasks.md#optical-flow).
Metrics: the end-point error (EPE, px, lower is better) and the share of pixels whose error exceeds 1, 3
and 5 px, over the pixels whose flow is known.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from cmtkd_graph.tasks.base import Task, register_task

FLOW_UPDATES = "num_flow_updates"
"""The network kwarg naming RAFT's refinement count (its ``forward`` argument; never the builder's)."""
DEFAULT_FLOW_UPDATES = 12  # torchvision's RAFT.forward default
MIN_SIDE = 128  # the correlation pyramid's coarsest level (1/64 of the input) needs 2 px
EPE_SCALE = 1000  # summed end-point errors are counted in thousandths of a pixel (exact integer sums)


OUTLIER_PIXELS = (1.0, 3.0, 5.0)
UNKNOWN_FLOW = 1e9  # Middlebury's .flo: a component above this marks a pixel whose flow is unknown
FLOW_METRICS = ("epe", "out1", "out3", "out5")
"""End-point error (pixels, mean over every pixel of every pair) and the % of pixels whose end-point error
exceeds 1, 3 and 5 pixels (the outlier rates; RAFT's evaluation prints the complements, 100 - these)."""


def flow_metric_rows(predicted: Tensor, target: Tensor) -> Tensor:
    """Per pair of a batch (``[B, 2, H, W]`` flows), what it adds to the metrics: ``[pixels, summed
    end-point error, pixels over 1 px, over 3 px, over 5 px]``, over the pixels whose target flow is known
    (Middlebury marks unknown flow with values above 1e9); rows of every pair sum to the state that
    :func:`flow_metric_values` reads."""
    known = (target.abs() < UNKNOWN_FLOW).all(1).flatten(1)  # [B, H*W]
    dtype = torch.promote_types(predicted.dtype, torch.float32)  # float64 stays float64 (exact sums)
    error = torch.linalg.vector_norm(predicted.to(dtype) - target.to(dtype), dim=1).flatten(1)
    error = torch.where(known, error, torch.zeros_like(error))
    counts = [known.sum(1).float(), error.sum(1)]
    counts += [((error > t) & known).sum(1).float() for t in OUTLIER_PIXELS]
    return torch.stack(counts, 1)


def flow_metric_values(state: Tensor) -> dict[str, float]:
    """``{"epe", "out1", "out3", "out5"}`` of summed :func:`flow_metric_rows`."""
    pixels = max(float(state[0]), 1.0)
    return {
        "epe": float(state[1]) / pixels,
        **{k: 100.0 * float(v) / pixels for k, v in zip(FLOW_METRICS[1:], state[2:], strict=True)},
    }


@register_task("flow")
class OpticalFlow(Task):
    summary = (
        "optical flow: image pairs [B, 3, 2, H, W] -> the first image's motion [B, 2, H, W], RAFT's "
        "sequence loss, end-point error and 1/3/5-px outlier rates"
    )
    builder_modules = ("torchvision.models.optical_flow",)
    sample_noun = "pair"
    frames = 2  # a sample is two images of one scene
    run_kwargs = (FLOW_UPDATES,)
    metric_titles: ClassVar[dict[str, str]] = {
        "epe": "EPE (px)",
        "out1": ">1px %",
        "out3": ">3px %",
        "out5": ">5px %",
    }
    system_builder = "cmtkd_graph.flow_system:build_flow_system"
    tap_part = "feature_encoder"  # what CMT-KD composes: the encoder of both images
    predictor = "cmtkd_graph.deploy.predict_flow:predict_flow"
    onnx_answers = "flow"
    methods = ("cmtkd", "single")
    methods_reason = "the flow objective is written for CMT-KD and the student alone: docs/tasks.md"

    @classmethod
    def kwargs_problem(cls, arch: str, kwargs: dict[str, Any]) -> str | None:
        updates = kwargs.get(FLOW_UPDATES, DEFAULT_FLOW_UPDATES)
        if not isinstance(updates, int) or isinstance(updates, bool) or updates < 1:
            return f"{FLOW_UPDATES}: RAFT refines its flow a positive whole number of times, got {updates!r}"
        return None

    @classmethod
    def objective(cls, spec: Any) -> str | None:
        d = spec.distill
        if spec.method == "single":
            return f"{d.alpha:g} SEQ_S [RAFT's sequence loss, gamma 0.8]"
        text = f"{d.alpha:g} (SEQ_T + SEQ_S) [RAFT's sequence loss; T: the combined teacher's flows]"
        if d.mutual_learning:
            text += f" + {d.beta:g} (L1_T + L1_S) [towards the per-pixel flow of the smaller end-point error]"
        if d.feature_loss != "none":
            text += f" + {d.gamma:g} {d.feature_loss} loss at the feature encoders' taps"
        return text + f"; combined teacher: {d.combine} fusion of the teachers' flows"

    @classmethod
    def spec_problems(cls, spec: Any) -> list[str]:
        problems = []
        shape = spec.data.input_shape()
        side = min(shape[-2:])
        if side < MIN_SIDE or shape[-1] % 8 or shape[-2] % 8:
            problems.append(
                f"data.image_size: RAFT needs pairs of at least {MIN_SIDE}x{MIN_SIDE} px with sides "
                f"divisible by 8 (its correlation pyramid goes down to 1/64), got {shape[-1]}x{shape[-2]}: "
                f"set data.image_size: {max(MIN_SIDE, -(-side // 8) * 8)}"
            )
        problems += cls.part_by_part_problems(spec)
        if any(cls.kwargs_problem(m.arch, m.kwargs or {}) for m in (spec.student, *spec.resolved_teachers())):
            return problems  # a count that is not one: said by kwargs_problem
        updates = cls.flow_updates(spec.student.kwargs)
        for k, teacher in enumerate(spec.resolved_teachers()):
            if (theirs := cls.flow_updates(teacher.kwargs)) != updates:
                problems.append(
                    f"teachers[{k}].kwargs.num_flow_updates: {theirs}, but the student refines {updates} "
                    "times; the combined teacher fuses the flows of every refinement, so every network "
                    "refines as often"
                )
        return problems

    @classmethod
    def flow_updates(cls, kwargs: dict[str, Any] | None) -> int:
        """How many times a network with these kwargs refines its flow."""
        return int((kwargs or {}).get(FLOW_UPDATES, DEFAULT_FLOW_UPDATES))

    @classmethod
    def label_shape(cls, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (2, *input_shape[-2:])

    @classmethod
    def example_labels(
        cls,
        batch: int,
        classes: int,
        input_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        spec: Any = None,
    ) -> Tensor:
        """Random flows of a few pixels."""
        labels = super().example_labels(batch, classes, input_shape, device, spec)
        return labels.float() if labels.is_meta else torch.randn(labels.shape, device=device) * 4

    @classmethod
    def predictions(cls, logits: Tensor, classes: list[str], top: int) -> list[list[dict]]:
        raise NotImplementedError("flow predictions are flow fields (docs/tasks.md#optical-flow)")

    @classmethod
    def metric_rows(cls, logits: Tensor, labels: Tensor) -> Tensor:
        """Per pair: ``[known pixels, summed EPE in 1/1000 px, pixels over 1, 3, 5 px]`` (float64, whole
        numbers: the evaluation sums them as integers)."""
        rows = flow_metric_rows(logits.double(), labels.double())
        rows[:, 1] = (rows[:, 1] * EPE_SCALE).round()
        return rows

    @classmethod
    def metric_values(cls, state: Tensor) -> dict[str, float | list[float | None]]:
        state = state.double().clone()
        state[1] = state[1] / EPE_SCALE
        return dict(flow_metric_values(state))
