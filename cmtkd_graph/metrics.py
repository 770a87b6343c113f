"""What a run records: ``metrics.jsonl`` lines and the importance figure.

``metrics.jsonl`` has one JSON object per line; training lines carry ``"kind": "train"`` (loss terms,
learning rates, importance weights per tap, throughput), evaluation lines ``"kind": "eval"`` (the task's
metrics, e.g. top-1 / top-5, of the student, of every teacher and of the combined teacher: the task
record computes them, ``cmtkd_graph.tasks``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run redoes those steps)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_importance(records: Iterable[dict], out: Path, teacher_labels: Sequence[str]) -> Path | None:
    """The paper's Figure 2: importance weight of each teacher at each tap over training.

    Reads the ``importance/<tap>`` entries of the training lines; returns None if there are none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("kind") == "train"]
    taps = sorted(
        {k.split("/", 1)[1] for r in rows for k in r if k.startswith("importance/")}, key=_tap_order(rows)
    )
    if not taps:
        return None
    fig, axes = plt.subplots(1, len(taps), figsize=(3.2 * len(taps), 3.0), sharey=True, squeeze=False)
    for ax, tap in zip(axes[0], taps, strict=True):
        points = [(r["epoch_float"], r[f"importance/{tap}"]) for r in rows if f"importance/{tap}" in r]
        x = [p[0] for p in points]
        weights = torch.tensor([p[1] for p in points])
        for k in range(weights.shape[1]):
            label = teacher_labels[k] if k < len(teacher_labels) else f"teacher{k}"
            ax.plot(x, weights[:, k].tolist(), label=label)
        ax.set_title(tap, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("importance weight")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _tap_order(rows: list[dict]):
    first = rows[0] if rows else {}
    order = [k.split("/", 1)[1] for k in first if k.startswith("importance/")]
    return lambda tap: (order.index(tap) if tap in order else len(order), tap)
