"""Which module types take which adapter class: `register_adapter_type`, `adapter_class_for`,
`refusal_reason` (what cannot take an adapter that really runs), `supported_types`,
`unsupported_target_error` and lazy registrations for optional packages.

Adding a layer type is one `LoRALayer` subclass (answering `peft_layer_type`, `fan_in_fan_out`,
`features`, `adapter_shapes`, `delta_from`, `peft_tensor_names`) plus one `register_adapter_type` call.

Example:
    >>> from torch import nn
    >>> adapter_class_for(nn.Embedding(4, 2)).__name__
    'LoRAEmbedding'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_lora.errors import LoRAError
from lightning_lora.layers.attention import LoRAMultiheadAttention
from lightning_lora.layers.base import LoRALayer
from lightning_lora.layers.conv import LoRAConv1d, LoRAConv2d, LoRAConv3d
from lightning_lora.layers.embedding import LoRAEmbedding
from lightning_lora.layers.linear import HFConv1D, LoRAConv1D, LoRALinear

#: base module type -> adapter class (most specific type first when looked up along the MRO)
ADAPTER_TYPES: dict[type[nn.Module], type[LoRALayer]] = {}
#: package -> function registering adapter types for its modules, run the first time a module from that
#: package is looked up (so that e.g. bitsandbytes, slow to import, is never imported for nothing)
_LAZY_REGISTRATIONS: dict[str, Callable[[], None]] = {}


def register_adapter_types_lazily(package: str, register: Callable[[], None]) -> None:
    """Run `register()` (which calls `register_adapter_type`) the first time `adapter_class_for` meets a
    module whose class is defined in `package` (e.g. `"bitsandbytes"`).

    Example:
        >>> register_adapter_types_lazily("my_quant_lib", lambda: None)
    """
    _LAZY_REGISTRATIONS[package] = register


def register_adapter_type(base_type: type[nn.Module], adapter_cls: type[LoRALayer]) -> None:
    """Make modules of `base_type` (and its subclasses) valid LoRA targets, adapted by `adapter_cls`.

    Example:
        >>> class MyLinear(nn.Linear): ...
        >>> adapter_class_for(MyLinear(2, 2)).__name__     # a subclass of nn.Linear already works
        'LoRALinear'
    """
    ADAPTER_TYPES[base_type] = adapter_cls


def adapter_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The adapter class for a module (looked up along its type's MRO), or None if the module's type
    cannot take an adapter (or already is an adapter layer). A subclass of a registered type that
    overrides `forward` is not adapted by the base type's class (what it computes is unknown; see
    `refusal_reason`): register an adapter class for it.

    Example:
        >>> adapter_class_for(nn.Linear(2, 2)).__name__, adapter_class_for(nn.ReLU())
        ('LoRALinear', None)
    """
    if isinstance(module, LoRALayer):
        return None
    package = type(module).__module__.split(".", 1)[0]
    if package in _LAZY_REGISTRATIONS:
        _LAZY_REGISTRATIONS.pop(package)()
    for cls in type(module).__mro__:
        if cls in ADAPTER_TYPES:
            return ADAPTER_TYPES[cls] if type(module).forward is cls.forward else None
    return None


#: parents whose forward reads a child's `.weight` directly instead of calling the child, so an
#: adapter on that child would never run (`F.multi_head_attention_forward(..., out_proj.weight, ...)`)
WEIGHT_READING_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def refusal_reason(module: nn.Module, parent: nn.Module | None = None) -> str | None:
    """Why `module` cannot take an adapter that really runs, or None when it can.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2)
        >>> refusal_reason(mha.out_proj, mha)[:58]
        'its parent MultiheadAttention reads out_proj.weight direct'
    """
    if isinstance(module, LoRALayer):
        return "it already is a LoRA adapter layer"
    if parent is not None and isinstance(parent, WEIGHT_READING_PARENTS):
        child = next((n for n, m in parent.named_children() if m is module), "the child")
        return (f"its parent {type(parent).__name__} reads {child}.weight directly (a functional op), so an adapter "
                "would never run and merging would silently change the model")
    registered = next((cls for cls in type(module).__mro__ if cls in ADAPTER_TYPES), None)
    if registered is not None and registered is not type(module) and type(module).forward is not registered.forward:
        return (f"{type(module).__name__} overrides {registered.__name__}.forward, so what it computes is unknown; "
                "register an adapter class for it with lightning_lora.layers.register_adapter_type")
    cls = adapter_class_for(module)
    if cls is None:
        return f"its type is not one of the supported types ({supported_types()})"
    return cls.base_refusal(module)


def supported_types() -> str:
    """The module types that can take an adapter, for error messages.

    Example:
        >>> supported_types().split(", ")[:3]     # then the quantized layers, once registered
        ['nn.Linear', 'transformers Conv1D', 'nn.Embedding']
    """
    def label(t: type) -> str:
        if t.__module__.startswith("torch.nn"):
            return f"nn.{t.__name__}"
        return f"{t.__module__.split('.')[0]} {t.__name__}"
    return ", ".join(label(t) for t, cls in ADAPTER_TYPES.items() if getattr(cls, "adaptable", True))


def unsupported_target_error(name: str, module: nn.Module, targets: Any, hint: str,
                             parent: nn.Module | None = None, fix: str | None = None) -> LoRAError:
    """The `LoRAError` for a matched module that cannot take an adapter, saying why.

    Example:
        >>> str(unsupported_target_error("act", nn.ReLU(), ["act"], "q_proj"))[:60]
        "target_modules=['act'] matched 'act' of type ReLU, which can"
    """
    reason = refusal_reason(module, parent) or "unknown"
    fix = fix or (f"Name the Linear layers inside it instead, e.g. {hint}." if hint else
                  "Exclude it (exclude_modules) or name other modules.")
    return LoRAError(f"target_modules={targets!r} matched {name!r} of type {type(module).__name__}, which cannot "
                     f"take a LoRA adapter ({reason}); supported types: {supported_types()}. {fix}")


# the layer types of this package; quantized bases (`lightning_lora.quantization`) register theirs when it is
# imported: NF4Linear at once, bitsandbytes' layers lazily (`register_adapter_types_lazily("bitsandbytes", ...)`)
register_adapter_type(nn.Linear, LoRALinear)
if HFConv1D is not None:
    register_adapter_type(HFConv1D, LoRAConv1D)
register_adapter_type(nn.Embedding, LoRAEmbedding)
register_adapter_type(nn.Conv1d, LoRAConv1d)
register_adapter_type(nn.Conv2d, LoRAConv2d)
register_adapter_type(nn.Conv3d, LoRAConv3d)
register_adapter_type(nn.MultiheadAttention, LoRAMultiheadAttention)


__all__ = ["ADAPTER_TYPES", "WEIGHT_READING_PARENTS", "adapter_class_for", "refusal_reason", "register_adapter_type",
           "register_adapter_types_lazily", "supported_types", "unsupported_target_error"]
