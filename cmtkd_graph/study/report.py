"""A study's results from its run summaries: ``results.json``, a Markdown table and a bar chart.

The Markdown goes between two markers in the report file, so text written around them by hand (the
discussion of the results) survives every rewrite. Means are over the seeds finished so far, with the
sample standard deviation where there are two or more.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from cmtkd_graph.study.plan import plan
from cmtkd_graph.study.spec import StudySpec

START = "<!-- study:start (written by `cmtkd-graph study`; edit outside these markers) -->"
END = "<!-- study:end -->"


def row_results(study: StudySpec) -> list[dict]:
    """Per row: every accuracy over its finished seeds (values, mean, std), wall time, images/s."""
    rows = []
    for row in study.rows:
        runs = plan(study, [row.name])
        done = [(r, s) for r in runs if (s := r.summary()) is not None]
        summaries = [s for _, s in done]
        accuracy: dict[str, list[float]] = {}
        for s in summaries:
            for name, value in s["accuracy"].items():
                accuracy.setdefault(name, []).append(value)
        rows.append(
            {
                "name": row.name,
                "label": row.title,
                "seeds": row.seeds,
                "finished": [s["seed"] for s in summaries],
                "accuracy": {name: _stats(values) for name, values in sorted(accuracy.items())},
                "wall_s": _stats([s["wall_s"] for s in summaries if s["wall_s"] is not None]),
                "images_per_s": _stats([s["images_per_s"] for s in summaries if s["images_per_s"]]),
                "command": runs[0].shown_command(resolve=False),
                "importance_plots": [
                    str(r.summary_path.with_name(s["importance_plot"]))
                    for r, s in done
                    if s["importance_plot"]
                ],
                "paper": row.paper,
                "machines": sorted({s["machine"] for s in summaries}),
            }
        )
    return rows


def _stats(values: list[float]) -> dict:
    if not values:
        return {"values": [], "mean": None, "std": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"values": values, "mean": statistics.fmean(values), "std": std}


def write_report(study: StudySpec) -> Path:
    """Write results.json, results.png and the report's table; returns the report's path."""
    rows = row_results(study)
    out = study.output_path
    out.mkdir(parents=True, exist_ok=True)
    result = {"study": study.name, "base": study.base, "set": study.set, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    chart = write_chart(study, rows, out / "results.png")
    report = study.report_path
    report.parent.mkdir(parents=True, exist_ok=True)
    block = markdown(study, rows, chart, report.parent)
    text = report.read_text() if report.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (text + "\n" if text else "") + block + "\n"
    report.write_text(text)
    return report


def metric_columns(study: StudySpec, rows: list[dict]) -> list[str]:
    """The study's metrics with ``accN/teachers`` expanded to the teachers any row has."""
    columns = []
    for metric in study.metrics:
        k, who = metric.split("/")
        if who == "teachers":
            found = sorted({n for r in rows for n in r["accuracy"] if n.startswith(f"{k}/teacher")})
            columns.extend(found)
        else:
            columns.append(metric)
    return columns


def _title(metric: str) -> str:
    k, who = metric.split("/")
    return f"{who} top-{k.removeprefix('acc')}"


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")


def markdown(study: StudySpec, rows: list[dict], chart: Path | None, where: Path) -> str:
    """The block between the markers: notes, table, chart, commands, machines."""
    columns = metric_columns(study, rows)
    machines = sorted({m for r in rows for m in r["machines"]})
    letters = {m: chr(ord("A") + i) for i, m in enumerate(machines)}  # a column only when rows differ
    lines = [START, ""]
    if study.notes.strip():
        lines += [study.notes.strip(), ""]
    header = ["Row", "Seeds", *[_title(c) for c in columns], "Time per run", "Images/s"]
    header += ["Machine", "Paper"] if len(machines) > 1 else ["Paper"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        seeds = f"{len(r['finished'])}/{r['seeds']}"
        cells = [_cell(r["accuracy"].get(c, _stats([]))) for c in columns]
        wall = r["wall_s"]["mean"]
        speed = r["images_per_s"]["mean"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    seeds,
                    *cells,
                    f"{wall / 60:.1f} min" if wall is not None else "–",
                    f"{speed:.0f}" if speed is not None else "–",
                    *([", ".join(letters[m] for m in r["machines"]) or "–"] if len(machines) > 1 else []),
                    r["paper"] or "",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Accuracies in % on the evaluation split after the last epoch: mean ± sample standard "
        "deviation over the finished seeds.",
    ]
    if chart is not None:
        lines += ["", f"![{_title(study.metrics[0])} per row]({_relative(chart, where)})"]
    lines += [
        "",
        "<details><summary>The command of each row (seed 0; the other seeds differ in <code>train.seed</code>"
        " and the run directory)</summary>",
        "",
    ]
    for r in rows:
        plots = ", ".join(
            f"[seed {Path(p).stem.split('-')[0].removeprefix('seed')}]({_relative(Path(p), where)})"
            for p in r["importance_plots"]
        )
        lines.append(f"- {r['label']}: `{r['command']}`" + (f" — importance: {plots}" if plots else ""))
    lines += ["", "</details>"]
    if len(machines) > 1:
        lines += [
            "",
            "Machines (time and images/s are comparable only between rows on one machine): "
            + "; ".join(f"{letters[m]}: {m}" for m in machines),
        ]
    elif machines:
        lines += ["", "Machine: " + machines[0]]
    lines += ["", END]
    return "\n".join(lines)


def _relative(path: Path, where: Path) -> str:
    return Path(os.path.relpath(path.resolve(), where.resolve())).as_posix()


def write_chart(study: StudySpec, rows: list[dict], out: Path) -> Path | None:
    """Horizontal bars of the first metric (mean, error bar = std), each seed a dot; None if no row
    has finished yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = study.metrics[0]
    if metric.endswith("/teachers"):
        metric = metric.replace("/teachers", "/combined")
    done = [r for r in rows if r["accuracy"].get(metric, {}).get("mean") is not None]
    if not done:
        out.unlink(missing_ok=True)
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(done) + 1.2))
    y = list(range(len(done)))[::-1]
    means = [r["accuracy"][metric]["mean"] for r in done]
    errors = [r["accuracy"][metric]["std"] or 0.0 for r in done]
    ax.barh(y, means, xerr=errors, color="#4c72b0", alpha=0.8, capsize=3)
    for yi, r in zip(y, done, strict=True):
        values = r["accuracy"][metric]["values"]
        ax.plot(values, [yi] * len(values), "k.", markersize=4)
    ax.set_yticks(y, [f"{r['label']} (n={len(r['finished'])})" for r in done], fontsize=8)
    low = min(min(r["accuracy"][metric]["values"]) for r in done)
    ax.set_xlim(max(0.0, low - 10), min(100.0, max(m + e for m, e in zip(means, errors, strict=True)) + 3))
    ax.set_xlabel(f"{_title(metric)} (%)")
    ax.set_title(study.name, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
