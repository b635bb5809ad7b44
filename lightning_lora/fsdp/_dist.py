"""Distributed facts the FSDP modules share: which FSDP a module uses, this rank, full and local tensors
of DTensors, one all-reduce of scalars, and parameter names without wrapper segments. Torch only.

`torch.distributed` submodules are imported inside the functions: PyTorch builds without distributed
support (`torch.distributed.is_available()` False) have none of them.

Example:
    >>> from torch import nn
    >>> is_sharded(nn.Linear(2, 2)), rank()
    (False, 0)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_lora.surgery import _without_wrappers


def fsdp2_api() -> tuple[type, Callable[..., Any]]:
    """`(FSDPModule, fully_shard)` of the installed PyTorch."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover (torch < 2.6)
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def dtensor_class() -> type:
    """`torch.distributed.tensor.DTensor`."""
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` (or a submodule) is sharded by FSDP2 (`fully_shard`) or wrapped by FSDP1.

    Example:
        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    if not torch.distributed.is_available():
        return False
    fsdp2, _ = fsdp2_api()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, (fsdp2, FullyShardedDataParallel)) for m in module.modules())


def mixed_dtype_all_gather() -> bool:
    """Whether the installed FSDP2 all-gathers parameters of different dtypes in one unit (PyTorch
    falls back to a byte buffer; 2.13 does). When not, `adapter_units="auto"` gives adapters their own
    units wherever their dtype differs from the base's.

    Example:
        >>> isinstance(mixed_dtype_all_gather(), bool)
        True
    """
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives

        return "uint8" in inspect.getsource(_fsdp_collectives._get_all_gather_input_metadatas)
    except Exception:  # noqa: BLE001 (an older or reorganized PyTorch: take the safe layout)
        return False


def clean_name(name: str) -> str:
    """A parameter name without the segments that FSDP1, activation-checkpointing and compile wrappers add.

    Example:
        >>> clean_name("model.layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A._fsdp_wrapped_module.weight")
        'model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    return _without_wrappers(name)


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every rank must call it, in the same order)."""
    DTensor = dtensor_class()
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def sum_over_ranks(values: list[torch.Tensor], module: nn.Module) -> torch.Tensor:
    """Stack float64 scalars and all-reduce them (one collective) on the device of `module`'s parameters."""
    total = torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)
    if torch.distributed.is_initialized():
        device = next((local_tensor(p).device for p in module.parameters()), torch.device("cpu"))
        total = total.to(device)
        torch.distributed.all_reduce(total)
    return total.cpu()


def is_fsdp1(module: nn.Module) -> bool:
    """Whether `module` holds FSDP1 (`FullyShardedDataParallel`) wrappers."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())
