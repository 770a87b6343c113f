"""Evaluation: the top-1/top-5 pass that training and ``cmtkd-graph eval`` share (``accuracy``), and
``cmtkd-graph eval RUN_DIR`` itself (``run``: a run's system and data rebuilt from its own spec)."""

from cmtkd_graph.evaluation.accuracy import eval_line, evaluate
from cmtkd_graph.evaluation.run import evaluate_run, recorded_accuracy, table

__all__ = ["eval_line", "evaluate", "evaluate_run", "recorded_accuracy", "table"]
