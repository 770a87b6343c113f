"""The tables that map the names a spec uses to the components that implement them.

A spec says ``method: cmtkd``, ``quantizer: {name: lsq}``, ``surgery: [cifar_stem]``,
``data: {dataset: cifar10}``; the spec's validation looks those names up here, and each component
registers itself from its own file (``@register_method``, ``@register_quantizer``,
``@SURGERIES.register``, ``@register_dataset``). The tables live in this small module, below everything
else, so that the spec can check names without importing the components (which import the spec).
Importing ``cmtkd_graph`` registers every built-in component.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from cmtkd_graph.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components (quantizers, surgery passes, datasets...).

    >>> QUANTIZERS.register("mine")(MyQuantizerFamily)   # or as a class decorator
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def register_record(self, name: str) -> Callable[[T], T]:
        """Class decorator for a record class (a method, a quantizer family, a dataset): register it
        under ``name`` and set its ``name`` attribute to it."""

        def add(cls: T) -> T:
            cls.name = name
            return self.register(name)(cls)

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. to re-register an edited component in a notebook)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; "
                f"known: {', '.join(sorted(self._items))} (one of your own: name its module under the "
                "spec's plugins:)"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


METHODS: Registry[Any] = Registry("method")
"""``method:`` -> a ``cmtkd_graph.methods.Method`` subclass."""
QUANTIZERS: Registry[Any] = Registry("quantizer")
"""``quantizer.name`` -> a ``cmtkd_graph.quantizers.QuantizerFamily`` subclass."""
SURGERIES: Registry[Callable[..., Any]] = Registry("surgery pass")
"""``surgery[].name`` -> an in-place pass ``fn(gm, **options)`` (``cmtkd_graph.passes.surgery``)."""
DATASETS: Registry[Any] = Registry("dataset")
"""``data.dataset`` -> a ``cmtkd_graph.data.record.DatasetRecord`` subclass."""
TASKS: Registry[Any] = Registry("task")
"""``task:`` -> a ``cmtkd_graph.tasks.Task`` subclass."""
