"""Errors a user can cause, reported as one readable message each (never a raw traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's spec, data, command line or files.

    The CLI prints ``str(error)`` (one line per problem) and exits with status 2.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class SpecError(UserError):
    """The experiment spec (YAML file or ``--set`` override) is invalid."""


def closest(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The valid names closest to ``word`` (for 'did you mean ...?' hints)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean a, b?)' or '' when nothing is close."""
    near = closest(word, choices, n=n)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text (its type's name if it has none), cut to ``limit``:
    what a one-line error quotes of a library's long explanation."""
    text = str(err).strip()
    return shorten(text.splitlines()[0] if text else type(err).__name__, limit)


def shorten(text: str, limit: int = 200) -> str:
    """``text``, or its start and how much was cut: a value echoed in an error line stays readable
    however long the value is."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
