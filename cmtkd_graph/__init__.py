"""cmtkd_graph: collaborative multi-teacher knowledge distillation (CMT-KD) for low-bit torchvision models.

import cmtkd_graph as cg
spec = cg.load_spec("specs/resnet18.yaml", overrides=["train.epochs=1"])
system = cg.build_system(spec)
out = system(images)
losses = system.losses(out, labels)

student = cg.load_student("runs/resnet18")  # after training (or an export): the student alone
"""

# Importing the package registers every built-in component in the tables of ``cmtkd_graph.registry``,
# which the spec checks names against: the tasks, datasets, quantizers, surgery passes and methods.
from cmtkd_graph import data, methods, quantizers, tasks  # noqa: F401  (registration)
from cmtkd_graph.deploy import integer_student, load_student
from cmtkd_graph.errors import SpecError, UserError
from cmtkd_graph.passes import surgery  # noqa: F401  (registration)
from cmtkd_graph.spec import Spec, dump_spec, load_spec
from cmtkd_graph.system import CMTKDSystem, DistillationSystem, SystemOutput, build_system
from cmtkd_graph.version import __version__ as __version__

__all__ = [
    "CMTKDSystem",
    "DistillationSystem",
    "Spec",
    "SpecError",
    "SystemOutput",
    "UserError",
    "build_system",
    "dump_spec",
    "integer_student",
    "load_spec",
    "load_student",
]
