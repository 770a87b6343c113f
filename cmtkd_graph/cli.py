"""The ``cmtkd-graph`` command line (also ``python -m cmtkd_graph``).

Every command that reads a spec accepts ``--set key.path=value`` overrides. Problems the user can
fix (bad spec, unknown names, missing data) print one line each and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cmtkd_graph.cli_common import (
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    add_overrides_arg,
    add_spec_args,
    add_train_args,
    user_error_lines,
)
from cmtkd_graph.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmtkd-graph",
        description="Collaborative multi-teacher knowledge distillation for low-bit torchvision models.",
    )
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE|FILE.py",
        help="import components of your own first (repeatable; a spec's plugins: and installed plugins "
        "are loaded anyway)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec (and build its graphs on the meta device)")
    add_spec_args(p)
    p.add_argument("--no-build", action="store_true", help="only validate the YAML, do not build the graphs")

    p = sub.add_parser("schema", help="print the spec's JSON Schema (for editor completion)")
    p.add_argument("--markdown", action="store_true", help="print the spec reference of docs/spec.md instead")

    p = sub.add_parser("taps", help="list the tap-able nodes of a torchvision model and the auto choice")
    p.add_argument("arch", help="torchvision model, e.g. resnet18, lraspp_mobilenet_v3_large, r3d_18")
    p.add_argument("--input-size", type=int, default=224, help="input height/width (default 224)")
    p.add_argument("--frames", type=int, default=16, help="video models: frames per clip (default 16)")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--surgery", action="append", default=[], help="surgery pass to run first (repeatable)")
    p.add_argument("--all", action="store_true", help="list every node, not only feature maps and tokens")

    p = sub.add_parser("models", help="what the tool does with torchvision builders (docs/models.md's rows)")
    p.add_argument("archs", nargs="*", metavar="ARCH", help="builders (default: every builder of every task)")
    p.add_argument("--markdown", action="store_true", help="print docs/models.md (measured links: --docs)")
    p.add_argument("--docs", default="docs", help="the docs folder the measured links are read from")
    p.add_argument("--no-int8", action="store_true", help="skip building real weights for the int8 column")

    p = sub.add_parser(
        "train", help="train in this process, as `python -m cmtkd_graph.train` (several: accelerate launch)"
    )
    add_train_args(p)

    p = sub.add_parser(
        "study", help="train the rows x seeds of a study (resumable) and write its results table"
    )
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the runs with estimated times; train none")
    p.add_argument("--rows", type=_names, default=[], metavar="A,B", help="only these rows")
    p.add_argument(
        "--redo",
        type=_names,
        default=[],
        metavar="A,B",
        help="train these rows again; stale: every run whose spec, inputs or version changed",
    )
    p.add_argument("--report", action="store_true", help="only rewrite the results from the summaries")
    p.add_argument("--keep-going", action="store_true", help="go on with the next run after a failure")
    p.add_argument(
        "--executor",
        choices=["local", "slurm", "ray"],
        help="where runs train (default: the study file's executor.name, local): processes here, Slurm "
        "jobs through submitit, or Ray actors; settings in the study file's executor section",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="local: train up to N independent runs at once on this machine, each on its share of the "
        "cores (output in RUN_DIR.log; default: executor.local.jobs, 1)",
    )
    p.add_argument(
        "--launcher",
        default="",
        metavar="CMD",
        help="start each run with CMD instead of `python -m cmtkd_graph.train`, e.g. "
        "'accelerate launch --multi_gpu --num_processes 2 -m cmtkd_graph.train'",
    )

    p = sub.add_parser("data", help="get the data the example specs and studies read")
    data = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    from cmtkd_graph.data.prepare import RECIPES

    q = data.add_parser(
        "prepare",
        help="download (or take --from) a dataset, verify its checksums, lay it out for its spec",
        description="; ".join(
            f"{r.name}: {r.summary} (default root {r.default_root})" for r in RECIPES.values()
        ),
    )
    q.add_argument("name", choices=sorted(RECIPES), metavar="NAME", help=", ".join(sorted(RECIPES)))
    q.add_argument("--root", help="the folder to make (new or empty; default: where the example specs look)")
    q.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="an archive or folder you already have, instead of downloading (verified the same way)",
    )

    p = sub.add_parser("inspect", help="dump or summarise the rewritten graphs")
    add_spec_args(p)
    p.add_argument("--out", help="output file; without it a summary table is printed")
    p.add_argument("--format", choices=["graphml", "json", "dot", "svg", "png"], help="default: from --out")
    p.add_argument("--view", choices=["full", "blocks"], default="full")
    p.add_argument("--which", choices=["system", "teachers", "student"], default="system")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="show the importance weights of a run")

    p = sub.add_parser(
        "eval", help="evaluate a run again: student, each teacher, combined teacher (accelerate launch too)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--checkpoint",
        help="latest (default when the run kept checkpoints), a checkpoint directory, or a tensor file",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "train"],
        help="test (the evaluation split: test/ or val/ for folders) or train",
    )
    p.add_argument("--out", help="JSON file to write (default RUN_DIR/eval/<checkpoint>-<split>.json)")
    add_overrides_arg(p, "override the run's spec, e.g. --set data.root=/data/cifar10")

    p = sub.add_parser("export", help="export the student: safetensors, packed integer codes, ONNX")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run, one of its checkpoints, or an export")
    p.add_argument("--out", required=True, help="directory to write the export into")
    p.add_argument(
        "--format", choices=["all", "torch", "codes", "onnx", "onnx-int8", "openvino"], default="all"
    )
    p.add_argument(
        "--images",
        "--calibration",
        dest="images",
        metavar="IMAGE_FOLDER",
        help="real images to calibrate and check the integer exports on (default: the run's eval data)",
    )
    p.add_argument("--checkpoint", help="latest or a checkpoint path (default: the run's final student)")
    p.add_argument(
        "--int8-layers",
        choices=["fastest", "every"],
        default="fastest",
        help="student-int8.onnx: integer kernels where they time faster on this machine (fastest), or for "
        "every layer that can have one (every)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out even if it holds files other than an earlier export (which is always replaced)",
    )

    p = sub.add_parser(
        "predict", help="class and probability per image (or clip; detection: boxes), from a trained student"
    )
    p.add_argument("directory", metavar="DIR", help="an export (or run) directory")
    p.add_argument(
        "images",
        metavar="IMAGE",
        nargs="+",
        help="image files (video: clip files or frame folders; flow: first and second image of each pair)",
    )
    p.add_argument("--top", type=int, default=1, help="classes to show per image (default 1)")
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "inference", "integer", "onnx", "onnx-int8", "openvino"],
        default="auto",
        help="default auto: the fastest usable backend on this machine (timed; the choice goes to stderr)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--masks", metavar="DIR", help="segmentation: write each image's class map (PNG) here")
    p.add_argument(
        "--draw",
        metavar="DIR",
        help="detection: each image with its detections drawn (PNG); flow: each pair's flow (.flo, PNG)",
    )
    p.add_argument(
        "--min-score", type=float, default=0.5, help="detection: the least score of a detection shown (0.5)"
    )
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from cmtkd_graph.plugins import load_plugins

        load_plugins(args.plugins)
        status = _COMMANDS[args.command](args)
        if args.command in ("train", "eval"):  # under `accelerate launch` they joined a process group
            from cmtkd_graph.runtime.process import end_processes

            end_processes()
        return status
    except BrokenPipeError:  # `cmtkd-graph taps resnet50 | head`
        sys.stderr.close()
        return 0
    except UserError as err:
        for line in user_error_lines(err):
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_validate(args: argparse.Namespace) -> int:
    from cmtkd_graph.inspection.summary import spec_summary
    from cmtkd_graph.spec.io import load_spec

    spec = load_spec(args.spec, args.overrides)
    system = None
    if not args.no_build:
        from cmtkd_graph.system import build_system

        system = build_system(spec, device="meta", load=False)
    print(spec_summary(spec, system, source=args.spec))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cmtkd_graph.spec import Spec
    from cmtkd_graph.spec.reference import spec_reference

    print(spec_reference() if args.markdown else json.dumps(Spec.model_json_schema(), indent=2))
    return 0


def cmd_taps(args: argparse.Namespace) -> int:
    from cmtkd_graph.inspection.summary import taps_table

    print(
        taps_table(
            args.arch,
            input_size=args.input_size,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
            surgery=args.surgery,
            everything=args.all,
            frames=args.frames,
        )
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """One row per builder, found by building it (a few seconds each; minutes for every builder)."""
    from dataclasses import replace
    from pathlib import Path

    from cmtkd_graph.inspection.support import ModelSupport, measured_links, page, support_row
    from cmtkd_graph.models import check_arch, model_names

    try:
        archs = [check_arch(a) for a in args.archs] or list(model_names())
    except ValueError as err:
        raise UserError(str(err)) from None
    rows = []
    for i, arch in enumerate(archs):
        if len(archs) > 1:
            print(f"[{i + 1}/{len(archs)}] {arch}", file=sys.stderr, flush=True)
        rows.append(support_row(arch, int8=not args.no_int8))
    measured = measured_links(Path(args.docs))
    if args.markdown:
        print(page(rows, measured), end="")
        return 0
    for row in rows:
        row = replace(row, measured=measured.get(row.arch, "-"))
        print("\n".join(f"{h:<22}{c}" for h, c in zip(ModelSupport.HEADINGS, row.cells(), strict=True)))
        print(f"{'task':<22}{row.task}\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cmtkd_graph.train import Preempted, run

    try:
        run(args.spec, args.overrides, resume=args.resume)
    except Preempted as stopped:
        print(f"preempted: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Train what is not done yet (or only estimate it), then write the results."""
    import shlex

    from cmtkd_graph.study import dry_run, load_study, persist_carried_over, plan, run_study, write_report
    from cmtkd_graph.study.plan import check_metrics

    study = load_study(args.study)
    check_metrics(study)
    if args.dry_run:
        dry_run(study, args.rows, args.redo, executor=args.executor, jobs=args.jobs)
        return 0
    if args.report:
        persist_carried_over(plan(study))
        print(f"wrote {write_report(study).absolute()}")
        return 0
    failed = run_study(
        study,
        rows=args.rows,
        redo=args.redo,
        launcher=shlex.split(args.launcher),
        keep_going=args.keep_going,
        jobs=args.jobs,
        executor=args.executor,
    )
    print(
        f"study {study.name}: {'all runs done' if not failed else f'{failed} run(s) failed'}; "
        f"results in {study.report_path.absolute()}"
    )
    return 1 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Write the graph to ``--out``, or print the summary table."""
    from cmtkd_graph.inspection.graph import read_importance, system_graph
    from cmtkd_graph.inspection.output import summary_table, write_graph
    from cmtkd_graph.registry import TASKS
    from cmtkd_graph.spec.io import load_spec
    from cmtkd_graph.system import build_system

    spec = load_spec(args.spec, args.overrides)
    TASKS.get(spec.resolved_task).require("inspect")
    system = build_system(spec, device="meta", load=False)
    importance = read_importance(args.checkpoint, system) if args.checkpoint else None
    if not args.out:
        print(summary_table(system, importance))
        return 0
    graph = system_graph(system, which=args.which, view=args.view, importance=importance)
    path = write_graph(graph, args.out, args.format)
    print(
        f"wrote {path}: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges ({args.view} view)"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from cmtkd_graph.evaluation.run import evaluate_run, recorded_accuracy, table

    record = evaluate_run(
        args.run_dir, checkpoint=args.checkpoint, split=args.split, overrides=args.overrides, out=args.out
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(table(record, recorded_accuracy(Path(args.run_dir), record)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from cmtkd_graph.deploy.export import FORMATS, export, summary

    formats = FORMATS if args.format == "all" else ("torch", args.format)
    manifest = export(
        args.run_dir,
        args.out,
        formats=formats,
        checkpoint=args.checkpoint,
        images=args.images,
        force=args.force,
        int8_layers=args.int8_layers,
    )
    print(summary(manifest, Path(os.path.abspath(Path(args.out).expanduser()))))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cmtkd_graph.deploy.predict import format_predictions, predict

    results = predict(
        args.directory,
        args.images,
        top=args.top,
        backend=args.backend,
        report=lambda line: print(line, file=sys.stderr),
        masks=args.masks,
        draw=args.draw,
        min_score=args.min_score,
    )
    print(json.dumps(results, indent=1) if args.json else format_predictions(results))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from cmtkd_graph.data.prepare import prepare

    print(prepare(args.name, args.root, args.source))
    return 0


_COMMANDS = {
    "data": cmd_data,
    "validate": cmd_validate,
    "schema": cmd_schema,
    "taps": cmd_taps,
    "models": cmd_models,
    "train": cmd_train,
    "study": cmd_study,
    "inspect": cmd_inspect,
    "eval": cmd_eval,
    "export": cmd_export,
    "predict": cmd_predict,
}

if __name__ == "__main__":
    sys.exit(main())
