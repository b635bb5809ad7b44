"""FSDP1 (`FullyShardedDataParallel`, Lightning's `FSDPStrategy`) for an injected model: the auto-wrap
policy that gives every adapter matrix a unit of its own, the repair of frozen `NO_SHARD` units, and the
full adapter tensors gathered unit by unit. Torch only.

Example:
    >>> from torch import nn
    >>> restore_frozen_views(nn.Linear(2, 2))   # no FSDP1 unit: nothing to do
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_lora.fsdp._dist import clean_name, is_fsdp1, rank
from lightning_lora.fsdp.plan import decoder_layers
from lightning_lora.surgery import find_network, lora_layers


def fsdp1_auto_wrap_policy(module: nn.Module, layer_classes: Sequence[type] | None = None,
                           adapter_precision: Any = "auto") -> Any:
    """An FSDP1 auto-wrap policy for an injected `module`: every adapter matrix (`lora_A`, `lora_B`) is
    a unit of its own (so flat parameters never mix the adapter dtype with the base's, nor trainable
    with frozen parameters), the decoder layers (`layer_classes`, default as `decoder_layers`) are units,
    and the rest stays in the root.

    Adapter units keep their dtype in compute: with `adapter_precision="auto"` they get a
    `MixedPrecision` in the adapters' own dtype, overriding the strategy's (`bf16-true` would otherwise
    cast fp32 adapters to bf16 for compute); pass None to leave the strategy's.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> policy = fsdp1_auto_wrap_policy(m)
        >>> type(policy).__name__
        'CustomPolicy'
    """
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    adapters: dict[int, torch.dtype] = {}
    for _, layer in lora_layers(module):
        for part in (layer.lora_A, layer.lora_B):
            adapters[id(part)] = part.weight.dtype
    if layer_classes is None:
        layer_classes = tuple({type(m) for _, m in decoder_layers(find_network(module)[1])})
    classes = tuple(layer_classes)

    def wrap(m: nn.Module) -> bool | dict[str, Any]:
        dtype = adapters.get(id(m))
        if dtype is not None:
            if adapter_precision == "auto":
                return {"mixed_precision": MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)}
            return True
        return bool(classes) and isinstance(m, classes)

    return CustomPolicy(wrap)


def restore_frozen_views(module: nn.Module) -> None:
    """Re-register the parameters of FSDP1 units that hold only frozen parameters and do not shard (`NO_SHARD`,
    what FSDP1 runs on one device). PyTorch swaps such a unit's parameters for plain tensors in forward and,
    as no gradient reaches the unit, never swaps them back; its state dict and the optimizer's parameter
    numbering then miss them. Trainable or sharded units are left alone (FSDP1 restores those itself).

    Example:
        >>> restore_frozen_views(nn.Linear(2, 2))   # no FSDP1 unit: nothing to do
    """
    if not is_fsdp1(module):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    for unit in module.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FSDP) else None
        if (handle is not None and unit._use_orig_params and unit.sharding_strategy == ShardingStrategy.NO_SHARD
                and not handle.flat_param.requires_grad):
            handle._use_sharded_views()


def fsdp1_adapter_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full adapter tensors of an FSDP1-wrapped model whose adapters are units of their own (see
    `fsdp1_auto_wrap_policy`): each adapter unit is gathered alone (`summon_full_params`), the base never.

    Example:
        >>> fsdp1_adapter_state_dict(trainer.model)   # doctest: +SKIP
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, torch.Tensor] = {}
    keep = rank() == 0 or not rank0_only
    for name, module in model.named_modules():
        if not isinstance(module, FSDP):
            continue
        key = clean_name(name)
        if not key.endswith((".lora_A", ".lora_B")):
            continue
        with FSDP.summon_full_params(module, writeback=False, recurse=False):
            weight = module.module.weight.detach()
            if keep:
                out[clean_name(f"{key}.weight")] = weight.to("cpu", copy=True)
    return out


__all__ = ["fsdp1_adapter_state_dict", "fsdp1_auto_wrap_policy", "restore_frozen_views"]
