"""Module paths: join them, replace the module at one, and strip the components that wrappers add
(FSDP1 units, activation checkpointing, `torch.compile`). Used by every module of `surgery`.

Example:
    >>> _join("model", "q_proj"), _join("", "q_proj")
    ('model.q_proj', 'q_proj')
    >>> _without_wrappers("layers._fsdp_wrapped_module.q_proj.lora_A.weight")
    'layers.q_proj.lora_A.weight'
"""

from __future__ import annotations

from torch import nn


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


#: name components that wrappers add to module / parameter names (FSDP1 units, activation checkpointing, compile)
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _without_wrappers(name: str) -> str:
    """`name` without the components that FSDP1, activation-checkpointing and compile wrappers add."""
    if "_" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)
