"""What the ``cmtkd-graph`` command and ``python -m cmtkd_graph.train`` share: spec and training
arguments, the exit status of user errors and how those errors are printed."""

from __future__ import annotations

import argparse

from cmtkd_graph.errors import UserError, shorten

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
"""A run stopped by SIGTERM or SIGUSR1 after writing its checkpoint (EX_TEMPFAIL: try again later):
``--resume auto`` continues it."""


def add_spec_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    help = "spec YAML file, or the name of a packaged example (quickstart, resnet18...)"
    if optional:
        p.add_argument("spec", nargs="?", help=f"{help}; optional with --resume")
    else:
        p.add_argument("spec", help=help)
    add_overrides_arg(p, "override a spec value, e.g. --set train.epochs=1 --set teachers[0].weight_bits=4")


def add_overrides_arg(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The arguments of training, the same for ``cmtkd-graph train`` and ``python -m cmtkd_graph.train``."""
    add_spec_args(p, optional=True)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue the run in RUN_DIR from its last checkpoint; auto: the spec's run directory, "
        "continued if it has a checkpoint, started fresh otherwise (for jobs a scheduler may requeue)",
    )


MAX_ERROR_LINES = 50
MAX_LINE_CHARACTERS = 1000


def user_error_lines(err: UserError) -> list[str]:
    """The lines to print for a user error (one per problem; at most MAX_ERROR_LINES, each cut to
    MAX_LINE_CHARACTERS: whatever a hostile input holds, the report stays short)."""
    # A UserError raised in a DataLoader worker is re-raised with the worker's traceback as its text;
    # the user needs only its last line.
    lines = []
    for problem in err.problems:
        if "Original Traceback" in problem:
            tail = [line for line in problem.strip().splitlines() if line.strip()][-1]
            problem = tail.split(": ", 1)[1] if ": " in tail else tail
        lines.append(shorten(problem, MAX_LINE_CHARACTERS))
    if len(lines) > MAX_ERROR_LINES:
        lines = [*lines[: MAX_ERROR_LINES - 1], f"... and {len(lines) - MAX_ERROR_LINES + 1} more problems"]
    return lines
