"""Top-1/top-5 of the student, each teacher and the combined teacher: one pass over a loader.

Shared by training (``Trainer.evaluate``) and ``cmtkd-graph eval`` (``evaluation.run``). Under
``accelerate launch`` each process sees its shard and the counts are gathered with
``gather_for_metrics``, which drops the samples the last batch repeats to even out the shards: every
image is counted once.
"""

from __future__ import annotations

import torch

from cmtkd_graph.metrics import topk_correct


@torch.no_grad()
def evaluate(model, loader, accelerator, *, channels_last: bool = False) -> dict:
    """``{"samples": N, "acc1/student": %, "acc5/student": %, ..., "importance/<stat>": [...]}``.

    Leaves ``model`` in eval mode. ``importance/<stat>`` are the method's statistics (e.g. AMTML-KD's
    instance weights) averaged over the images.
    """
    model.eval()
    correct: dict[str, dict[int, int]] = {}
    stats: dict[str, torch.Tensor] = {}
    seen, stats_seen = 0, 0
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = model(images)
        named = {"student": out.student_logits}
        if out.teacher_logits is not None:
            named["combined"] = out.teacher_logits
        named.update({f"teacher{k}": z for k, z in enumerate(out.each_teacher_logits)})
        for name, value in out.stats.items():  # batch means, weighted by the batch size
            stats[name] = stats.get(name, 0.0) + value.float() * labels.shape[0]
        stats_seen += labels.shape[0] if out.stats else 0
        gathered = accelerator.gather_for_metrics((labels, *[z.float() for z in named.values()]))
        labels_all, logits_all = gathered[0], gathered[1:]
        seen += labels_all.shape[0]
        for name, z in zip(named, logits_all, strict=True):
            for k, c in topk_correct(z, labels_all).items():
                correct.setdefault(name, {}).setdefault(k, 0)
                correct[name][k] += c
    record: dict = {"samples": seen}
    for name, counts in correct.items():
        for k, c in counts.items():
            record[f"acc{k}/{name}"] = 100.0 * c / max(seen, 1)
    for name, total in sorted(stats.items()):
        pair = torch.cat([total.flatten(), total.new_tensor([stats_seen])])  # one reduce: sum and count
        pair = accelerator.reduce(pair, reduction="sum") if accelerator.num_processes > 1 else pair
        record[f"importance/{name}"] = (pair[:-1] / pair[-1]).tolist()
    return record


def eval_line(record: dict) -> str:
    """``eval (top-1/top-5 %, N images): student a/b, combined c/d, teacher0 ...``."""
    parts = []
    teachers = sorted(k.split("/")[1] for k in record if k.startswith("acc1/teacher"))
    for name in ["student", "combined", *teachers]:
        if f"acc1/{name}" in record:
            parts.append(f"{name} {record[f'acc1/{name}']:.2f}/{record.get(f'acc5/{name}', 0):.2f}")
    return f"eval (top-1/top-5 %, {record['samples']} images): " + ", ".join(parts)
