"""Components that live outside the package: a method, quantizer, dataset, surgery pass or task of your own.

A plugin is a Python module that registers components when it is imported (``@register_method("mine")``
...). Three ways to name one, each loaded before any name is looked up:

- the spec's ``plugins:`` list (``plugins: [my_package.my_method, ./my_quantizer.py]``): a module name,
  imported from the Python path with the working directory added (as ``python -m`` does), or a ``.py``
  file, relative to the working directory like every other path of a spec. Every verb that reads the
  spec loads them, and so does each process a study, ``accelerate launch``, Slurm or Ray starts, since
  each reads the spec;
- an installed distribution's entry point in the group ``cmtkd_graph.plugins`` (pyproject.toml:
  ``[project.entry-points."cmtkd_graph.plugins"] mine = "my_package.components"``), loaded by every verb;
- ``cmtkd-graph --plugin REF COMMAND ...``, for the commands that read no spec (``taps``, ``schema``).

A plugin that fails to import is one line naming it and its error. Each is loaded once per process: a
second spec naming it does not register its components again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from cmtkd_graph.errors import UserError, first_line

ENTRY_POINT_GROUP = "cmtkd_graph.plugins"

_FILES: dict[Path, ModuleType] = {}


class PluginError(UserError):
    """A plugin could not be found or failed while it was imported."""


def is_file_reference(ref: str) -> bool:
    """``./mine.py``, ``plugins/mine.py``: a file; ``my_package.mine``: a module name."""
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def load_plugin(ref: str) -> ModuleType:
    """Import the module ``ref`` names (a module name or a ``.py`` file), once per process."""
    if is_file_reference(ref):
        return _load_file(ref)
    return _load_module(ref)


def plugin_file(ref: str) -> Path | None:
    """The source file of a loaded plugin (what a run's identity hashes): the ``.py`` file, or the
    module's own file (a package's ``__init__.py``); None for a module without one."""
    module = load_plugin(ref)
    file = getattr(module, "__file__", None)
    return Path(file) if file else None


def _load_module(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    if not all(part.isidentifier() for part in name.split(".")):
        raise PluginError(f"plugin {name!r}: neither a module name (my_package.my_method) nor a .py file")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # found from where the command runs, as `python -m` finds it
    try:
        found = importlib.util.find_spec(name)
        origin = Path(found.origin).resolve() if found is not None and found.origin else None
        if origin in _FILES:  # loaded already as a .py file: its components are registered
            return _FILES[origin]
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise PluginError(
                f"plugin {name!r}: no module named {err.name!r} on the Python path or in {cwd} "
                "(install its package, set PYTHONPATH, or name its .py file)"
            ) from None
        raise _failed(name, err) from None
    except Exception as err:  # the plugin's own code failed: one line, with where it failed
        raise _failed(name, err) from None
    if getattr(module, "__file__", None):
        _FILES.setdefault(Path(module.__file__).resolve(), module)
    return module


def _load_file(ref: str) -> ModuleType:
    path = Path(ref).expanduser().resolve()
    if path in _FILES:
        return _FILES[path]
    if not path.is_file():
        raise PluginError(f"plugin {ref!r}: no such file ({path}); paths are relative to {Path.cwd()}")
    if path.suffix != ".py":
        raise PluginError(f"plugin {ref!r}: a plugin file must be Python source ending in .py")
    for module in list(sys.modules.values()):  # imported already by its module name
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == path:
            _FILES[path] = module
            return module
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    name = f"cmtkd_graph_plugin_{path.stem.replace('-', '_')}_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {ref!r}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and pydantic look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _failed(ref, err) from None
    _FILES[path] = module
    return module


def _failed(ref: str, err: BaseException) -> PluginError:
    return PluginError(f"plugin {ref!r} failed to import: {_error(err)}")


def _error(err: BaseException) -> str:
    """'ValueError: ... (file.py, line 12)': the error and the last frame of the plugin's own code."""
    frames = traceback.extract_tb(err.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and "cmtkd_graph/plugins.py" not in f.filename]
    where = f" ({Path(own[-1].filename).name}, line {own[-1].lineno})" if own else ""
    return f"{type(err).__name__}: {first_line(err)}{where}"


@functools.cache
def load_entry_points() -> tuple[str, ...]:
    """Import every installed plugin (entry points of the group ``cmtkd_graph.plugins``), once per
    process; returns their ``name = value`` strings."""
    loaded = []
    for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = entry.dist.name if entry.dist is not None else "an installed package"
        try:
            entry.load()
        except Exception as err:
            raise PluginError(
                f"plugin {entry.name} = {entry.value} (entry point of {dist}) failed to import: "
                f"{_error(err)}; reinstall or uninstall {dist}"
            ) from None
        loaded.append(f"{entry.name} = {entry.value}")
    return tuple(loaded)


def load_plugins(refs: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The installed plugins, then each of ``refs``; returns ``refs``."""
    load_entry_points()
    for ref in refs:
        load_plugin(ref)
    return list(refs)


def load_spec_plugins(data: object) -> object:
    """Before a spec is validated: the installed plugins and those its ``plugins:`` names (a list of
    strings), so that every name after them is known. A plugin that fails is the one line reported (what
    it registers would be reported missing too, each with a hint the user already followed)."""
    load_entry_points()
    refs = data.get("plugins") if isinstance(data, dict) else None
    if isinstance(refs, list):
        for i, ref in enumerate(refs):
            if isinstance(ref, str):
                try:
                    load_plugin(ref)
                except PluginError as err:
                    raise PluginError(f"plugins[{i}]: {err}") from None
    return data
