"""Adapter statistics of a sharded model (`lora/grad_norm`, `lora/delta_ratio` and the base weight norms
they use), from each rank's shards and one all-reduce; no base weight is gathered. Torch only.

Example:
    >>> from torch import nn
    >>> sharded_grad_norm(nn.Linear(2, 2))
    0.0
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora.fsdp._dist import clean_name, full_tensor, is_fsdp1, local_tensor, sum_over_ranks
from lightning_lora.fsdp.fsdp1 import fsdp1_adapter_state_dict
from lightning_lora.surgery import has_lora, lora_layers, lora_parameters


def sharded_weight_norms(module: nn.Module) -> dict[str, float]:
    """`surgery.weight_norms` for a sharded module: each rank's squared norms of its shards, summed over
    ranks in one all-reduce (every rank must call it). No weight is gathered.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad(): _ = m.q_proj.weight.fill_(1.0)
        >>> _ = inject_lora(m, LoRAConfig(r=1, target_modules=["q_proj"]))
        >>> sharded_weight_norms(m)
        {'q_proj': 2.0}
    """
    layers = list(lora_layers(module))
    sums = sum_over_ranks([local_tensor(layer.weight).detach().double().pow(2).sum().cpu() for _, layer in layers],
                          module)
    return {clean_name(name): float(v.sqrt()) for (name, _), v in zip(layers, sums)}


def _full_adapters(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    if is_fsdp1(module):
        state = fsdp1_adapter_state_dict(module, rank0_only=False)
        return {clean_name(n): (state[f"{clean_name(n)}.lora_A.weight"], state[f"{clean_name(n)}.lora_B.weight"],
                                layer.scaling) for n, layer in lora_layers(module)}
    return {clean_name(n): (full_tensor(layer.lora_A.weight).detach(), full_tensor(layer.lora_B.weight).detach(),
                            layer.scaling) for n, layer in lora_layers(module)}


@torch.no_grad()
def sharded_delta_ratio(module: nn.Module, norms: dict[str, float]) -> float:
    """`surgery.delta_ratio` for a sharded module: the adapters are gathered (small), the base weight norms
    come from `sharded_weight_norms` (every rank must call it).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> sharded_delta_ratio(m, sharded_weight_norms(m))     # B = 0 at the start
        0.0
    """
    ratios = []
    for name, (a, b, scaling) in _full_adapters(module).items():
        a, b = a.float(), b.float()
        delta = scaling * torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0)).item()
        w = norms.get(name, 0.0)
        ratios.append(delta / w if w > 0 else float("inf"))
    return sum(ratios) / len(ratios) if ratios else 0.0


def sharded_grad_norm(module: nn.Module) -> float:
    """`surgery.adapter_grad_norm` for a sharded module: local squared norms of the gradient shards, summed
    over ranks (one all-reduce; every rank must call it).

    Example:
        >>> sharded_grad_norm(nn.Linear(2, 2))
        0.0
    """
    if not has_lora(module):
        return 0.0
    grads = [local_tensor(p.grad).detach().double().pow(2).sum().cpu() for p in lora_parameters(module)
             if p.grad is not None]
    return float(sum_over_ranks([torch.stack(grads).sum()] if grads else [torch.zeros((), dtype=torch.float64)],
                                 module)[0].sqrt())


__all__ = ["sharded_delta_ratio", "sharded_grad_norm", "sharded_weight_norms"]
