"""Which quantized layers of ``student-int8.onnx`` run on onnxruntime's integer kernels: timed on the
machine that exports, as ``mixed_precision: auto`` times the training step.

An integer kernel is not always the faster one. Between float operations (MobileNetV3's Hardswish and
squeeze-excitation gates, EfficientNet's SiLU) every integer layer brings its QuantizeLinear and
DequantizeLinear, and onnxruntime's int8 kernels differ by CPU (VNNI or not) and by layer shape: the
MobileNetV3 and EfficientNet students ran at x0.4-0.6 of their float networks with every layer integer
(docs/deployment.md). So the export times the model with every layer that can be integer, then keeps one
kind of layer float at a time (layers on 1x1 maps such as squeeze-excitation gates, depthwise,
pointwise and other convolutions, linear layers), keeping each change that is faster, and last the
whole student in float arithmetic; it writes the fastest. Each variant is timed at batch 1 and at the
check images' batch, best of several runs; a change counts only when it is more than ``MARGIN``
faster, so timing noise does not flip the choice. The manifest records every variant's times.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from torch import fx, nn

MARGIN = 0.05
"""A variant replaces the best so far only when its time (the mean over the batch sizes of its time
relative to the all-integer model's) is more than this much smaller."""
KINDS = ("on 1x1 maps", "depthwise", "pointwise", "convolution", "linear")
EVERY = "every layer"  # the last variant: the student in float arithmetic


def layer_kinds(form: fx.GraphModule, integer: dict[str, str], shapes: dict) -> dict[str, list[str]]:
    """The layers an all-integer plan runs integer (``integer``: layer -> "" or why it stays float), by
    kind (those of ``KINDS`` that occur); ``shapes``: every value's shape on one image."""
    inputs = {n.target: shapes.get(n.args[0]) for n in form.graph.nodes if n.op == "call_module" and n.args}
    kinds: dict[str, list[str]] = {}
    for name, why in integer.items():
        if why:  # float already, for its own reason
            continue
        layer = form.get_submodule(name)
        spatial = (inputs.get(name) or (1,))[2:]
        if isinstance(layer, nn.Linear):
            kind = "linear"
        elif spatial and all(size == 1 for size in spatial):
            kind = "on 1x1 maps"
        elif layer.groups > 1 and layer.groups == layer.in_channels:
            kind = "depthwise"
        elif all(k == 1 for k in layer.kernel_size):
            kind = "pointwise"
        else:
            kind = "convolution"
        kinds.setdefault(kind, []).append(name)
    return {kind: kinds[kind] for kind in KINDS if kind in kinds}


def best_seconds(runner, batches: list[np.ndarray], budget: float = 0.25) -> list[float]:
    """Best time of one run per batch of an onnxruntime session (after a warm-up run): at least 3 runs,
    more within ``budget`` s."""
    times = []
    for batch in batches:
        feed = {"images": batch}
        runner.run(None, feed)
        best, spent, runs = float("inf"), 0.0, 0
        while runs < 3 or (spent < budget and runs < 100):
            start = time.perf_counter()
            runner.run(None, feed)
            took = time.perf_counter() - start
            best, spent, runs = min(best, took), spent + took, runs + 1
        times.append(best)
    return times


def fastest_float_layers(
    build: Callable[[frozenset[str]], object],
    kinds: dict[str, list[str]],
    images: np.ndarray,
) -> tuple[frozenset[str], dict]:
    """The layers to keep float (see the module docstring) and the manifest's record of the timing.

    ``build(keep_float)``: an onnxruntime session of the model that keeps those layers float; ``kinds``:
    :func:`layer_kinds` of the all-integer model; ``images``: a batch of the student's input shape (the
    times do not depend on their values)."""
    if not kinds:  # nothing could be kept float: no choice to time
        return frozenset(), {"chosen_by": "no layer runs integer that could be kept float", "float": []}
    batches = [images[:1]] if len(images) == 1 else [images[:1], images]
    variants: list[dict] = []

    def timed(float_kinds: list[str]) -> tuple[frozenset[str], list[float]]:
        every = float_kinds == [EVERY]
        keep = frozenset(n for k, names in kinds.items() if every or k in float_kinds for n in names)
        seconds = best_seconds(build(keep), batches)
        variants.append(
            {"float": float_kinds, "float_layers": len(keep), "ms": [round(t * 1e3, 3) for t in seconds]}
        )
        return keep, seconds

    best_keep, reference = timed([])
    best_score, chosen = 1.0, []

    def try_variant(float_kinds: list[str]) -> None:
        nonlocal best_keep, best_score, chosen
        keep, seconds = timed(float_kinds)
        score = sum(t / r for t, r in zip(seconds, reference, strict=True)) / len(seconds)
        if score < best_score * (1 - MARGIN):
            best_keep, best_score, chosen = keep, score, float_kinds

    for kind in kinds:
        try_variant([*chosen, kind])
    if set(chosen) != set(kinds):
        try_variant([EVERY])
    return best_keep, {
        "chosen_by": "timing on this machine",
        "batch_sizes": [len(b) for b in batches],
        "variants": variants,
        "float": chosen,
        "relative_time": round(best_score, 3),
    }


__all__ = ["EVERY", "KINDS", "MARGIN", "best_seconds", "fastest_float_layers", "layer_kinds"]
