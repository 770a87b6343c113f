"""train.fit_to_budget: how many epochs fit, the schedule compressed to them, and what a resumed run does.
(The real fitted run is in test_train.py.)"""

from __future__ import annotations

import pytest

from cmtkd_graph.errors import UserError
from cmtkd_graph.optim import lr_factor
from cmtkd_graph.runtime.budget import BudgetFit, fitted_epochs, schedule_overrides
from cmtkd_graph.spec.io import dump_spec, load_spec
from cmtkd_graph.train import _fit_length


def test_the_epochs_that_fit_count_steps_and_evaluations_in_90_percent_of_the_budget():
    # 1 minute -> 54 s planned; an epoch is 100 steps of 0.1 s = 10 s; an evaluation 2 s, every 2 epochs
    # 4 epochs: 40 s + 2 evaluations = 44 s; 5 epochs: 50 s + 3 evaluations (2, 4, and after the last) = 56 s
    assert fitted_epochs(1, 120, 0.1, 100, 2.0, eval_every=2) == 4
    assert fitted_epochs(1, 120, 0.1, 100, 2.0, eval_every=1) == 4  # 40 + 4 x 2 = 48; 5: 50 + 10 = 60
    assert fitted_epochs(1, 3, 0.1, 100, 2.0, eval_every=1) == 3  # everything fits: train.epochs stays
    assert fitted_epochs(0.01, 120, 0.1, 100, 2.0, eval_every=1) == 1  # none fits: max_minutes stops it


def test_the_log_line_says_what_fitted():
    fit = BudgetFit(0.2, 1000, 2, 0.562, 8, 0.749, ["train.epochs=2", "optim.schedule.milestones=[1]"])
    assert fit.describe() == (
        "train.fit_to_budget: 8 steps of 0.562 s per epoch (timed) and 0.749 s per evaluation: 2 of 1000 "
        "epochs fit in 0.2 min; training with train.epochs=2, optim.schedule.milestones=[1]"
    )
    tight = BudgetFit(0.05, 40, 1, 0.562, 8, 0.749, ["train.epochs=1"])  # 5.2 s of 2.7 planned
    assert tight.describe().endswith("(not even one fits: max_minutes stops the run within its first epoch)")
    assert BudgetFit(5, 3, 3, 0.1, 8, 0.1).describe().endswith("all of 3 epochs fit in 5 min")


def test_the_schedule_is_the_same_schedule_compressed():
    spec = load_spec(
        "resnet18",
        ["train.epochs=120", "optim.schedule={name: multistep, milestones: [50, 100], warmup_epochs: 2}"],
    )
    overrides = schedule_overrides(spec, 30)
    assert overrides == [
        "train.epochs=30",
        "optim.schedule.warmup_epochs=0.5",
        "optim.schedule.milestones=[12.5, 25]",
    ]
    fitted = load_spec("resnet18", [*spec_overrides(spec), *overrides])
    for epoch in [0.0, 1.0, 3.0, 49.9, 50.0, 99.0, 100.0, 119.0]:
        assert lr_factor(epoch / 4, fitted.optim.schedule, 30, 0.1) == pytest.approx(
            lr_factor(epoch, spec.optim.schedule, 120, 0.1)
        )
    assert schedule_overrides(spec, 120) == []  # the whole run fits: nothing changes


def test_a_cosine_schedule_keeps_its_shape():
    spec = load_spec("resnet18", ["train.epochs=60", "optim.schedule={name: cosine, warmup_epochs: 2.0}"])
    fitted = load_spec("resnet18", [*spec_overrides(spec), *schedule_overrides(spec, 15)])
    assert fitted.train.epochs == 15 and fitted.optim.schedule.warmup_epochs == 0.5
    for epoch in [0.5, 2.0, 17.0, 40.0, 59.0]:
        assert lr_factor(epoch / 4, fitted.optim.schedule, 15, 0.1) == pytest.approx(
            lr_factor(epoch, spec.optim.schedule, 60, 0.1)
        )


def test_amtml_kd_phases_follow_the_fitted_length():
    """AMTML-KD derives its phases from train.epochs (80 of every 280 epochs, then the student alone)."""
    spec = load_spec("amtml_kd", ["train.epochs=280"])
    fitted = load_spec("amtml_kd", schedule_overrides(spec, 28))
    assert spec.distill.options["weighting_epochs"] == 80
    assert fitted.distill.options["weighting_epochs"] == 8
    assert fitted.distill.options["student_milestones"] == [pytest.approx(9.9), pytest.approx(14.9)]


def test_the_recorded_fit_applied_again_gives_the_same_spec(tmp_path):
    """A resumed run loads its saved (fitted) spec.yaml, or the spec file again, with the recorded
    overrides: both give the spec it trained with."""
    spec = load_spec("amtml_kd", ["train.epochs=280"])
    overrides = schedule_overrides(spec, 28)
    fitted = load_spec("amtml_kd", overrides)
    saved = tmp_path / "spec.yaml"
    saved.write_text(dump_spec(fitted))
    assert load_spec(saved, overrides).model_dump() == fitted.model_dump()


def test_a_resumed_run_keeps_its_fit_and_a_run_started_without_one_cannot_gain_it():
    recorded = BudgetFit(5.0, 120, 30, 0.05, 195, 0.5, ["train.epochs=30"])
    spec = load_spec("resnet18", ["train.max_minutes=5", "train.fit_to_budget=true"])
    assert _fit_length(spec, None, None, None, recorded, resumed=True) is recorded  # no timing
    with pytest.raises(UserError, match="started without it"):
        _fit_length(spec, None, None, None, None, resumed=True)


def test_fit_to_budget_needs_a_budget():
    with pytest.raises(Exception, match=r"fit_to_budget needs a budget: set train\.max_minutes"):
        load_spec("resnet18", ["train.fit_to_budget=true"])


def spec_overrides(spec) -> list[str]:
    """The overrides that made ``spec`` from resnet18 (its length and schedule)."""
    s = spec.optim.schedule
    schedule = f"{{name: {s.name}, milestones: {list(s.milestones)}, warmup_epochs: {s.warmup_epochs}}}"
    return [f"train.epochs={spec.train.epochs}", f"optim.schedule={schedule}"]
