"""Reading files a user hands us without running code hidden in them.

A pickle can execute anything while it loads, and a checkpoint or dataset file can come from anywhere.
So tensors are read from safetensors files, or with ``torch.load(weights_only=True)`` (tensors and
plain containers only), and the CIFAR python batches with an unpickler that admits only what those
files hold: numpy arrays, lists, dicts, strings and numbers. Whatever is refused becomes one line that
names the file, never a traceback.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch

from cmtkd_graph.errors import UserError, first_line

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_tensors(path: Path, *, what: str) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, or what ``torch.load(weights_only=True)`` admits.

    ``what`` names the file's role in errors (e.g. ``"student.weights"``, ``"--checkpoint"``).
    """
    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            problem = first_line(err)
            raise UserError(f"{what}: {path} is not a readable safetensors file ({problem})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{what}: {path} was refused: it holds objects other than tensors and plain containers "
            f"({refused_global(err)}), and loading it could run code; save a state_dict with "
            "torch.save(model.state_dict(), ...) or use safetensors"
        ) from None
    except Exception as err:  # truncated or foreign files fail in many ways
        raise UserError(f"{what}: {path} is not a readable PyTorch file ({first_line(err)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}: {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


class _CifarUnpickler(pickle.Unpickler):
    """Admits the numpy array reconstruction a CIFAR batch needs and nothing else (``_codecs.encode``
    turns a string into bytes: protocol-2 pickles written by Python 3 store bytes that way)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("_codecs", "encode"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")


def read_cifar_pickle(path: Path) -> Any:
    """A CIFAR python batch (Python 2 pickles, hence latin-1), read with the restricted unpickler."""
    try:
        data = path.read_bytes()
        return _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path}: refused, not a CIFAR python batch ({first_line(err)}); loading it could run code. "
            "Re-extract the archive from https://www.cs.toronto.edu/~kriz/cifar.html"
        ) from None
    except Exception as err:  # a damaged pickle can fail in many ways
        raise UserError(
            f"{path}: not a readable CIFAR python batch ({type(err).__name__}: {first_line(err)}); "
            "re-extract the archive or re-download it"
        ) from None


def read_json_object(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``, or one line: ``WHAT: PATH is damaged (...); FIX``."""
    import json

    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{what}: {path} is damaged (not JSON: {first_line(err)}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} is damaged (not a JSON object); {fix}")
    return data


def refused_global(err: pickle.UnpicklingError) -> str:
    """What ``torch.load(weights_only=True)`` refused (e.g. a global), from its long explanation."""
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip()
    return first_line(err)
