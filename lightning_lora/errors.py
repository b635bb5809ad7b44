"""The one family of user errors: everything a user can cause is a `LoRAError` (a `ValueError`).

The `lightning-lora` command prints a `LoRAError` (or one chained behind another exception) as one
line on stderr and exits with code 2; any other exception is a bug and keeps its traceback.

| class | raised for |
| --- | --- |
| `LoRAError` | the root: bad targets, double injection, a state dict that does not fit, ... |
| `LoRAConfigError` | an invalid `LoRAConfig` / `LoRA(...)` option |
| `AdapterFormatError` | a missing, corrupt or mismatched adapter file or checkpoint |
| `UnsupportedAdapterError` | a valid PEFT adapter using a feature we do not implement |
| `DataFormatError` | a data file or data option that cannot be used (message starts with `file:line`) |
| `DataFileNotFoundError` | a data file that does not exist (also a `FileNotFoundError`) |
| `ModelNotFoundError` | a model that is neither local nor fetchable: offline and not cached, gated without a token, unknown (also a `FileNotFoundError`) |
| `OutputExistsError` | an output directory that exists and is not empty, without `overwrite` (also a `FileExistsError`) |
| `CommandError` | a bad command-line argument of `lightning-lora export/merge/estimate` |
| `QuantizationError` | a quantized base that cannot be built or adapted (`quantize_base`, bitsandbytes layers) |
| `MissingDependencyError` | torchao / bitsandbytes / gguf needed and not installed (also an `ImportError`) |
| `UnsupportedArchitectureError` | a model GGUF export cannot write (the message lists the supported architectures) |
| `GGUFVerificationError` | a written GGUF that does not read back as the model or adapter it was written from |

Example:
    >>> from lightning_lora.errors import LoRAError, DataFormatError
    >>> issubclass(DataFormatError, LoRAError) and issubclass(LoRAError, ValueError)
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any


class LoRAError(ValueError):
    """A user error (bad option, path, data or file); the message says what was wrong, what was
    expected and what to do.

    Example:
        >>> str(LoRAError("target_modules=['qproj'] matched no module"))
        "target_modules=['qproj'] matched no module"
    """


class LoRAConfigError(LoRAError):
    """An invalid LoRA setting (the message names the value, the expected range and an example).

    Example:
        >>> from lightning_lora import LoRAConfig
        >>> LoRAConfig(r=0)
        Traceback (most recent call last):
        lightning_lora.errors.LoRAConfigError: r=0 is invalid; expected an integer > 0, e.g. r=8.
    """


class AdapterFormatError(LoRAError):
    """An adapter file or checkpoint that is missing, corrupt, or does not fit the model; the
    message names the path and what is wrong.

    Example:
        >>> issubclass(AdapterFormatError, LoRAError)
        True
    """


class UnsupportedAdapterError(AdapterFormatError):
    """A valid PEFT adapter that uses a feature lightning-lora does not implement (named in the message).

    Example:
        >>> issubclass(UnsupportedAdapterError, AdapterFormatError)
        True
    """


class DataFormatError(LoRAError):
    """A data file or data option that cannot be used; for a bad line the message starts with ``file:line``.

    Example:
        >>> issubclass(DataFormatError, ValueError)
        True
    """


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """A data file that does not exist (a `DataFormatError` and a `FileNotFoundError`).

    Example:
        >>> issubclass(DataFileNotFoundError, FileNotFoundError)
        True
    """


class ModelNotFoundError(LoRAError, FileNotFoundError):
    """A model that is neither a local path, a bundled model, nor a hub id that is cached or can be downloaded
    (offline, unreachable, gated without a token, unknown); the message names the id, the cache and the fix.

    Example:
        >>> issubclass(ModelNotFoundError, FileNotFoundError)
        True
    """


class OutputExistsError(LoRAError, FileExistsError):
    """An output path that exists and would be overwritten (pass `overwrite=True` / `--overwrite`).

    Example:
        >>> issubclass(OutputExistsError, FileExistsError)
        True
    """


class CommandError(LoRAError):
    """A bad argument of a `lightning-lora` command (shown as one line, exit code 2).

    Example:
        >>> str(CommandError("adapter x does not exist"))
        'adapter x does not exist'
    """


class QuantizationError(LoRAError):
    """A quantized base that cannot be built or adapted (the message names the layer and the fix).

    Example:
        >>> issubclass(QuantizationError, LoRAError)
        True
    """


class MissingDependencyError(QuantizationError, ImportError):
    """torchao or bitsandbytes is needed and not installed; the message names the `pip install` to run.

    Example:
        >>> issubclass(MissingDependencyError, ImportError)
        True
    """


class UnsupportedArchitectureError(LoRAError):
    """A model whose architecture cannot be written as GGUF (the message lists the supported ones).

    Example:
        >>> issubclass(UnsupportedArchitectureError, LoRAError)
        True
    """


class GGUFVerificationError(LoRAError):
    """A GGUF file that does not read back as what was written (the message says how it differs).

    Example:
        >>> issubclass(GGUFVerificationError, LoRAError)
        True
    """


#: how many items an error message names from a long list (keys, modules, tensors) before "... and N more"
SHOWN = 3


def listed(items: Sequence[str], shown: int = SHOWN, sep: str = ", ") -> str:
    """The first `shown` of `items` and how many more, for a one-line error message.

    Example:
        >>> listed(["a", "b", "c", "d", "e"])
        'a, b, c ... and 2 more'
        >>> listed(["a", "b"], sep="; ")
        'a; b'
    """
    more = len(items) - shown
    return sep.join(items[:shown]) + (f" ... and {more} more" if more > 0 else "")


def require_module(name: str, missing: str) -> Any:
    """The optional package `name`, imported; a `MissingDependencyError` with the message `missing` (what needs
    it and the `pip install` to run) when it cannot be imported.

    Example:
        >>> require_module("json", "never shown").__name__
        'json'
        >>> require_module("no_such_package_xyz", "x needs no_such_package_xyz; run: pip install it")
        Traceback (most recent call last):
        ...
        lightning_lora.errors.MissingDependencyError: x needs no_such_package_xyz; run: pip install it
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(missing) from None


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), for wrapping a library's
    error into one of ours.

    Example:
        >>> first_line(OSError("disk full\\nmore detail"))
        'disk full'
    """
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


__all__ = ["AdapterFormatError", "CommandError", "DataFileNotFoundError", "DataFormatError", "GGUFVerificationError",
           "LoRAConfigError", "LoRAError", "MissingDependencyError", "ModelNotFoundError", "OutputExistsError",
           "QuantizationError", "UnsupportedAdapterError", "UnsupportedArchitectureError", "first_line", "listed", "require_module"]
