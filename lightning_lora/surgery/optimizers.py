"""Optimizer restriction: the optimizers `configure_optimizers` returned hold only what LoRA trains
(groups, options and schedulers stay valid; an optimizer built over the base before injection is
re-targeted).

Example:
    >>> w, a = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.SGD([w, a], lr=0.1)
    >>> restrict_optimizer(opt, [a]); opt.param_groups[0]["params"] == [a]
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_lora.errors import LoRAError
from lightning_lora.surgery.state import is_lora_key


def find_optimizers(obj: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer inside what `configure_optimizers` returned (an optimizer, list, tuple, dict).

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> find_optimizers({"optimizer": opt, "lr_scheduler": None}) == [opt]
        True
    """
    if isinstance(obj, torch.optim.Optimizer):
        return [obj]
    if isinstance(obj, dict):
        return [o for v in obj.values() for o in find_optimizers(v)]
    if isinstance(obj, (list, tuple)):
        return [o for v in obj for o in find_optimizers(v)]
    return []  # schedulers and other entries


def restrict_optimizer(optimizer: torch.optim.Optimizer, trainable: Sequence[nn.Parameter],
                       base: Sequence[nn.Parameter] | None = None) -> None:
    """Leave `optimizer` holding only `trainable` parameters (groups keep their order and options,
    so a scheduler built on the optimizer stays valid).

    An optimizer whose one group holds exactly the `base` parameters was built over the whole
    module before the adapters existed (LightningCLI's `--optimizer` does this): its group is given
    the trainable parameters instead.

    Raises:
        LoRAError: when no trainable parameter is left in the optimizer.

    Example:
        >>> w, a = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w, a], lr=0.1)
        >>> restrict_optimizer(opt, [a]); opt.param_groups[0]["params"] == [a]
        True
    """
    groups = optimizer.param_groups
    if base is not None and len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in base}:
        groups[0]["params"] = list(trainable)
        return
    keep = {id(p) for p in trainable}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    if not any(group["params"] for group in groups):
        raise LoRAError(f"{type(optimizer).__name__} holds none of the LoRA parameters after freezing the base. "
                        "Build it from self.parameters() (or self.trainer.model.parameters()) so that the "
                        "adapters are included.")


def restrict_optimizers(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """`restrict_optimizer` for each optimizer, with `model`'s trainable parameters (those with
    `requires_grad`) and its base parameters (all but the adapters).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> opt = torch.optim.AdamW(m.parameters())          # built before injection
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> restrict_optimizers(m, [opt]); len(opt.param_groups[0]["params"])
        2
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = [p for n, p in model.named_parameters() if not is_lora_key(n)]
    for optimizer in optimizers:
        restrict_optimizer(optimizer, trainable, base)
