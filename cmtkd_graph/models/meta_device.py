"""Building on the meta device without paying for weight initialisation.

A meta tensor has a shape and no values, yet ``nn.init.kaiming_normal_`` and friends still run on it,
through PyTorch's Python reference implementations: a third of the time of building a large
torchvision model on meta, and again for every quantized layer created there as a placeholder.
``no_init_on_meta()`` makes those calls no-ops for meta tensors only; real tensors initialise as usual.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# ``torch.nn.init``'s functions, and the in-place fills a builder may call on a parameter directly
# (``m.weight.data.normal_(0, 0.01)``).
_SKIPPED = {
    *(f for name, f in vars(torch.nn.init).items() if callable(f) and name.endswith("_") and name[0] != "_"),
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    torch.Tensor.fill_,
    torch.Tensor.zero_,
    torch.Tensor.exponential_,
    torch.Tensor.bernoulli_,
}


def no_init_on_meta() -> TorchFunctionMode:
    """Context manager: ``torch.nn.init.*`` and in-place fills return meta tensors untouched."""
    return _NoInitOnMeta()


class _NoInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SKIPPED:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)
