"""cmtkd_graph: collaborative multi-teacher knowledge distillation for low-bit torchvision models."""

__version__ = "0.1.0"
