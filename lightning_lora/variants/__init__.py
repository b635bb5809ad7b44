"""Adapter variants: objects that change what a LoRA layer computes, resolved once per layer.

A variant (DoRA, the base-changing inits PiSSA / OLoRA, the ones to come) is a `LoRAVariant`
(`variants.base`): the adapter layer asks `resolve_variants` in its constructor which variants its
`LoRAConfig` fields select, keeps them in `layer.variants` and delegates to them; `LoRALayer` itself
holds no variant branches. What a variant answers (each with plain LoRA's answer as the default):

- **selection**: `name`, `config_fields` (the `LoRAConfig` fields that select it) and
  `from_config(**fields)` (an instance, or None); `option()` (how a user wrote it, for messages);
- **layer types**: `layer_types` (the adapter classes' `peft_layer_type` values it implements);
  `unsupported_error(base)` (the `LoRAConfigError` for any other type, raised by `resolve_variants`);
- **tensors**: `extra_tensors(in, out, r)` (`ExtraTensor`: name on the layer, shape, PEFT key or None
  when never written to PEFT files, trainable or buffer); `extra_parameters(in, out, r)` (trainable
  values for the memory estimate, times the adapter dtype's size); `peft_conversion` (A, B and alpha as
  written to PEFT files for variants whose tensors have no PEFT key);
- **lifecycle**: `init(layer, dtype)` after A and B exist (`sets_adapters`: it writes A and B itself,
  and runs before the others); `load_state` (before the layer loads a state dict); `restore_base`
  (`unload`: the original weight back);
- **forward**: `owns_forward` and `forward(layer, x, base_out)` (else the layer's plain / fused adapter
  paths), `disabled_forward(layer, x, base_out)` (adapters disabled), `forget_cache`;
- **merge**: `owns_merge`, `merged_weight(layer, W, delta)` / `unmerged_weight(layer, W, delta)` from
  the dense base weight and the layer type's `delta_from(A, B, scaling)` (else `W + delta` / `W - delta`;
  a quantized base dequantises first, so QDoRA uses the same merge), `discard_merge`, `merge_record` /
  `load_merge_record` (what a reversible merge keeps);
- `extra_repr()` (its part of the layer's repr).

Variants combine where the code allows it today: DoRA with PiSSA/OLoRA (the magnitude starts from
the residual base); both refuse embeddings; a quantized base refuses PiSSA/OLoRA (the config, or
`pissa.check_weight` for a bitsandbytes model).

Where the existing variants live:

| variant | file | `LoRAConfig` field | extra tensors (ours -> PEFT) |
| --- | --- | --- | --- |
| DoRA / QDoRA | `variants/dora.py` (`DoRA`) | `use_dora` | `lora_magnitude_vector` -> `lora_magnitude_vector` |
| PiSSA / OLoRA | `variants/pissa.py` (`BaseChangingInit`) | `init` | `lora_init_A`, `lora_init_B` -> none (plain LoRA at rank 2r) |

How to add a variant: one file, one `LoRAConfig` field, one row of the conformance table.

1. A new module `lightning_lora/variants/<name>.py` with its math and a `LoRAVariant` subclass that
   overrides what it changes (see the list above; `variants/dora.py` is the model to follow).
2. A `LoRAConfig` field that selects it (validated in `LoRAConfig.__post_init__`), named in the
   class's `config_fields`; add the class to `VARIANTS` below and the field to `resolve_variants`'s
   callers (`inject_lora` passes every `config_fields` entry).
3. One row in `tests/test_conformance.py` (`LoRAConfig` overrides selecting it): the conformance
   checks (step 0, merge / unmerge, state-dict superset, checkpoints, PEFT round trip, dtype policy)
   and `tests/test_variants.py`'s protocol check (every extra tensor exists with its declared shape
   and PEFT key) then run for it.

Example:
    >>> from torch import nn
    >>> from lightning_lora.layers import LoRALinear
    >>> [v.name for v in resolve_variants(LoRALinear, use_dora=True, init="olora")]
    ['dora', 'pissa']
    >>> layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, use_dora=True)
    >>> [type(v).__name__ for v in layer.variants]
    ['DoRA']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_lora.variants.base import ExtraTensor, LoRAVariant
from lightning_lora.variants.dora import DoRA
from lightning_lora.variants.pissa import BaseChangingInit

#: the known variants, in the order their errors are reported and their reprs are printed
VARIANTS: tuple[type[LoRAVariant], ...] = (DoRA, BaseChangingInit)


def config_fields() -> tuple[str, ...]:
    """Every `LoRAConfig` field that selects a variant.

    Example:
        >>> config_fields()
        ('use_dora', 'init')
    """
    return tuple(f for cls in VARIANTS for f in cls.config_fields)


def variant_fields(config: Any) -> dict[str, Any]:
    """The variant-selecting fields of a `LoRAConfig` (what `inject_lora` passes to every adapter layer).

    Example:
        >>> from lightning_lora.config import LoRAConfig
        >>> variant_fields(LoRAConfig(use_dora=True))
        {'use_dora': True, 'init': 'kaiming'}
    """
    return {f: getattr(config, f) for f in config_fields()}


def selected_variants(**fields: Any) -> tuple[LoRAVariant, ...]:
    """The variants `fields` (`LoRAConfig` field -> value) select, whatever the layer type.

    Example:
        >>> [v.option() for v in selected_variants(use_dora=True, init="pissa")]
        ['use_dora=True', "init='pissa'"]
    """
    return tuple(v for v in (cls.from_config(**fields) for cls in VARIANTS) if v is not None)


def resolve_variants(layer_cls: type[nn.Module], base: nn.Module | None = None, **fields: Any) -> tuple[LoRAVariant, ...]:
    """The variants a layer of `layer_cls` uses for `fields`, in `VARIANTS` order (the layer initialises
    those that set A and B first). Called once per layer, by its constructor.

    Raises:
        LoRAConfigError: a selected variant does not implement `layer_cls` (the first one, in `VARIANTS` order).

    Example:
        >>> from lightning_lora.layers import LoRAEmbedding
        >>> resolve_variants(LoRAEmbedding, nn.Embedding(4, 2), init="olora")
        Traceback (most recent call last):
        lightning_lora.errors.LoRAConfigError: init='olora' cannot initialise an nn.Embedding adapter (Embedding(4, 2)): PiSSA/OLoRA are implemented for Linear and Conv1D layers (as in PEFT). Leave the embedding out of target_modules, or use init='kaiming'.
    """
    variants = selected_variants(**fields)
    for variant in variants:
        if not variant.supports(layer_cls):
            raise variant.unsupported_error(base if base is not None else layer_cls)
    return variants


def unsupported_targets(classes: dict[str, type[nn.Module]], **fields: Any) -> tuple[LoRAVariant, list[str]] | None:
    """The first selected variant that cannot adapt some of the named layers, and their names (None if all can).

    `classes`: module name -> the adapter class that would adapt it (`adapter_class_for`).

    Example:
        >>> from lightning_lora.layers import LoRAEmbedding, LoRALinear
        >>> v, names = unsupported_targets({"q": LoRALinear, "emb": LoRAEmbedding}, use_dora=True)
        >>> v.name, names
        ('dora', ['emb'])
        >>> str(v.targets_error(names))[:51]
        "use_dora=True cannot adapt the embedding(s) ['emb']"
    """
    for variant in selected_variants(**fields):
        names = [n for n, cls in classes.items() if not variant.supports(cls)]
        if names:
            return variant, names
    return None


def variant_tensor_names() -> tuple[str, ...]:
    """The names of every registered variant's extra tensors (never part of the base).

    Example:
        >>> variant_tensor_names()
        ('lora_magnitude_vector', 'lora_init_A', 'lora_init_B')
    """
    names = [t.name for cls in VARIANTS for t in cls.from_config(**cls.example).extra_tensors(1, 1, 1)]
    return tuple(dict.fromkeys(names))


__all__ = ["VARIANTS", "BaseChangingInit", "DoRA", "ExtraTensor", "LoRAVariant", "config_fields",
           "resolve_variants", "selected_variants", "unsupported_targets", "variant_fields", "variant_tensor_names"]
