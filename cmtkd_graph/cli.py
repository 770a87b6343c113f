"""The ``cmtkd-graph`` command line (also ``python -m cmtkd_graph``).

Every command that reads a spec accepts ``--set key.path=value`` overrides. Problems the user can
fix (bad spec, unknown names, missing data) print one line each and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cmtkd_graph.errors import UserError

EXIT_USER_ERROR = 2


def _add_spec_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    help = "spec YAML file, or the name of a packaged example (quickstart, resnet18...)"
    if optional:
        p.add_argument("spec", nargs="?", help=f"{help}; optional with --resume")
    else:
        p.add_argument("spec", help=help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set train.epochs=1 --set teachers[0].weight_bits=4",
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The arguments of training, the same for ``cmtkd-graph train`` and ``python -m cmtkd_graph.train``."""
    _add_spec_args(p, optional=True)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmtkd-graph",
        description="Collaborative multi-teacher knowledge distillation for low-bit torchvision models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec (and build its graphs on the meta device)")
    _add_spec_args(p)
    p.add_argument("--no-build", action="store_true", help="only validate the YAML, do not build the graphs")

    p = sub.add_parser("schema", help="print the spec's JSON Schema (for editor completion)")
    p.add_argument(
        "--markdown", action="store_true", help="print the spec reference table of the README instead"
    )

    p = sub.add_parser("taps", help="list the tap-able nodes of a torchvision model and the auto choice")
    p.add_argument("arch", help="torchvision classification model, e.g. resnet18")
    p.add_argument("--input-size", type=int, default=224, help="input height/width (default 224)")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--surgery", action="append", default=[], help="surgery pass to run first (repeatable)")
    p.add_argument("--all", action="store_true", help="list every node, not only 4-D/3-D feature maps")

    p = sub.add_parser(
        "train", help="train in this process, as `python -m cmtkd_graph.train` (several: accelerate launch)"
    )
    add_train_args(p)

    p = sub.add_parser("inspect", help="dump or summarise the rewritten graphs")
    _add_spec_args(p)
    p.add_argument("--out", help="output file; without it a summary table is printed")
    p.add_argument("--format", choices=["graphml", "json", "dot", "svg", "png"], help="default: from --out")
    p.add_argument("--view", choices=["full", "blocks"], default="full")
    p.add_argument("--which", choices=["system", "teachers", "student"], default="system")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="show the importance weights of a run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # `cmtkd-graph taps resnet50 | head`
        sys.stderr.close()
        return 0
    except UserError as err:
        for line in _problems(err):
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _problems(err: UserError) -> list[str]:
    # A UserError raised in a DataLoader worker is re-raised with the worker's traceback as its text;
    # the user needs only its last line.
    lines = []
    for problem in err.problems:
        if "Original Traceback" in problem:
            tail = [line for line in problem.strip().splitlines() if line.strip()][-1]
            problem = tail.split(": ", 1)[1] if ": " in tail else tail
        lines.append(problem)
    return lines


def cmd_validate(args: argparse.Namespace) -> int:
    from cmtkd_graph.spec_io import load_spec
    from cmtkd_graph.summary import spec_summary

    spec = load_spec(args.spec, args.overrides)
    system = None
    if not args.no_build:
        from cmtkd_graph.system import build_system

        system = build_system(spec, device="meta", load=False)
    print(spec_summary(spec, system, source=args.spec))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cmtkd_graph.spec import Spec
    from cmtkd_graph.summary import spec_reference

    print(spec_reference() if args.markdown else json.dumps(Spec.model_json_schema(), indent=2))
    return 0


def cmd_taps(args: argparse.Namespace) -> int:
    from cmtkd_graph.summary import taps_table

    print(
        taps_table(
            args.arch,
            input_size=args.input_size,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
            surgery=args.surgery,
            everything=args.all,
        )
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cmtkd_graph.train import run

    run(args.spec, args.overrides, resume=args.resume)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from cmtkd_graph.inspection import inspect_command

    return inspect_command(args)


_COMMANDS = {
    "validate": cmd_validate,
    "schema": cmd_schema,
    "taps": cmd_taps,
    "train": cmd_train,
    "inspect": cmd_inspect,
}

if __name__ == "__main__":
    sys.exit(main())
