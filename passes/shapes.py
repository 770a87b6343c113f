"""Output shapes of every node without computing anything (fake tensors), for tap checks and inspection."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from cmtkd_graph.passes.tracer import qualname
from torch import fx

from cmtkd_graph.errors import UserError


def propagate_shapes(gm: fx.GraphModule, input_shape: Sequence[int]) -> dict[fx.Node, torch.Size]:
    """Run ``gm`` on a fake input of ``input_shape`` and return each tensor node's output shape.

    Also stores ``node.meta["val"]`` (a fake tensor: shape and dtype). Runs in eval mode, so no state
    changes (BatchNorm statistics, LSQ step initialisation), then restores the module's mode.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class _Prop(FakeTensorProp):
        current: fx.Node | None = None

        def run_node(self, n: fx.Node):
            self.current = n
            return super().run_node(n)

    training = gm.training
    gm.eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _Prop(gm, mode)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # it logs a traceback before raising; ours is the message
    try:
        fake = mode.from_tensor(
            torch.empty(tuple(input_shape), device="meta" if device.type == "meta" else "cpu")
        )
        prop.propagate(fake)
    except Exception as err:
        where = f" at node {qualname(prop.current)}" if prop.current is not None else ""
        raise UserError(
            f"the model does not run on inputs of shape {list(input_shape)}{where}: {_first_line(err)} "
            "(check data.image_size and the model's minimum input size)"
        ) from None
    finally:
        fake_log.setLevel(level)
        gm.train(training)
    return {n: n.meta["val"].shape for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated output shape of ``node`` (after :func:`propagate_shapes`), or None."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
