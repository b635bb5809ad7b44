"""Merging: fold the adapters into the base weights and remove them (`merge_and_unload`, reversible
with `keep=True` until `unmerge_and_reinject` or `forget_merged`), fold them in and out while keeping
them (`merge_adapter` / `unmerge_adapter`), and run the base function for a block (`disable_lora`).

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> _ = merge_and_unload(m, keep=True); type(m.q_proj).__name__, is_merged(m)
    ('Linear', True)
    >>> unmerge_and_reinject(m), is_merged(m)
    (['q_proj'], False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.layers import LoRALayer
from lightning_lora.quantization import dequantize_for_merge, restore_modules
from lightning_lora.surgery._paths import _join, _set_submodule
from lightning_lora.surgery.adapters import _apply_flags
from lightning_lora.surgery.adapters import inject_lora as inject_named
from lightning_lora.surgery.inject import _parameter_owners, _untie_word_embeddings_flag, inject_lora
from lightning_lora.surgery.load import lora_state_dict
from lightning_lora.surgery.state import STATE_ATTR, MergedAdapters, is_lora_key, lora_layers, lora_states
from lightning_lora.variants.pissa import skip_base_init


def merge_and_unload(model: nn.Module, keep: bool = False, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Fold every adapter into its base weight and remove it; the result is a plain model again
    (exactly the base model's module types and state-dict keys). In place; returns `model`.
    PEFT's `merge_and_unload`.

    The delta `scaling * B @ A` is computed in float32 and added to the weight in float32, then
    written in the weight's dtype (one rounding). An adapted weight that is tied to another module
    (e.g. `embed_tokens` and `lm_head` with `tie_word_embeddings=True`) is untied first: the adapted
    module gets its own merged copy, the other keeps the base weight, and transformers configs get
    `tie_word_embeddings=False`; so the merged model computes what the adapted model computed.

    A quantized base (`quantize_base="nf4"`, bitsandbytes) is dequantised: each adapted weight in
    float32 plus the delta, rounded once into `dtype`; quantized layers without adapters become dense
    `nn.Linear` layers too (`lightning_lora.quantization.dequantize_for_merge`).

    Args:
        model: a model with adapters (or a module holding one).
        keep: keep the adapters on `model.lora_state` (a `MergedAdapters` in place of the `LoRAState`) so that
            `unmerge_and_reinject(model)` can undo the merge.
        dtype: dtype of the dequantised weights of a quantized base (default: the dtype of the rest of
            the model, e.g. bf16 after a `bf16-true` run); dense weights keep their dtype.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> type(merge_and_unload(m).q_proj).__name__
        'Linear'
    """
    if isinstance(model, LoRALayer):
        raise LoRAError("merge_and_unload expects the model that holds the adapters, not an adapter layer; "
                        "call layer.merge() or pass the parent model.")
    for name, layer in lora_layers(model):  # before anything is changed (a grouped conv cannot be merged)
        layer.check_merge(name)
    states = lora_states(model)
    quantized = dequantize_for_merge(model, dtype)
    record = None
    if keep:
        several = any(state.others for _, state in states)  # every adapter's tensors, by the model's keys
        held = model.state_dict() if several else lora_state_dict(model)
        adapters = {k: v.detach().to("cpu", copy=True) for k, v in held.items() if is_lora_key(k)}
        record = MergedAdapters(states, adapters, quantized)
    owners = _parameter_owners(model)
    untied = False
    for name, layer in list(lora_layers(model)):
        if owners.get(id(layer.weight), 0) > 1:
            # Tied weight: merging in place would change the other module too.
            layer.unmerge()
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            untied = True
        layer.merge()
        if record is not None and (kept := layer.merge_record()):
            record.merge_records[name] = {k: t.detach().to("cpu", copy=True) for k, t in kept.items()}
        _set_submodule(model, layer.module_path(name), layer.to_base_module())
    if untied:
        _untie_word_embeddings_flag(model)
    for path, _ in states:
        with contextlib.suppress(AttributeError):
            delattr(model.get_submodule(path) if path else model, STATE_ATTR)
    if record is not None:  # the one record of the model: the LoRAStates of its injections are inside
        model.__dict__[STATE_ATTR] = record
    return model


def unmerge_and_reinject(model: nn.Module) -> list[str]:
    """Undo `merge_and_unload(model, keep=True)`: inject the same adapters again with the values they
    had, and subtract their delta from the merged weights, so the model holds its base weights plus
    the adapters (base weights within one float rounding of the original: the delta is added and
    subtracted in float32, each result written in the weight's dtype).

    Returns:
        The adapted module paths.

    Raises:
        LoRAError: the model was not merged with `keep=True`.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> _ = merge_and_unload(m, keep=True)
        >>> unmerge_and_reinject(m)
        ['q_proj']
    """
    record = model.__dict__.get(STATE_ATTR)
    if not isinstance(record, MergedAdapters):
        raise LoRAError("This model was not merged with merge_and_unload(model, keep=True); there is nothing to "
                        "undo. Load the adapters into a fresh base model instead.")
    if record.quantized:  # the quantized layers come back as they were (nothing is quantized again)
        restore_modules(model, record.quantized)
    names = []
    for path, state in record.states:
        root = model.get_submodule(path) if path else model
        with skip_base_init():  # PiSSA / OLoRA: the merged weight already holds the residual base
            names += [_join(path, n) for n in inject_lora(root, state.config, prefix=state.prefix, skip=state.skipped)]
        new_state = root.__dict__[STATE_ATTR]
        # what the model was before injection, not the merged model: flags, ties and modules_to_save's originals
        new_state.requires_grad, new_state.untied, new_state.originals = state.requires_grad, state.untied, state.originals
        new_state.adapter_name = state.adapter_name  # the adapters keep their names, order, roles
        for _, layer in lora_layers(root):
            layer.adapter_name = state.adapter_name
        for name, other in state.others.items():
            inject_named(root, other.config, prefix=other.prefix, skip=other.skipped, adapter_name=name)
        if state.others or state.active is not None:
            new_state.active, new_state.trainable = state.active, state.trainable
            _apply_flags(root, new_state)
    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for key, value in record.adapters.items():
            params[key].copy_(value)
    for name, layer in lora_layers(model):
        if name not in record.quantized:
            layer.merged = True
            layer._merged_names = tuple(layer._active) if layer._active is not None else None
            layer.load_merge_record(record.merge_records.get(name, {}))
            layer.unmerge()
    if model.__dict__.get(STATE_ATTR) is record:  # not replaced by the LoRAState of a re-injection at the root
        del model.__dict__[STATE_ATTR]
    return names


def is_merged(model: nn.Module) -> bool:
    """Whether `merge_and_unload(model, keep=True)` merged adapters that can still be undone.

    Example:
        >>> from torch import nn
        >>> is_merged(nn.Linear(2, 2))
        False
    """
    return isinstance(model.__dict__.get(STATE_ATTR), MergedAdapters)


def merged_config(model: nn.Module) -> LoRAConfig | None:
    """The `LoRAConfig` of the adapters that `merge_and_unload(model, keep=True)` merged, or None.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> merged_config(merge_and_unload(m, keep=True)).r
        2
    """
    record = model.__dict__.get(STATE_ATTR)
    return record.states[0][1].config if isinstance(record, MergedAdapters) and record.states else None


def forget_merged(model: nn.Module) -> None:
    """Drop the adapters that `merge_and_unload(model, keep=True)` kept: the merged model becomes the
    base (the merge can no longer be undone; `is_merged` is False). Nothing happens to a model that holds
    no such merge.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> _ = merge_and_unload(m, keep=True); forget_merged(m); is_merged(m)
        False
    """
    if isinstance(model.__dict__.get(STATE_ATTR), MergedAdapters):
        del model.__dict__[STATE_ATTR]


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapters into the base weights but keep them (PEFT's `merge_adapter`); the model then
    computes at the base model's speed. Undo with `unmerge_adapter`.

    Raises:
        LoRAError: an adapted weight is tied to another module (an input embedding shared with the output head):
            folding the delta in would change that module too, so the merged model would not compute what the
            adapted one computes. Nothing is merged then; `merge_and_unload` unties such a weight first.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> merge_adapter(m); m.q_proj.merged
        True
    """
    owners = _parameter_owners(model)
    for name, layer in lora_layers(model):
        layer.check_merge(name)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and owners.get(id(weight), 0) > 1 and not layer.merged:
            raise LoRAError(f"merge_adapter cannot fold the adapter of {name!r} into its weight: the weight is tied to "
                            "another module (the output head shares the input embedding), which would change too. "
                            "Use merge_and_unload(model) (it unties the weight first), or keep the adapters unmerged.")
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter` (PEFT's `unmerge_adapter`): the delta is subtracted again in float32;
    the base weights come back within one rounding (see `LoRALayer.unmerge`).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> merge_adapter(m); unmerge_adapter(m); m.q_proj.merged
        False
    """
    for _, layer in lora_layers(model):
        layer.unmerge()


def _swap_in_originals(model: nn.Module, swapped: list[tuple[dict[str, Any], str, Any]]) -> None:
    """Put the original parameters and buffers of every `modules_to_save` in place (PEFT's
    `original_module`), moved to the device and dtype the trained ones have now (the moved copy is
    kept for the next call); appends `(dict, name, trained)` to `swapped` as it goes, to put back."""
    for path, state in lora_states(model):
        root = model.get_submodule(path) if path else model
        for key, original in list(state.originals.items()):
            owner_path, _, name = key.rpartition(".")
            owner = root.get_submodule(owner_path) if owner_path else root
            table = owner._parameters if name in owner._parameters else owner._buffers
            current = table[name]
            if current is None or current is original:
                continue
            if current.shape != original.shape:
                raise LoRAError(f"disable_lora: {_join(path, key)} has shape {tuple(current.shape)} but had "
                                f"{tuple(original.shape)} when the adapters were injected (a vocabulary resized after "
                                "inject_lora?), so the base function is not defined for it; resize the embeddings "
                                "before injecting.")
            if not isinstance(original, nn.Parameter):
                moved = original.to(device=current.device, dtype=current.dtype)
                state.originals[key] = moved  # moved once, not at every call
                original = nn.Parameter(moved, requires_grad=False) if table is owner._parameters else moved
            swapped.append((table, name, current))
            table[name] = original


def _fsdp_wrapped(model: nn.Module) -> bool:
    """Whether FSDP (FSDP2's `fully_shard` or FSDP1's wrapper) manages any part of `model` (checked by
    class, without importing torch.distributed)."""
    return any(cls.__name__ in ("FSDPModule", "FullyShardedDataParallel") and cls.__module__.startswith("torch.distributed")
               for module in model.modules() for cls in type(module).__mro__)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base function, as PEFT's `disable_adapter()`: the
    adapters are bypassed (merged ones unmerged for the block) and every `modules_to_save` (task
    heads included) runs as it was at injection, not the trained copy. Trained biases
    (`bias="all"` / `"lora_only"`) stay as trained, as in PEFT.

    Raises:
        LoRAError: the adapters were merged into the weights by `merge_and_unload(keep=True)` (the
            base function is gone until `unmerge_and_reinject(model)`); the model has
            `modules_to_save` and is sharded with FSDP (their parameters cannot be swapped).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4)); m.add_module("head", nn.Linear(4, 2))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"]))
        >>> with torch.no_grad():
        ...     _ = m.head.weight.add_(1.0)                # training changes the head
        >>> with disable_lora(m):
        ...     m.q_proj.lora_enabled, m.head.weight.requires_grad    # the original head runs
        (False, False)
        >>> m.head.weight.requires_grad                    # the trained one is back
        True
    """
    if is_merged(model):
        raise LoRAError("disable_lora: the adapters of this model are merged into its weights (merge_and_unload, "
                        "e.g. at the end of fit), so it no longer has a base function to switch to; call "
                        "unmerge_and_reinject(model) first, or use the base model.")
    layers = [layer for _, layer in lora_layers(model)]
    states = [(layer.lora_enabled, layer.merged) for layer in layers]
    saved = [_join(path, m) for path, state in lora_states(model) if state.originals for m in state.modules_to_save]
    if saved and _fsdp_wrapped(model):
        raise LoRAError(f"disable_lora cannot run the original modules_to_save {saved[:4]} of a model sharded with FSDP "
                        "(FSDP owns their parameters, so they cannot be swapped for the originals); compute the base "
                        "outputs with an unsharded copy of the base model, or train without modules_to_save "
                        "(task_heads=False).")
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for layer in layers:
            layer.unmerge()
            layer.lora_enabled = False
        _swap_in_originals(model, swapped)
        yield model
    finally:
        for table, name, trained in reversed(swapped):
            table[name] = trained
        for layer, (enabled, merged) in zip(layers, states):
            layer.lora_enabled = enabled
            if merged:
                layer.merge()
