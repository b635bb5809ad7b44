"""Counts and adapter statistics: trainable vs total parameters (`count_parameters`, the
`parameter_summary` table), base weight norms, the adapters' relative size (`delta_ratio`), their
gradient norm, and `AdapterProbe` (which adapters ran).

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4, bias=False))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> count_parameters(m), delta_ratio(m)
    ((16, 32), 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.surgery._paths import _join
from lightning_lora.surgery.state import lora_layers, lora_parameters, lora_states, saved_keys, trainable_keys


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (tied parameters counted once).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4096, 4096, bias=False))
        >>> _ = inject_lora(m, LoRAConfig(r=8, target_modules=["q_proj"]))
        >>> count_parameters(m)
        (65536, 16842752)
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@dataclass
class LayerRow:
    """One row of `parameter_summary`: a group of adapted layers of the same name and shape.

    Attributes:
        name: last path component (`q_proj`); shape: `(out, in)`; count: layers in the group;
        r: rank; full: parameters of their weights; lora: parameters of their adapters.
    """

    name: str
    shape: tuple[int, int]
    count: int
    r: int
    full: int
    lora: int


@dataclass
class ParameterSummary:
    """Trainable vs total parameters, with the adapted layers grouped by name and shape.
    `str(summary)` is the printable table.

    Attributes:
        trainable, total: parameter counts (tied parameters once).
        rows: one `LayerRow` per group of adapted layers.
        skipped: subtrees left alone (e.g. a frozen teacher).
        saved: `(path, parameters)` of the modules trained fully (`modules_to_save`, task heads).
        carried: base tensors saved with the adapter (embedding matrices of a resized vocabulary).
    """

    trainable: int
    total: int
    rows: list[LayerRow]
    skipped: list[str] = field(default_factory=list)
    saved: list[tuple[str, int]] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        """`100 * trainable / total`."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = f"{'layer':<24} {'shape':>13} {'x':>4} {'r':>4} {'full params':>15} {'LoRA params':>13} {'LoRA/full':>9} {'reduction':>9}"
        lines = [head, "-" * len(head)]
        for row in self.rows:
            pct = 100.0 * row.lora / row.full
            lines.append(f"{row.name:<24} {f'{row.shape[0]} x {row.shape[1]}':>13} {row.count:>4} {row.r:>4} "
                         f"{row.full:>15,} {row.lora:>13,} {pct:>8.2f}% {100 - pct:>8.1f}%")
        lines.append("-" * len(head))
        for path, count in self.saved:
            lines.append(f"trained fully (modules_to_save): {path} ({count:,} parameters)")
        if self.carried:
            lines.append(f"saved with the adapter (resized vocabulary): {', '.join(self.carried)}")
        if self.skipped:
            lines.append(f"left alone (frozen before setup): {', '.join(self.skipped)}")
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.trainable_percent:.4f}%)")
        return "\n".join(lines)


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Per adapted layer group: full parameters of the weight vs LoRA parameters, and the totals.

    For one 4096 x 4096 projection at r=8 the row reads 16,777,216 vs 65,536 (0.39%, 99.6% fewer).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4096, 4096, bias=False))
        >>> _ = inject_lora(m, LoRAConfig(r=8, target_modules=["q_proj"]))
        >>> print(parameter_summary(m))  # doctest: +ELLIPSIS
        layer ...
        q_proj                     4096 x 4096    1    8      16,777,216        65,536     0.39%     99.6%
        ...
    """
    groups: dict[tuple[str, tuple[int, int], int], LayerRow] = {}
    for name, layer in lora_layers(model):
        shape = (layer.lora_B.weight.shape[0], layer.lora_A.weight.shape[1])  # (out, in)
        key = (name.rsplit(".", 1)[-1], shape, layer.r)
        row = groups.setdefault(key, LayerRow(key[0], shape, 0, layer.r, 0, 0))
        row.count += 1
        row.full += layer.weight.numel()
        row.lora += layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
        row.lora += sum(v.extra_parameters(*type(layer).features(layer), layer.r) for v in layer.variants)
    trainable, total = count_parameters(model)
    states = lora_states(model)
    skipped = [_join(path, s) for path, state in states for s in state.skipped]
    saved = [(_join(path, m), sum(p.numel() for p in model.get_submodule(_join(path, m)).parameters()))
             for path, state in states for m in state.modules_to_save]
    carried = [k for k in (saved_keys(model) if states else []) if k not in set(trainable_keys(model))]
    return ParameterSummary(trainable, total, list(groups.values()), skipped, saved, carried)


def forget_dora_norms(model: nn.Module) -> None:
    """Make every DoRA layer of `model` recompute its weight norm at its next call: needed only after
    weights were written through `.data` (which torch's version counters do not see) while the model
    runs without autograd (the DoRA variant keeps the norm there; `LoRALayer.forget_cached`).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
        >>> m.q_proj.lora_B.weight.data.fill_(0.1) is not None
        True
        >>> forget_dora_norms(m)
    """
    for _, layer in lora_layers(model):
        layer.forget_cached()


def weight_norms(model: nn.Module) -> dict[str, float]:
    """`||W||_F` (float32) of every adapted layer's base weight, by layer path.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad(): _ = m.q_proj.weight.fill_(1.0)
        >>> _ = inject_lora(m, LoRAConfig(r=1, target_modules=["q_proj"]))
        >>> weight_norms(m)
        {'q_proj': 2.0}
    """
    return {name: layer.weight_norm() for name, layer in lora_layers(model)}


@torch.no_grad()
def delta_ratio(model: nn.Module, norms: dict[str, float] | None = None) -> float:
    """Mean over adapted layers of `||scaling B A||_F / ||W||_F`, computed from r x r products
    (`||B A||_F^2 = sum((B^T B) * (A A^T))`), so no out x in matrix is formed. With several adapters, over the
    adapters that train (else those that run) of each layer.

    Args:
        model: a model with adapters.
        norms: `weight_norms(model)` computed earlier (the base weights do not change in training).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> delta_ratio(m)      # B = 0 at the start
        0.0
    """
    ratios = []
    for name, layer in lora_layers(model):
        w = (norms or {}).get(name) or layer.weight_norm()
        for adapter in _measured_adapters(layer):
            delta = type(layer).delta_norm(adapter)  # type: ignore[arg-type]
            ratios.append(delta / w if w > 0 else math.inf)
    return sum(ratios) / len(ratios) if ratios else 0.0


def _measured_adapters(layer: nn.Module) -> list[nn.Module]:
    """The adapters of a layer that `delta_ratio` measures: those that train, else those that run (one adapter:
    the layer itself)."""
    held = [layer.adapter_slot(n) for n in layer.adapter_names()]
    return ([a for a in held if a.lora_A.weight.requires_grad]
            or [a for a in (layer.adapter_slot(n) for n in layer.active_adapter_names()) if a is not None])


def adapter_grad_norm(model: nn.Module) -> float:
    """The global L2 norm of the gradients of `lora_parameters(model)` (0.0 when none has one).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> adapter_grad_norm(m)
        0.0
    """
    grads = [p.grad.detach().float().norm() for p in lora_parameters(model) if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


class AdapterProbe:
    """Notes which adapter layers of `model` run until `close()` (forward pre-hooks on the layers;
    the adapter paths do not change). An adapter that never runs never trains: its parent reads its
    `.weight` directly, or no input reached it.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4)); m.add_module("k_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]))
        >>> probe = AdapterProbe(m); _ = m.q_proj(torch.zeros(1, 4)); probe.close()
        ['k_proj']
    """

    def __init__(self, model: nn.Module) -> None:
        layers: list[tuple[str, nn.Module]] = []
        for name, layer in lora_layers(model):  # an adapter inside another (an attention's out_proj) runs with it
            if not any(name.startswith(outer + ".") for outer, _ in layers):
                layers.append((name, layer))
        self.ran = {name: False for name, _ in layers}
        self._handles = [layer.register_forward_pre_hook(lambda *_, name=name: self.ran.__setitem__(name, True))
                         for name, layer in layers]

    def close(self) -> list[str]:
        """Remove the hooks; returns the paths of the adapter layers that did not run."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return [name for name, ran in self.ran.items() if not ran]
