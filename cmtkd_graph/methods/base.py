"""The method record: everything one distillation method needs and does, in one class.

A method is a subclass of :class:`Method` registered by name (``@register_method("mine")``), like the
quantizers. The rest of the tool asks the record and never branches on a method's name:

* **the spec** (:meth:`Method.resolve`): how many teachers, their roles and whether they must be
  loaded and frozen; the defaults of ``distill.*`` (so the saved ``spec.yaml`` says what ran); the
  method's own ``distill.options`` (a pydantic model); cross-field checks;
* **the build** (``cmtkd_graph.system.build_system``): how the teachers are arranged (``composed`` into
  one graph with fusion nodes, ``side_by_side``, or ``none``), which teacher teaches each student tap,
  extra student outputs and extra trainable modules (AMTML-KD's weighting), their optimizer groups;
* **every step**: completing the forward output (the combined teacher, statistics) and the loss terms;
* **descriptions**: the objective line of ``validate``, the logits loss ``inspect`` draws, the method
  section of the spec reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, fx, nn

from cmtkd_graph import losses
from cmtkd_graph.errors import did_you_mean
from cmtkd_graph.passes.common import fusion_key
from cmtkd_graph.registry import METHODS
from cmtkd_graph.spec import Spec
from cmtkd_graph.system_output import SystemOutput

if TYPE_CHECKING:
    from cmtkd_graph.passes.taps import Tap

Arrangement = Literal["none", "composed", "side_by_side"]
FEATURE_LOSSES = ("attention", "fitnet", "none")


class MethodOptions(BaseModel):
    """A method's own settings (``distill.options``); subclass it with fields, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class LogitsLoss:
    """How ``inspect`` draws a method's logits-level loss: its label and where its target comes from.

    ``teachers``: ``"combined"`` (the composed graph's output fusion), ``"each"`` (every teacher's
    logits) or the indices of the teachers whose logits are the target. ``via``: a module of
    ``system.method_modules`` the target passes through, fed by the student output ``student_extra``.
    """

    label: str
    teachers: Literal["combined", "each"] | tuple[int, ...]
    via: str | None = None
    student_extra: str | None = None


@dataclass
class BuildContext:
    """What :meth:`Method.build_modules` may look at: the built (not yet composed) networks."""

    spec: Spec
    student: fx.GraphModule
    teachers: list[fx.GraphModule]
    student_taps: list[Tap]
    student_extras: dict[str, str]


@dataclass(frozen=True)
class MethodContext:
    """What a method's step hooks (:meth:`Method.complete`, :meth:`Method.losses`,
    :meth:`Method.parameter_groups`) may use of the built system: the method's own modules, the FitNet
    adapters and whether a teacher trains. Methods never see the whole system, so they cannot come to
    depend on how it is put together."""

    modules: nn.ModuleDict  # what build_modules returned (e.g. AMTML-KD's weighting module)
    adapters: nn.ModuleDict  # FitNet adapters, keyed by fusion_key(tap)
    teacher_trains: bool  # at least one teacher is trained (its cross-entropy is a loss term)
    epoch: Tensor  # 0-dim: the fractional epoch of the step being trained (0 outside training)
    labels_may_ignore: bool = False  # a label may be IGNORE (a segmentation pixel without a class)


class Method:
    """Base class of a method record (see the module docstring). Class attributes are the facts;
    an instance (one per built system) holds the resolved spec and options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: what the method is
    formula: ClassVar[str] = ""  # the objective, with the term names the logs use
    source: ClassVar[str] = ""  # the paper / code it follows, and where this project departs from it
    arrangement: ClassVar[Arrangement] = "composed"
    min_teachers: ClassVar[int] = 0
    max_teachers: ClassVar[int | None] = None
    teacher_roles: ClassVar[tuple[str, ...]] = ()  # names of teachers[0], teachers[1]... if they differ
    frozen_teachers_only: ClassVar[bool] = False  # every teacher is loaded (weights:) and frozen
    feature_losses: ClassVar[tuple[str, ...]] = ("none",)  # allowed distill.feature_loss; first = default
    mutual_learning: ClassVar[bool | None] = None  # None: not supported; else the default
    revision: ClassVar[int] = 1
    # the tasks its terms have a meaning for, and why not the others (None: every task; its terms read
    # samples [N, classes], which a task makes of its outputs)
    tasks: ClassVar[tuple[str, ...] | None] = None
    tasks_reason: ClassVar[str] = ""
    """Raised when the method's computation for a given spec changes (a new reading, a new default):
    runs trained before are then stale (docs/studies.md#run-identity-and-stale-runs)."""
    defaults: ClassVar[dict[str, float]] = {"alpha": 1.0, "beta": 0.5, "tau": 2.0}
    gamma_defaults: ClassVar[dict[str, float]] = {"attention": 100.0, "fitnet": 1.0, "none": 0.0}
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, spec: Spec):
        self.spec = spec
        self.distill = spec.distill
        self.options = self.Options.model_validate(spec.distill.options)

    # ------------------------------------------------------------------ spec time
    @classmethod
    def resolve(cls, spec: Spec) -> None:
        """Check ``spec`` against the method and fill its defaults in place (``ValueError``: ``key: msg``)."""
        cls.check_teachers(spec)
        d = spec.distill
        for key, value in cls.defaults.items():
            if getattr(d, key) is None:
                setattr(d, key, value)
        d.feature_loss = d.feature_loss or cls.feature_losses[0]
        if d.feature_loss not in cls.feature_losses:
            if cls.feature_losses == ("none",):
                raise ValueError(
                    f"distill.feature_loss: method {cls.name} has no feature distillation; use none"
                )
            raise ValueError(
                f"distill.feature_loss: method {cls.name} supports {', '.join(cls.feature_losses)}, "
                f"not {d.feature_loss}"
            )
        if cls.mutual_learning is None:
            if d.mutual_learning:
                raise ValueError(
                    f"distill.mutual_learning: KDCL mutual learning is part of cmtkd, not of {cls.name}"
                )
            d.mutual_learning = False
        elif d.mutual_learning is None:
            d.mutual_learning = cls.mutual_learning
        if d.gamma is None:
            d.gamma = cls.gamma_defaults[d.feature_loss]
        options = cls.parse_options(d.options)
        cls.check(spec, options)
        d.options = options.model_dump(mode="json")

    @classmethod
    def check_teachers(cls, spec: Spec) -> None:
        """Teacher count, roles and the frozen-teacher rule."""
        k, low, high = len(spec.teachers), cls.min_teachers, cls.max_teachers
        roles = (
            " (" + ", ".join(f"teachers[{i}]: {r}" for i, r in enumerate(cls.teacher_roles)) + ")"
            if cls.teacher_roles
            else ""
        )
        if high == 0 and k:
            raise ValueError(
                f"teachers: method {cls.name} trains the student alone; remove the {k} teacher(s)"
            )
        if low == high and k != low:
            raise ValueError(
                f"teachers: method {cls.name} distils from exactly {_count(low)} teacher"
                f"{'s' if low > 1 else ''}{roles}, got {k}"
            )
        if k < low:
            got = "got an empty list" if k == 0 else f"got {k}"
            raise ValueError(
                f"teachers: {cls.name} needs at least {_count(low)} teacher{'s' if low > 1 else ''} ({got})"
            )
        if high is not None and k > high:
            raise ValueError(f"teachers: {cls.name} takes at most {high} teachers, got {k}")
        if cls.frozen_teachers_only:
            for i, t in enumerate(spec.teachers):
                if t.weights is None or t.trainable:
                    raise ValueError(
                        f"teachers[{i}]: {cls.name} distils from separately trained teachers; "
                        "give `weights:` (a checkpoint) and `trainable: false`"
                    )

    @classmethod
    def parse_options(cls, raw: dict[str, Any]) -> MethodOptions:
        """``distill.options`` as the method's Options model; problems name ``distill.options.KEY``."""
        try:
            return cls.Options.model_validate(raw)
        except ValidationError as err:
            problems = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"]) or "options"
                if e["type"] == "extra_forbidden":
                    valid = list(cls.Options.model_fields)
                    hint = did_you_mean(key, valid, n=1) or (
                        f" (valid: {', '.join(valid)})" if valid else f" ({cls.name} has no options)"
                    )
                    problems.append(f"distill.options.{key}: unknown option of {cls.name}{hint}")
                else:
                    msg = e["msg"].removeprefix("Value error, ")
                    problems.append(f"distill.options.{key}: {msg}, got {e.get('input')!r}")
            raise ValueError("; ".join(problems)) from None

    @classmethod
    def check(cls, spec: Spec, options: MethodOptions) -> None:
        """Cross-field checks and option defaults that depend on the rest of the spec (override)."""

    @classmethod
    def describe(cls, spec: Spec) -> str:
        """The objective with this spec's numbers (``cmtkd-graph validate``)."""
        return cls.formula

    # ------------------------------------------------------------------ build time
    def fuses_at_taps(self) -> bool:
        """Composed methods: form shared knowledge (fusion nodes) at the taps."""
        return self.distill.feature_loss != "none"

    def combine(self) -> str:
        """Composed methods: how the output fusion combines the teachers' logits."""
        return self.distill.combine

    def hint_teacher(self, tap_index: int, num_teachers: int) -> int:
        """Side-by-side methods with a feature loss: the teacher student tap ``tap_index`` learns from."""
        return 0

    def hint_learner(self) -> int | None:
        """Side-by-side methods with a feature loss: which network's taps learn from the hints, the
        student (None, the default) or the teacher of that index (``out.teacher_features``, keyed by
        the student tap at the same position)."""
        return None

    def share_parameters(self, student: fx.GraphModule, teachers: list[fx.GraphModule]) -> list[str]:
        """Tie parameters between the built networks before they are arranged (in place); one log line
        per decision. Default: nothing shared."""
        return []

    def student_extras(self, student: fx.GraphModule) -> dict[str, str]:
        """Other student nodes the method reads (output key -> node name), returned under ``extras``."""
        return {}

    def build_modules(self, ctx: BuildContext) -> nn.ModuleDict:
        """The method's own trainable modules (``MethodContext.modules`` at every step)."""
        return nn.ModuleDict()

    def parameter_groups(self, ctx: MethodContext) -> list[dict]:
        """Optimizer groups of ``ctx.modules`` (each a dict with ``name``, ``params``, ``lr``,
        ``weight_decay``)."""
        return []

    def lr_factors(self, schedule: Callable[[float], float]) -> dict[str, Callable[[float], float]]:
        """Learning-rate factors (of a fractional epoch) for the parameter groups, by group name (``*``:
        every group not named), where the method's schedule differs from ``schedule``, the spec's
        ``optim.schedule``; every group not covered follows ``schedule`` (the default: all of them)."""
        return {}

    # ------------------------------------------------------------------ every step
    def complete(self, ctx: MethodContext, out: SystemOutput) -> None:
        """Fill what the graphs do not compute (the combined teacher, ``out.stats``...)."""

    def losses(self, ctx: MethodContext, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        """Every loss term by name, plus ``total``."""
        raise NotImplementedError

    def logits_loss(self) -> LogitsLoss | None:
        """The logits-level loss for ``inspect`` (None: none)."""
        return None

    # ------------------------------------------------------------------ shared pieces
    def ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of ``logits`` against the labels (class indices or, after MixUp/CutMix, class
        probabilities), with the spec's ``distill.label_smoothing``: every label term goes through it."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.distill.label_smoothing)

    def student_ce(self, out: SystemOutput, labels: Tensor) -> dict[str, Tensor]:
        return {"ce_student": self.ce(out.student_logits, labels)}

    def cross_entropy_terms(
        self, ctx: MethodContext, out: SystemOutput, labels: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``ce_student`` and, if a teacher trains, the combined teacher's ``ce_teacher``; alpha x sum."""
        terms = self.student_ce(out, labels)
        total = self.distill.alpha * terms["ce_student"]
        if ctx.teacher_trains:
            terms["ce_teacher"] = self.ce(out.teacher_logits, labels)
            total = total + self.distill.alpha * terms["ce_teacher"]
        return terms, total

    def add_feature_terms(
        self, ctx: MethodContext, out: SystemOutput, terms: dict[str, Tensor], total: Tensor
    ) -> Tensor:
        """Add ``feature/<tap>`` and ``feature`` (their sum) to ``terms``; return total + gamma x feature."""
        d = self.distill
        if d.feature_loss == "none" or not out.hints:
            return total
        learners = out.student_features if self.hint_learner() is None else out.teacher_features
        per_tap = feature_terms(out, d.feature_loss, ctx.adapters, detach=d.detach_shared, learners=learners)
        terms.update({f"feature/{name}": value for name, value in per_tap.items()})
        terms["feature"] = torch.stack(list(per_tap.values())).sum()
        return total + d.gamma * terms["feature"]


def feature_terms(
    out: SystemOutput,
    feature_loss: str,
    adapters: nn.ModuleDict,
    *,
    detach: bool = False,
    learners: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """d(F^l, F_S^l) at every tap l: the attention or FitNet distance between the teacher feature the
    student tap learns from (``out.hints``) and the student's tap
    (docs/methods.md#feature-distillation-eq-4-6), or, with ``learners``, the tap of the network that
    learns from the hints (``Method.hint_learner``)."""
    learners = out.student_features if learners is None else learners
    result = {}
    for name, hint in out.hints.items():
        if detach:
            hint = hint.detach()
        student = learners[name]
        if feature_loss == "attention":
            result[name] = losses.attention_loss(hint, student)
        else:
            result[name] = losses.fitnet_loss(hint, adapters[fusion_key(name)](student))
    return result


def feature_text(spec: Spec) -> str:
    """`` + gamma <loss> loss`` for the objective lines ('' without a feature loss)."""
    d = spec.distill
    if d.feature_loss == "none":
        return ""
    return f" + {d.gamma:g} {d.feature_loss} loss" + (" (no gradient to teachers)" if d.detach_shared else "")


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four"}.get(n, str(n))


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (and set its ``name``)."""
    return METHODS.register_record(name)


def method_for(spec: Spec) -> Method:
    """The method record of ``spec``, instantiated for it."""
    return METHODS.get(spec.method)(spec)
