"""The adapters of a layer beside its first: `AdapterSlot`, and what a layer with several adapters computes.

A `LoRALayer` holds its first adapter itself (`lora_A`, `lora_B`, `lora_dropout`, the variants' tensors: the
keys one adapter has always had) and every other adapter in an `AdapterSlot` under
`lora_adapters.<name>` (keys `<path>.lora_adapters.<name>.lora_A.weight`). A slot holds what makes one
adapter (A, B, dropout, rank, scaling, variants and their tensors) and reads everything else (the base
weight, the layer type's constants) from its layer, so the layer type's and the variants' own code computes
and merges a slot as it does the layer's first adapter. The layer's output is the base's with each active
adapter applied in turn (`slot_output`: plus `scaling * B A dropout(x)`, or DoRA's rescaling of the output so
far), as PEFT's `LoraLayer.forward` with several active adapters computes it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora.layers import LoRALinear
    >>> layer = LoRALinear(nn.Linear(4, 3), r=2, alpha=2)
    >>> slot = layer.add_adapter("fr", r=1, alpha=4)
    >>> sorted(k for k in layer.state_dict() if "lora" in k)
    ['lora_A.weight', 'lora_B.weight', 'lora_adapters.fr.lora_A.weight', 'lora_adapters.fr.lora_B.weight']
    >>> slot.scaling, layer.adapter_names()
    (4.0, ['default', 'fr'])
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.errors import LoRAError
from lightning_lora.variants import resolve_variants

#: the name `mixed_batch` gives rows that run no adapter (PEFT's)
BASE_ROWS = "__base__"
#: an adapter's own plain attributes (the modules `lora_A`, `lora_B`, `lora_dropout` and the variants' tensors
#: are its own too): what a layer's first adapter and a slot both hold, and what moves when a slot becomes first
ADAPTER_ATTRS: tuple[str, ...] = ("r", "lora_alpha", "use_rslora", "scaling", "init", "use_dora", "variants",
                                  "_forward_variant", "_merge_variant", "_dora_merge_norm", "_dora_norm_cache")
ADAPTER_MODULES: tuple[str, ...] = ("lora_A", "lora_B", "lora_dropout")


def set_up_adapter(target: nn.Module, host: nn.Module, base: nn.Module, in_features: int, out_features: int,
                   r: int, alpha: float, dropout: float, use_rslora: bool, init: str,
                   adapter_dtype: torch.dtype | None, use_dora: bool, **variant_fields: Any) -> None:
    """Give `target` (a layer's first adapter: the layer itself; or an `AdapterSlot`) its A, B, dropout, scaling
    and variants, initialised (`host`: the layer, whose type says how; `base`: the base module, for errors).

    Raises:
        LoRAError: `r` is not a positive integer; LoRAConfigError: a variant does not implement the layer type.
    """
    layer_cls = type(host)
    variants = resolve_variants(layer_cls, base, use_dora=use_dora, init=init, **variant_fields)
    if r <= 0:
        raise LoRAError(f"r={r} is invalid; expected an integer > 0.")
    weight = layer_cls.base_weight(base)
    dtype = adapter_dtype if adapter_dtype is not None else weight.dtype
    target.keep_adapter_dtype = adapter_dtype is not None
    target.r = int(r)
    target.lora_alpha = float(alpha)
    target.use_rslora = bool(use_rslora)
    target.scaling = target.lora_alpha / (math.sqrt(target.r) if use_rslora else target.r)
    target.lora_A, target.lora_B = host.adapter_modules(in_features, out_features, target.r, weight.device, dtype)
    target.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    target.merged = False
    target.init = init
    target.use_dora = bool(use_dora)
    target.variants = variants
    target._forward_variant = next((v for v in variants if v.owns_forward), None)
    target._merge_variant = next((v for v in variants if v.owns_merge), None)
    if not any(v.sets_adapters for v in variants):
        layer_cls.reset_lora_parameters(target, init)  # type: ignore[arg-type]
    for variant in sorted(variants, key=lambda v: not v.sets_adapters):  # those that set A, B first
        variant.init(target, dtype)


class AdapterMerge:
    """How one adapter is folded into a weight and out again, for a layer's first adapter (`LoRALayer`) and for an
    `AdapterSlot` alike: `W + delta` in float32 written in the weight's dtype, or the variant's (DoRA rescales it).
    """

    _merge_variant: Any = None

    def merged_weight(self, weight: torch.Tensor, delta: torch.Tensor,
                      unmerged: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight from the dense base `weight` and `delta`, in `weight`'s dtype: `W + delta`
        (computed in float32), or the variant's (DoRA rescales it; `unmerged`: the weight before the layer's
        other adapters were merged into it, see `LoRAVariant.merged_weight`).

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> layer = LoRALinear(nn.Linear(2, 2), r=1, alpha=1)
            >>> layer.merged_weight(torch.zeros(2, 2), torch.ones(2, 2)).tolist()
            [[1.0, 1.0], [1.0, 1.0]]
        """
        if self._merge_variant is not None:
            return self._merge_variant.merged_weight(self, weight, delta, unmerged)
        return (weight.float() + delta.to(weight.device)).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Undo `merged_weight`: `W - delta` (in float32), or the variant's."""
        if self._merge_variant is not None:
            return self._merge_variant.unmerged_weight(self, weight, delta)
        return (weight.float() - delta.to(weight.device)).to(weight.dtype)


class AdapterSlot(AdapterMerge, nn.Module):
    """One named adapter of a `LoRALayer` beside its first: `lora_A`, `lora_B`, `lora_dropout`, the variants'
    tensors (DoRA's `lora_magnitude_vector`) and `r`, `lora_alpha`, `scaling`, `variants`. Every other
    attribute (the base weight, `fan_in_fan_out`, the layer's methods) is read from its layer, which is not a
    submodule of the slot. Built by `LoRALayer.add_adapter`.

    Example:
        >>> from lightning_lora.layers import LoRALinear
        >>> layer = LoRALinear(nn.Linear(4, 3), r=2, alpha=2)
        >>> slot = layer.add_adapter("fr", r=1, alpha=1)
        >>> tuple(slot.lora_A.weight.shape), slot.weight is layer.weight
        ((1, 4), True)
    """

    _dora_merge_norm: torch.Tensor | None = None
    _dora_norm_cache: Any = None

    def __init__(self, host: nn.Module, **options: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_host", host)  # not a submodule: the layer holds the slot, not the reverse
        base = host.to_base_module()
        in_features, out_features = type(host).features(base)
        set_up_adapter(self, host, base, in_features, out_features, **options)
        self.train(host.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_host"], name)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype this adapter's products run in for `x` (the layer's policy, this adapter's dtype)."""
        return type(self._host).compute_dtype(self, x)  # type: ignore[arg-type]

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in float32 in the layout of the base weight (the layer type's `delta_from`)."""
        return type(self._host).delta_from(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterSlot:
        """Every tensor of a slot is an adapter tensor: with an explicit adapter dtype, casts leave it alone
        and device moves reach it (as `LoRALayer._apply` does for the first adapter)."""
        if not self.keep_adapter_dtype:
            return super()._apply(fn, recurse)

        def device_only(t: torch.Tensor) -> torch.Tensor:
            probe = fn(t.new_zeros(()))
            return fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)

        return super()._apply(device_only, recurse)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for variant in self.variants:
            variant.load_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forget_cached(self) -> None:
        """Drop what the variants keep between calls (DoRA's weight norm)."""
        for variant in self.variants:
            variant.forget_cache(self)

    def extra_repr(self) -> str:
        extra = "".join(variant.extra_repr() for variant in self.variants)
        return f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}, merged={self.merged}{extra}"


def slot_output(layer: nn.Module, slot: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The output so far, `result`, with adapter `slot` (the layer itself for its first adapter) applied for input
    `x`: plus `scaling * B A dropout(x)` by the layer type's `adapter_forward` (its modules' hooks run), or what
    the variant that computes the whole output makes of it (DoRA rescales `result`, the earlier adapters'
    changes included, as PEFT's forward with several active adapters does); in `result`'s dtype."""
    variant = slot._forward_variant
    if variant is not None:
        return variant.forward(slot, x, result)
    return result + type(layer).adapter_forward(slot, x).to(result.dtype)  # type: ignore[arg-type]


class MixedRows:
    """The adapter of each row inside `mixed_batch`, shared by every layer: the rows of each adapter as an index
    tensor are built once per device (not once per layer and call)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._groups: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """`(name, rows)` for each adapter named, in order of first appearance (`BASE_ROWS` left out)."""
        if device not in self._groups:
            self._groups[device] = [
                (name, torch.tensor([i for i, n in enumerate(self.names) if n == name], device=device))
                for name in dict.fromkeys(self.names) if name != BASE_ROWS]
        return self._groups[device]


def mixed_forward(layer: nn.Module, x: torch.Tensor, base: torch.Tensor, names: MixedRows) -> torch.Tensor:
    """`base` plus, on row `i`, the delta of adapter `names[i]` (`BASE_ROWS` or an adapter this layer lacks: none):
    each adapter computes on its rows only (`index_select`), and its delta is added back with `index_add`, so the
    gradient of each adapter is the one it gets from its rows alone (PEFT's `_mixed_batch_forward`).

    Raises:
        LoRAError: the number of names is not the number of rows.
    """
    if x.shape[0] != len(names):
        raise LoRAError(f"mixed_batch was given {len(names)} adapter names (rows_per_name included) for a batch of "
                        f"{x.shape[0]} rows; pass one name per row (\"__base__\" for a row without an adapter), and "
                        "for generate rows_per_name=num_beams (or num_return_sequences).")
    result = base
    for name, rows in names.groups(x.device):
        slot = layer.adapter_slot(name)
        if slot is None:
            continue
        mine = base.index_select(0, rows)
        result = result.index_add(0, rows, slot_output(layer, slot, x.index_select(0, rows), mine) - mine)
    return result


def swap_adapters(layer: nn.Module, slot: nn.Module) -> None:
    """Exchange what makes an adapter (modules, attributes, variant tensors) between a layer and a slot."""
    for attr in ADAPTER_MODULES:
        layer._modules[attr], slot._modules[attr] = slot._modules[attr], layer._modules[attr]
    missing = object()
    for attr in (*ADAPTER_ATTRS, "keep_adapter_dtype"):  # not `merged`: it says what the weight holds
        a, b = layer.__dict__.pop(attr, missing), slot.__dict__.pop(attr, missing)
        if b is not missing:
            setattr(layer, attr, b)
        if a is not missing:
            setattr(slot, attr, a)
    for tname in layer.ADAPTER_TENSORS:
        for store in ("_parameters", "_buffers"):
            a, b = getattr(layer, store).pop(tname, missing), getattr(slot, store).pop(tname, missing)
            if b is not missing:
                getattr(layer, store)[tname] = b
            if a is not missing:
                getattr(slot, store)[tname] = a


class SeveralAdapters:
    """What a `LoRALayer` does with several adapters (a base class of it): add, list, activate and delete them,
    and the forward through the active ones or per row (`mixed_batch`)."""

    #: the name of the layer's first adapter (held by the layer itself; the others are in `lora_adapters`)
    adapter_name: str = "default"
    #: the adapters that run, when not just the first (None: the first alone, the fused paths apply)
    _active: tuple[str, ...] | None = None
    #: the adapter of each row inside `mixed_batch` (None outside)
    _mixed: MixedRows | None = None
    #: the adapters merged into the base weight with several adapters, in merge order (None: the first alone, or
    #: nothing merged; `()`: a merge while none of the layer's adapters was active)
    _merged_names: tuple[str, ...] | None = None
    #: whether this layer type can hold several adapters (quantized bases and parameter adapters cannot yet)
    several_adapters: ClassVar[bool] = True

    def _slots(self) -> dict[str, AdapterSlot]:
        slots = self._modules.get("lora_adapters")
        return dict(slots.items()) if slots is not None else {}

    def adapter_names(self) -> list[str]:
        """The names of this layer's adapters: its first, then the others in the order they were added.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear(nn.Linear(2, 2), r=1, alpha=1).adapter_names()
            ['default']
        """
        return [self.adapter_name, *self._slots()]

    def adapter_slot(self, name: str) -> nn.Module | None:
        """What holds adapter `name`: the layer itself for its first adapter, its `AdapterSlot` for another, None
        when this layer has no adapter of that name."""
        if name == self.adapter_name:
            return self
        return self._slots().get(name)

    def active_adapter_names(self) -> list[str]:
        """The adapters of this layer that run (in the order they were set)."""
        return [self.adapter_name] if self._active is None else list(self._active)

    def add_adapter(self, name: str, **options: Any) -> AdapterSlot:
        """Add adapter `name` beside the existing ones (`options`: the constructor's `r`, `alpha`, `dropout`,
        `use_rslora`, `init`, `adapter_dtype`, `use_dora`, variant fields); it does not run until activated
        (`set_active_adapters`).

        Raises:
            LoRAError: the name is taken, the layer type cannot hold several adapters, or the layer is merged.
        """
        if name in self.adapter_names():
            raise LoRAError(f"this layer already has an adapter named {name!r}; choose another adapter_name.")
        if not self.several_adapters:
            raise LoRAError(f"a {type(self).__name__} holds one adapter only; adapter {name!r} cannot be added "
                            "(several adapters are supported on dense Linear, Conv1D, Embedding and Conv layers).")
        if self.merged:
            raise LoRAError(f"cannot add adapter {name!r} to a merged layer; unmerge_adapter(model) first.")
        options = {"dropout": 0.0, "use_rslora": False, "init": "kaiming", "adapter_dtype": torch.float32,
                   "use_dora": False, **options}
        slot = AdapterSlot(self, **options)
        if "lora_adapters" not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        self.lora_adapters[name] = slot
        return slot

    def set_active_adapters(self, names: list[str] | tuple[str, ...]) -> None:
        """Run the adapters of `names` that this layer has (in that order; none: the base)."""
        own = [n for n in names if self.adapter_slot(n) is not None]
        self._active = None if own == [self.adapter_name] else tuple(own)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`; deleting the first adapter makes the next one first (its tensors move to the
        layer's own `lora_A`/`lora_B`, the keys one adapter has).

        Raises:
            LoRAError: no such adapter, it is the only one (use `unload` / `merge_and_unload`), or it is merged.
        """
        if self.adapter_slot(name) is None:
            raise LoRAError(f"this layer has no adapter {name!r}; it has {self.adapter_names()}.")
        if self.merged:
            raise LoRAError(f"cannot delete adapter {name!r} of a merged layer; unmerge_adapter(model) first.")
        slots = self._slots()
        if name != self.adapter_name:
            del self.lora_adapters[name]
        elif not slots:
            raise LoRAError(f"{name!r} is this layer's only adapter; remove the layer with unload(model) or "
                            "merge_and_unload(model).")
        else:
            first, slot = next(iter(slots.items()))
            swap_adapters(self, slot)  # the next adapter becomes the layer's own; the deleted one leaves with the slot
            del self.lora_adapters[first]
            self.adapter_name = first
        if not self._slots() and "lora_adapters" in self._modules:
            del self.lora_adapters
        if self._active is not None:
            self.set_active_adapters([n for n in self._active if n != name])

    def _several_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus the delta of every active adapter (`slots.slot_delta`), or per row inside
        `mixed_batch` (`slots.mixed_forward`); plain ops, never the fused paths."""
        base = self.base_forward(x)
        if self._mixed is not None:
            return mixed_forward(self, x, base, self._mixed)
        result = base
        for name in self.active_adapter_names():
            result = slot_output(self, self.adapter_slot(name), x, result)
        return result


__all__ = ["ADAPTER_ATTRS", "ADAPTER_MODULES", "BASE_ROWS", "AdapterMerge", "AdapterSlot", "MixedRows", "SeveralAdapters", "mixed_forward",
           "set_up_adapter", "slot_output", "swap_adapters"]
