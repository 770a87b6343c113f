"""A study's results from its run summaries: ``results.json``, a Markdown table, the comparisons the
study file names (with their statistics, ``comparison.py``) and a bar chart.

The Markdown goes between two markers in the report file, so text written around them by hand (the
discussion of the results) survives every rewrite. Means are over the seeds finished so far, with the
sample standard deviation where there are two or more.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from cmtkd_graph.spec import FULL_PRECISION, ModelSpec
from cmtkd_graph.study.comparison import Comparison, compare, holm, smallest_permutation_p
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
        spec = runs[0].unresolved_spec()
        accuracy: dict[str, list[float]] = {}
        by_seed: dict[str, dict[int, float]] = {}
        machine_by_seed = {s["seed"]: s["machine"] for s in summaries}
        for s in summaries:
            for name, value in s["accuracy"].items():
                accuracy.setdefault(name, []).append(value)
                by_seed.setdefault(name, {})[s["seed"]] = value
        rows.append(
            {
                "name": row.name,
                "label": row.title,
                "teachers": teachers_text(spec.resolved_teachers()),
                "seeds": row.seeds,
                "finished": [s["seed"] for s in summaries],
                "by_seed": by_seed,
                "machine_by_seed": machine_by_seed,
                "accuracy": {name: _stats(values) for name, values in sorted(accuracy.items())},
                "wall_s": _stats([s["wall_s"] for s in summaries if s["wall_s"] is not None]),
                "epochs": _stats([s["budget"]["epochs_trained"] for s in summaries if s.get("budget")]),
                "requested_epochs": spec.train.epochs,
                "images_per_s": _stats([s["images_per_s"] for s in summaries if s["images_per_s"]]),
                "tflops": _stats(
                    [s["images_per_s"] * s["train_gflop_per_image"] / 1e3 for s in summaries if _has_flops(s)]
                ),
                "peak_bf16_tflops": next((s["peak_bf16_tflops"] for s in summaries if _has_flops(s)), None),
                "command": runs[0].shown_command(resolve=False),
                "importance_plots": [
                    str(r.summary_path.with_name(s["importance_plot"]))
                    for r, s in done
                    if s["importance_plot"]
                ],
                "paper": row.paper,
                "machines": sorted({s["machine"] for s in summaries}),
                "commits": {str(s["seed"]): _commit_label(s) for s in summaries},
                "stale": {str(r.seed): r.changes() for r, _ in done if r.status() == "stale"},
            }
        )
    return rows


def _commit_label(summary: dict) -> str:
    """A run's commit as the page shows it: short hash, ``+dirty`` for uncommitted changes, ``†`` for the
    commit that added a summary written before runs recorded theirs."""
    code = summary.get("code") or {}
    if not code.get("commit"):
        return "unknown"
    carried = "†" if summary.get("carried_over") else ""
    return code["commit"][:7] + ("+dirty" if code.get("dirty") else "") + carried


def teachers_text(teachers: list[ModelSpec]) -> str:
    """What the teacher columns of a row hold: teacher k's precision, and whether it trains with the
    student or is a frozen, separately trained model."""
    if not teachers:
        return "–"

    def one(k: int, t: ModelSpec) -> str:
        bits = "FP" if t.weight_bits == t.act_bits == FULL_PRECISION else t.bits_label
        return f"{k}: {bits} {'trained' if t.trainable else 'frozen'}"

    return ", ".join(one(k, t) for k, t in enumerate(teachers))


def comparisons(study: StudySpec, rows: list[dict]) -> list[Comparison]:
    """Every comparison the study names, on each metric both rows have."""
    by_name = {r["name"]: r for r in rows}
    out = []
    for a, b, metrics in study.compared_pairs():
        for metric in metrics:
            seeds_a, seeds_b = by_name[a]["by_seed"].get(metric, {}), by_name[b]["by_seed"].get(metric, {})
            machines_a, machines_b = by_name[a]["machine_by_seed"], by_name[b]["machine_by_seed"]
            one_machine = [s for s in seeds_a if s in seeds_b and machines_a.get(s) == machines_b.get(s)]
            if seeds_a and seeds_b:
                out.append(compare(a, b, metric, seeds_a, seeds_b, pairable=one_machine))
    return out


def references(study: StudySpec, rows: list[dict]) -> list[dict]:
    """The study's reference values: label, row, metric and the row's mean (None until it has run)."""
    by_name = {r["name"]: r for r in rows}
    return [
        {"label": r.label, "row": r.row, "metric": r.metric, "value": _mean(by_name[r.row], r.metric)}
        for r in study.references
    ]


def _mean(row: dict, metric: str) -> float | None:
    return row["accuracy"].get(metric, {}).get("mean")


def _has_flops(summary: dict) -> bool:
    """A summary that says the step's FLOPs and the GPU's peak (the runs since they are recorded)."""
    return bool(
        summary.get("train_gflop_per_image") and summary.get("peak_bf16_tflops") and summary["images_per_s"]
    )


def _stats(values: list[float]) -> dict:
    if not values:
        return {"values": [], "mean": None, "std": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"values": values, "mean": statistics.fmean(values), "std": std}


def write_report(study: StudySpec) -> Path:
    """Write results.json, results.png and the report's table; returns the report's path."""
    rows = row_results(study)
    tests = comparisons(study, rows)
    lines = references(study, rows)
    out = study.output_path
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "study": study.name,
        "base": study.base,
        "set": study.set,
        "rows": rows,
        "comparisons": [c.to_json() for c in tests],
        "references": lines,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    chart = write_chart(study, rows, lines, out / "results.png")
    report = study.report_path
    report.parent.mkdir(parents=True, exist_ok=True)
    block = markdown(study, rows, tests, lines, chart, report.parent)
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
    """``student top-1``, ``combined mIoU``: the network and its task's heading of the metric."""
    from cmtkd_graph.study.spec import metric_keys

    k, who = metric.split("/")
    return f"{who} {metric_keys()[k].removesuffix(' %')}"


def _in_percent(metric: str) -> bool:
    """The metric's heading says it is a percentage (accuracies, mIoU; not an end-point error)."""
    from cmtkd_graph.study.spec import metric_keys

    return metric_keys()[metric.split("/")[0]].endswith("%")


def _is_accuracy(metric: str) -> bool:
    """A classifier's top-k accuracy (``acc1``, ``acc5``)."""
    return metric.split("/")[0] in ("acc1", "acc5")


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")


def markdown(
    study: StudySpec,
    rows: list[dict],
    tests: list[Comparison],
    lines_: list[dict],
    chart: Path | None,
    where: Path,
) -> str:
    """The block between the markers: notes, table, reference values, comparisons, chart, commands,
    machines."""
    columns = metric_columns(study, rows)
    machines = sorted({m for r in rows for m in r["machines"]})
    letters = {m: chr(ord("A") + i) for i, m in enumerate(machines)}  # a column only when rows differ
    lines = [START, ""]
    if study.notes.strip():
        lines += [study.notes.strip(), ""]
    on_gpu = any(r["peak_bf16_tflops"] for r in rows)  # throughput against the hardware's peak
    fitted = any(r["epochs"]["mean"] is not None for r in rows)  # runs fitted to a time budget
    header = ["Row", "Seeds", "Teachers", *[_title(c) for c in columns]]
    header += ["Epochs trained"] if fitted else []
    header += ["Time per run", "Images/s"]
    header += ["TFLOP/s", "% of bf16 peak"] if on_gpu else []
    header += ["Machine", "Paper"] if len(machines) > 1 else ["Paper"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        seeds = f"{len(r['finished'])}/{r['seeds']}" + (f" ({len(r['stale'])} stale)" if r["stale"] else "")
        cells = [_cell(r["accuracy"].get(c, _stats([]))) for c in columns]
        wall = r["wall_s"]["mean"]
        speed = r["images_per_s"]["mean"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    seeds,
                    r["teachers"],
                    *cells,
                    *([_epochs(r)] if fitted else []),
                    f"{wall / 60:.1f} min" if wall is not None else "–",
                    f"{speed:.0f}" if speed is not None else "–",
                    *(_throughput(r) if on_gpu else []),
                    *([", ".join(letters[m] for m in r["machines"]) or "–"] if len(machines) > 1 else []),
                    r["paper"] or "",
                ]
            )
            + " |"
        )
    if all(_is_accuracy(m) for m in study.metrics):
        measured = "Accuracies in %"
    elif all(_in_percent(m) for m in study.metrics):
        measured = "Metrics in % (as their headings say: accuracies, mIoU, COCO's average precision)"
    else:
        measured = "Metrics (in the units of their headings; an end-point error is in px, lower is better)"
    lines += [
        "",
        f"{measured} on the evaluation split after the last epoch: mean ± sample standard "
        "deviation over the finished seeds; a row with one seed has no spread. Teachers: teacher k's "
        "precision, trained together with the student or frozen (trained separately); the teacher "
        "columns are these networks, so they differ between rows.",
    ]
    stale = [f"{r['label']}, seed {seed}: {'; '.join(why)}" for r in rows for seed, why in r["stale"].items()]
    if stale:
        lines += ["", "Stale runs (changed since they were trained; `--redo stale` trains them again): "]
        lines += [f"- {line}" for line in stale]
    for ref in lines_:
        value = "not trained yet" if ref["value"] is None else f"{ref['value']:.2f}"
        row_label = study.row(ref["row"]).title
        lines += ["", f"Reference: {ref['label']}: {value} ({_title(ref['metric'])} of {row_label})."]
    if tests:
        lines += ["", *comparison_table(study, tests)]
    if chart is not None:
        shown = " and ".join(_title(m) for m in study.chart)
        lines += ["", f"![{shown} per row]({_relative(chart, where)})"]
    lines += [
        "",
        "<details><summary>The command of each row (seed 0; the other seeds differ in <code>train.seed</code>"
        " and the run directory) and the commit each seed was trained at</summary>",
        "",
    ]
    for r in rows:
        plots = ", ".join(
            f"[seed {Path(p).stem.split('-')[0].removeprefix('seed')}]({_relative(Path(p), where)})"
            for p in r["importance_plots"]
        )
        commits = _commits_text(r["commits"])
        stale = ", ".join(sorted(r["stale"], key=int))
        lines.append(
            f"- {r['label']}: `{r['command']}`"
            + (f" — {commits}" if commits else "")
            + (f" — importance: {plots}" if plots else "")
            + (
                f" — seed {stale} (stale) was trained before the changes listed under the table"
                if stale
                else ""
            )
        )
    if any(c.endswith("†") for r in rows for c in r["commits"].values()):
        lines += [
            "",
            "† the commit that added the run's summary: the run was trained before runs recorded their "
            "commit, and its spec file read the same then.",
        ]
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


def _commits_text(commits: dict[str, str]) -> str:
    """``commit abc1234 (seeds 0, 1), def5678 (seed 2)``; one commit for every seed needs no seeds."""
    if not commits:
        return ""
    by_commit: dict[str, list[str]] = {}
    for seed, label in sorted(commits.items(), key=lambda item: int(item[0])):
        by_commit.setdefault(label, []).append(seed)
    if len(by_commit) == 1:
        return f"commit {next(iter(by_commit))}"
    parts = [f"{label} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for label, s in by_commit.items()]
    return "commits " + ", ".join(parts)


def _epochs(row: dict) -> str:
    """Epochs a budget-fitted row trained, of the epochs its spec asks for."""
    trained = row["epochs"]["mean"]
    return "–" if trained is None else f"{trained:g} of {row['requested_epochs']}"


def _throughput(row: dict) -> list[str]:
    tflops = row["tflops"]["mean"]
    if tflops is None:
        return ["–", "–"]
    return [f"{tflops:.1f}", f"{100 * tflops / row['peak_bf16_tflops']:.1f} %"]


def comparison_table(study: StudySpec, tests: list[Comparison]) -> list[str]:
    """One line per comparison and metric: the mean difference, its 95 % CI and Welch's p, and the
    paired test where the rows share seeds; a one-seed row gets no test."""
    tested = [c for c in tests if c.welch is not None]
    adjusted = dict(zip(map(id, tested), holm([c.welch.p for c in tested]), strict=True))
    lines = [
        "Comparisons (difference of the means, first row minus second; Welch's t-test; Holm's adjustment "
        f"of its p for the {len(tested)} tests of this table; and the paired t-test over the seeds both "
        "rows ran on one machine, which share initialisation, data order and kernels: the same seed on "
        "another CPU is another sample):",
        "",
        "| Comparison | Metric | Seeds | Difference | 95 % CI (Welch) | Welch p | Holm p | Paired p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in tests:
        seeds = f"{len(c.values_a)} vs {len(c.values_b)}"
        if c.welch is None:
            ci, welch, corrected = "one seed: no test", "–", "–"
        else:
            ci, welch = f"[{c.welch.low:+.2f}, {c.welch.high:+.2f}]", _p(c.welch.p)
            corrected = _p(adjusted[id(c)])
        paired = f"{_p(c.paired.p)} ({c.pairs} pairs)" if c.paired is not None else "–"
        title = f"{study.row(c.a).title} vs {study.row(c.b).title}"
        lines.append(
            f"| {title} | {_title(c.metric)} | {seeds} | {c.difference:+.2f} | {ci} | {welch} | {corrected} "
            f"| {paired} |"
        )
    sizes = sorted({(len(c.values_a), len(c.values_b)) for c in tested})
    if sizes:
        floors = ", ".join(f"{a} vs {b}: {smallest_permutation_p(a, b):.2f}" for a, b in sizes)
        lines += [
            "",
            "With so few seeds the t-tests lean on their normal model: an exact permutation test, which "
            f"needs none, cannot give a p below {floors}.",
        ]
    return lines


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _relative(path: Path, where: Path) -> str:
    return Path(os.path.relpath(path.resolve(), where.resolve())).as_posix()


def write_chart(study: StudySpec, rows: list[dict], lines: list[dict], out: Path) -> Path | None:
    """Horizontal bars of the chart's metrics side by side per row (mean, error bar = std, each seed a
    dot) on an axis from 0, and the reference values as dashed lines; None if no row has finished yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if any(_mean(r, m) is not None for m in study.chart)]
    if not done:
        out.unlink(missing_ok=True)
        return None
    k = len(study.chart)
    height = 0.8 / k
    fig_height = (0.3 + 0.22 * k) * len(done) + 1.6
    fig, ax = plt.subplots(figsize=(8, fig_height))
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for j, metric in enumerate(study.chart):
        ys, means, errors = [], [], []
        for i, r in enumerate(done):
            if _mean(r, metric) is None:
                continue
            y = len(done) - 1 - i + 0.4 - height * (j + 0.5)
            stats = r["accuracy"][metric]
            ys.append(y)
            means.append(stats["mean"])
            errors.append(stats["std"] or 0.0)
            ax.plot(stats["values"], [y] * len(stats["values"]), "k.", markersize=3)
        color = colors[j % len(colors)]
        ax.barh(
            ys, means, height=height, xerr=errors, color=color, alpha=0.85, capsize=2, label=_title(metric)
        )
    for ref in lines:
        if ref["value"] is not None:
            label = f"{ref['label']} ({ref['value']:.2f})"
            ax.axvline(ref["value"], color="k", linestyle="--", linewidth=1, label=label)
    ax.set_yticks(
        range(len(done))[::-1], [f"{r['label']} (n={len(r['finished'])})" for r in done], fontsize=8
    )
    ax.set_ylim(-0.6, len(done) - 0.4)
    from cmtkd_graph.study.spec import metric_keys

    headings = dict.fromkeys(metric_keys()[m.split("/")[0]] for m in study.chart)
    if all(_is_accuracy(m) for m in study.chart):
        ax.set_xlim(0, 100)
        kinds = sorted({f"top-{m.split('/')[0].removeprefix('acc')}" for m in study.chart})
        ax.set_xlabel(f"{' / '.join(kinds)} accuracy (%), axis from 0")
    elif all(_in_percent(m) for m in study.chart):  # mIoU, mAP: % from 0 to 100
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{' / '.join(headings)}, axis from 0")
    else:  # e.g. an end-point error in px
        ax.set_xlim(left=0)
        ax.set_xlabel(f"{' / '.join(headings)}, axis from 0")
    ax.set_title(study.name, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    # below the axis label, at a fixed distance whatever the number of rows
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55 / fig_height), fontsize=7, ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
