"""`add_weighted_adapter`: a new adapter made of existing ones (PEFT's), the math in `lightning_lora.combine`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig
    >>> from lightning_lora.surgery import inject_lora, lora_state_dict
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="fr")
    >>> add_weighted_adapter(m, ["default", "fr"], [0.5, 0.5], "mix", combination_type="cat")
    >>> tuple(lora_state_dict(m, adapter_name="mix")["q_proj.lora_A.weight"].shape)
    (4, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from lightning_lora.combine import check_combination, combine_layer
from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.surgery._paths import _join
from lightning_lora.surgery.adapters import (
    _apply_flags,
    _check_names,
    _record,
    check_adapter_name,
    delete_adapter,
    inject_lora,
)
from lightning_lora.surgery.state import LoRAState, lora_layers


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add adapter `adapter_name` combining `adapters` with `weights` (PEFT's `add_weighted_adapter`, the same
    numbers: `lightning_lora.combine`). It targets every module one of them adapts, has rank `r` per the
    combination type (`cat`: the sum; `*svd`: `svd_rank` or the largest; else the common rank) and
    `lora_alpha = r`; it neither runs nor trains until `set_adapter` (as in PEFT). The `dare_*` types draw
    their random masks from torch's generator as PEFT does: under one `torch.manual_seed`, PEFT's masks.

    Args:
        model: a model with the adapters.
        adapters: names of existing adapters (not DoRA).
        weights: one weight per adapter.
        adapter_name: the new adapter's name.
        combination_type: "svd" (PEFT's default), "linear", "cat", "ties", "ties_svd", "dare_linear",
            "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd".
        svd_rank, svd_clamp, svd_full_matrices, svd_driver: the `*svd` types' options.
        density, majority_sign_method: the pruning types' options.

    Raises:
        LoRAError: unknown names, a taken name, DoRA adapters, or what `combine.check_combination` refuses
            (weights that do not match, unequal ranks for `linear`/`ties`/`dare_*`, a missing density, ...).
    """
    check_adapter_name(adapter_name)
    _check_names(model, list(adapters))
    path, state = _record(model)
    if adapter_name in [state.adapter_name, *state.others]:
        raise LoRAError(f"this model already has an adapter named {adapter_name!r}; choose another adapter_name.")
    records: list[LoRAState] = [state if n == state.adapter_name else state.others[n] for n in adapters]
    dora = [n for n, rec in zip(adapters, records) if rec.config.use_dora]
    if dora:
        raise LoRAError(f"add_weighted_adapter cannot combine DoRA adapters ({dora}), as in PEFT; combine plain "
                        "LoRA adapters.")
    configs = [rec.config for rec in records]
    plan = check_combination([max([c.r, *c.rank_pattern.values()]) for c in configs], list(weights),
                             combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                             svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                             majority_sign_method=majority_sign_method, use_rslora=configs[0].use_rslora)
    root = model.get_submodule(path) if path else model
    targets = [_join(rec.prefix, n) for rec in records for n in rec.adapted]
    config = dataclasses.replace(LoRAConfig(), r=plan.r, alpha=plan.lora_alpha, target_modules=list(dict.fromkeys(
        targets)), use_rslora=configs[0].use_rslora, dropout=configs[0].dropout,
        adapter_dtype=configs[0].adapter_dtype)
    active, trainable = state.active, state.trainable
    inject_lora(root, config, prefix=records[0].prefix, adapter_name=adapter_name)
    state.active, state.trainable = active, trainable  # the new adapter neither runs nor trains (PEFT)
    _apply_flags(root, state)
    try:
        with torch.no_grad():
            for _, layer in lora_layers(root):
                new = layer.adapter_slot(adapter_name)
                if new is None:
                    continue
                present = [(n, w) for n, w in zip(adapters, weights) if layer.adapter_slot(n) is not None]
                sources = [(s.lora_A.weight, s.lora_B.weight, s.scaling)
                           for s in (layer.adapter_slot(n) for n, _ in present)]
                a, b = combine_layer(type(layer), sources, [w for _, w in present], plan)
                new.lora_A.weight.copy_(a.reshape(new.lora_A.weight.shape))
                new.lora_B.weight.copy_(b.reshape(new.lora_B.weight.shape))
                new.scaling = plan.scaling
    except BaseException:
        delete_adapter(root, adapter_name)
        raise


__all__ = ["add_weighted_adapter"]
