"""torchvision models: building them by name (``builders``), facts about their families that the passes
use (``facts``), and building on the meta device without initialising weights (``meta_device``)."""

from cmtkd_graph.models.builders import build_model, check_arch, model_names, read_state_dict
from cmtkd_graph.models.facts import FAMILIES, GENERIC, Family, family_of

__all__ = [
    "FAMILIES",
    "GENERIC",
    "Family",
    "build_model",
    "check_arch",
    "family_of",
    "model_names",
    "read_state_dict",
]
