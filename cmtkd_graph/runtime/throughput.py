"""How much arithmetic a training step does, and how much the device could do: for reporting a run's
throughput as a fraction of the hardware's peak.

FLOPs are counted by ``torch.utils.flop_counter`` (2 per multiply-add) from the convolutions and matrix
products of one forward and backward step of the spec's own system, built on the meta device (nothing
allocated, so any model costs the same); elementwise work (quantizers, BatchNorm) is not counted.
"""

from __future__ import annotations

import torch

from cmtkd_graph.spec import Spec
from cmtkd_graph.tasks import task_record

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by a fragment of
# torch.cuda.get_device_name(); SXM and PCIe/NVL boards differ, so the fragment names the board.
BF16_PEAK_TFLOPS = {
    "H200 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def train_flops_per_image(spec: Spec) -> float | None:
    """FLOPs of one training step (forward, objective and backward) per image; None for a system whose
    step needs values (``runs_on_meta`` False: a detector's box logic between its layers)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cmtkd_graph.system import build_system

    system = build_system(spec, device="meta", load=False)
    if not getattr(system, "runs_on_meta", True):
        return None
    batch = 2
    images = torch.zeros(batch, *spec.data.input_shape(), device="meta")
    labels = task_record(spec.student.arch).example_labels(batch, 2, spec.data.input_shape(), "meta", spec)
    with FlopCounterMode(display=False) as counter:
        _, terms = system(images, labels)
        terms["total"].backward()
    return counter.get_total_flops() / batch


def bf16_peak_tflops() -> float | None:
    """The dense bf16 peak of this process's GPU, if it is in the table (None on CPUs and unknown GPUs)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for board, peak in BF16_PEAK_TFLOPS.items() if board in name), None)
