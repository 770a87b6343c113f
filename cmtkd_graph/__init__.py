"""cmtkd_graph: collaborative multi-teacher knowledge distillation (CMT-KD) for low-bit torchvision models.

import cmtkd_graph as cg
spec = cg.load_spec("specs/resnet18.yaml", overrides=["train.epochs=1"])
system = cg.build_system(spec)
out = system(images)
losses = system.losses(out, labels)

student = cg.load_student("runs/resnet18")  # after training (or an export): the student alone
"""

from cmtkd_graph.deploy import integer_student, load_student
from cmtkd_graph.errors import SpecError, UserError
from cmtkd_graph.spec import Spec
from cmtkd_graph.spec_io import dump_spec, load_spec
from cmtkd_graph.system import CMTKDSystem, SystemOutput, build_system

__version__ = "0.1.0"

__all__ = [
    "CMTKDSystem",
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
