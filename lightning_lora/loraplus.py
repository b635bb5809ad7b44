"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B learns faster than A.

LoRA+ gives every `lora_B` a learning rate `ratio` times that of `lora_A` (the paper suggests 16).
Parameters are sorted as PEFT's `create_loraplus_optimizer` sorts them:

* `"embedding"`: the adapters of an embedding layer, at the fixed rate `lr_embedding` (PEFT's
  default 1e-6);
* `"B"`: every `lora_B` and every trainable 1-D parameter (DoRA magnitudes, trained biases, norm
  weights in `modules_to_save`), at `ratio x lr`;
* `"A"`: everything else (`lora_A`, 2-D `modules_to_save` weights), at `lr`.

Two ways in:

* `loraplus_param_groups(model, lr=..., ratio=...)` returns parameter groups for an optimizer you
  build yourself (`torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4, ratio=16))`);
* `apply_loraplus(model, optimizers, schedulers, ratio)` splits the groups of optimizers that already
  exist (the `LoRA` callback does this at `on_fit_start` when `loraplus_lr_ratio` is set, whatever
  `configure_optimizers` or LightningCLI built). Each group becomes up to three groups (A, B,
  embedding; empty ones are left out) that keep the group's other options (weight decay, betas,
  ...), in a fixed order, so a resumed run's optimizer state fits them; the learning-rate entries of
  the group (`lr`, `initial_lr`, `max_lr`, `min_lr`) are scaled, and every scheduler of the optimizer
  gets its per-group lists (`base_lrs`, `_last_lr`, `lr_lambdas`, `min_lrs`, ...) expanded to match.
  Options that must be unique per group (`name`, which `LearningRateMonitor` logs under) stay on the A
  part and get a suffix on the others (`"decoder"` -> `"decoder/lora_B"`, `"decoder/embedding"`).
  Groups that carry a `"loraplus"` entry were split already and are left alone.

Unlike PEFT's `create_loraplus_optimizer`, which builds a new optimizer with `weight_decay` set to
its own `loraplus_weight_decay` (0.0), the groups keep the weight decay they had.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(8, 8))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> opt = torch.optim.AdamW(loraplus_param_groups(m, lr=1e-3, ratio=16))
    >>> [(g["loraplus"], g["lr"]) for g in opt.param_groups]
    [('A', 0.001), ('B', 0.016)]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_lora.errors import LoRAConfigError
from lightning_lora.layers import LoRAEmbedding
from lightning_lora.surgery import lora_layers, lora_parameters

#: the kinds of parameter, in the order their groups appear
KINDS = ("A", "B", "embedding")
#: keys of a param group that hold learning rates (scaled with the group's lr)
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: scheduler attributes holding one value per param group, and those of them that are learning rates
SCHEDULER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums",
                         "max_momentums")
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
#: keys of a param group whose value must be unique among an optimizer's groups (`LearningRateMonitor`
#: refuses duplicated names): the A part keeps the value, the others get the kind's suffix
UNIQUE_GROUP_KEYS = ("name",)
#: the suffix of a unique group option per kind (PEFT's `lora_B` / `embedding` naming)
KIND_SUFFIX = {"A": "", "B": "/lora_B", "embedding": "/embedding"}
#: the entry LoRA+ adds to each param group it builds (its kind)
GROUP_TAG = "loraplus"


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or ratio == float("inf"):
        raise LoRAConfigError(f"loraplus_lr_ratio={ratio!r} is invalid; expected a finite number > 0 (B's learning "
                              "rate is ratio x A's; the LoRA+ paper uses 16).")


def parameter_kinds(model: nn.Module) -> dict[int, str]:
    """`id(parameter) -> "A" | "B" | "embedding"` for every trainable parameter of `model` (PEFT's rule).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> sorted(parameter_kinds(m).values())
        ['A', 'B']
    """
    embedding = {id(p) for _, layer in lora_layers(model) if isinstance(layer, LoRAEmbedding)
                 for p in (layer.lora_A.weight, layer.lora_B.weight)}
    kinds: dict[int, str] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            kinds[id(param)] = "embedding"
        elif ".lora_B." in f".{name}" or param.ndim == 1:
            kinds[id(param)] = "B"
        else:
            kinds[id(param)] = "A"
    return kinds


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, lr_embedding: float = 1e-6,
                          **options: Any) -> list[dict[str, Any]]:
    """Parameter groups for an optimizer over `lora_parameters(model)`: A at `lr`, B at `ratio * lr`,
    embedding adapters at `lr_embedding` (empty groups left out).

    Args:
        model: a model with adapters.
        lr: A's learning rate.
        ratio: B's learning rate over A's (> 0).
        lr_embedding: learning rate of embedding adapters.
        **options: other entries for every group (e.g. `weight_decay=0.0`); a `name` gets the kind's
            suffix on the B and embedding groups (`unique_options`).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> [(g["loraplus"], g["lr"], len(g["params"])) for g in loraplus_param_groups(m, lr=0.01, ratio=4)]
        [('A', 0.01, 1), ('B', 0.04, 1)]
    """
    _check_ratio(ratio)
    kinds = parameter_kinds(model)
    rates = {"A": lr, "B": lr * ratio, "embedding": lr_embedding}
    groups = []
    for kind in KINDS:
        params = [p for p in lora_parameters(model) if kinds.get(id(p)) == kind]
        if params:
            groups.append({**options, **unique_options(options, kind), "params": params, "lr": rates[kind],
                           GROUP_TAG: kind})
    return groups


def unique_options(group: dict[str, Any], kind: str) -> dict[str, Any]:
    """The options of `group` for its `kind` part: every `UNIQUE_GROUP_KEYS` entry that is a string gets
    the kind's suffix (`KIND_SUFFIX`), so the parts of one group never share a name.

    Example:
        >>> unique_options({"name": "decoder", "weight_decay": 0.1}, "B")
        {'name': 'decoder/lora_B'}
        >>> unique_options({"name": "decoder"}, "A")
        {'name': 'decoder'}
    """
    return {key: group[key] + KIND_SUFFIX[kind] for key in UNIQUE_GROUP_KEYS if isinstance(group.get(key), str)}


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        return value
    return value * factor


def split_param_groups(optimizer: torch.optim.Optimizer, kinds: dict[int, str], ratio: float,
                       lr_embedding: float = 1e-6,
                       schedulers: Iterable[Any] = ()) -> list[tuple[int, float]]:
    """Split every param group of `optimizer` into its A, B and embedding parts (see the module doc),
    and expand the per-group lists of `schedulers` (those of this optimizer) to match.

    Args:
        optimizer: any `torch.optim.Optimizer`.
        kinds: `parameter_kinds(model)`; parameters not in it count as A.
        ratio: B's learning rate over A's.
        lr_embedding: the base learning rate of embedding adapters.
        schedulers: learning-rate schedulers; those whose `optimizer` is `optimizer` are updated.

    Returns:
        For each new group, `(index of the group it came from, factor of its learning rates)`; empty
        when the groups were split before (they carry a `"loraplus"` entry).

    Example:
        >>> a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))
        >>> opt = torch.optim.SGD([a, b], lr=0.1)
        >>> split_param_groups(opt, {id(b): "B"}, ratio=4)
        [(0, 1.0), (0, 4.0)]
        >>> [g["lr"] for g in opt.param_groups]
        [0.1, 0.4]
    """
    _check_ratio(ratio)
    old = list(optimizer.param_groups)
    if any(GROUP_TAG in g for g in old):
        return []
    new: list[dict[str, Any]] = []
    origin: list[tuple[int, float]] = []
    for index, group in enumerate(old):
        buckets: dict[str, list[Any]] = {k: [] for k in KINDS}
        for p in group["params"]:
            buckets[kinds.get(id(p), "A")].append(p)
        reference = group.get("initial_lr", group["lr"])
        for kind in KINDS:
            if not buckets[kind] and not (kind == "A" and not group["params"]):
                continue  # an empty group stays (as "A"), so schedulers keep one entry for it
            if kind == "A":
                factor = 1.0
            elif kind == "B":
                factor = float(ratio)
            else:
                factor = lr_embedding / float(reference) if float(reference) != 0 else 1.0
            split = {k: (_scaled(v, factor) if k in GROUP_LR_KEYS else v) for k, v in group.items() if k != "params"}
            split.update(unique_options(group, kind))
            split["params"] = buckets[kind]
            split[GROUP_TAG] = kind
            new.append(split)
            origin.append((index, factor))
    optimizer.param_groups[:] = new
    for scheduler in schedulers:
        _expand_scheduler(scheduler, optimizer, len(old), origin)
    return origin


def _expand_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, n_old: int,
                      origin: Sequence[tuple[int, float]]) -> None:
    for inner in getattr(scheduler, "_schedulers", None) or ():  # SequentialLR, ChainedScheduler
        _expand_scheduler(inner, optimizer, n_old, origin)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    for name in SCHEDULER_GROUP_LISTS:
        values = getattr(scheduler, name, None)
        if not isinstance(values, (list, tuple)) or len(values) != n_old:
            continue
        scale = name in SCHEDULER_LR_LISTS
        expanded = [_scaled(values[i], f) if scale else values[i] for i, f in origin]
        setattr(scheduler, name, type(values)(expanded) if isinstance(values, tuple) else expanded)


def apply_loraplus(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], schedulers: Iterable[Any],
                   ratio: float, lr_embedding: float = 1e-6) -> None:
    """`split_param_groups` for every optimizer, with `model`'s parameter kinds (the `LoRA` callback
    calls this at fit start when `loraplus_lr_ratio` is set, after restricting the optimizers).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> opt = torch.optim.AdamW(lora_parameters(m), lr=1e-3)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        >>> apply_loraplus(m, [opt], [sched], ratio=16)
        >>> [g["lr"] for g in opt.param_groups], len(sched.base_lrs)
        ([0.001, 0.016], 2)
    """
    kinds = parameter_kinds(model)
    schedulers = list(schedulers)
    for optimizer in optimizers:
        split_param_groups(optimizer, kinds, ratio, lr_embedding, schedulers)


__all__ = ["GROUP_TAG", "KIND_SUFFIX", "UNIQUE_GROUP_KEYS", "apply_loraplus", "loraplus_param_groups",
           "parameter_kinds", "split_param_groups", "unique_options"]
