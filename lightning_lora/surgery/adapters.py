"""Several adapters on one model (PEFT's multi-adapter API): add one with `inject_lora(..., adapter_name=)`,
choose the ones that run (`set_adapter`), delete one, run one per row of a batch (`mixed_batch`), and see one
as if it were alone (`solo`: what saving, loading and `lora_state_dict(model, adapter_name=)` use).

Each layer holds its first adapter itself and the others in `lora_adapters.<name>` (`layers.slots`). The
model's record (`model.lora_state`, a `LoRAState`) is the first adapter's; the others' records are in
`LoRAState.others` by name, each as `inject_lora` made it for that adapter alone (its keys unnamed).
`LoRAState.active` are the adapters that run, `LoRAState.trainable` those with `requires_grad` (by
default the active ones; an adapter added by `inject_lora` is trainable alone, the others kept frozen).

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig
    >>> from lightning_lora.surgery import trainable_keys
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4)); m.add_module("v_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> inject_lora(m, LoRAConfig(r=1, target_modules=["q_proj", "v_proj"]), adapter_name="fr")
    ['q_proj', 'v_proj']
    >>> adapter_names(m), active_adapters(m), trainable_keys(m)
    (['default', 'fr'], ['default', 'fr'], ['q_proj.lora_adapters.fr.lora_A.weight', 'q_proj.lora_adapters.fr.lora_B.weight', 'v_proj.lora_A.weight', 'v_proj.lora_B.weight'])
    >>> set_adapter(m, "default"); active_adapters(m), trainable_keys(m)
    (['default'], ['q_proj.lora_A.weight', 'q_proj.lora_B.weight'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence

from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.layers import LoRALayer, LoRALinear
from lightning_lora.layers.slots import ADAPTER_MODULES, BASE_ROWS, AdapterSlot, MixedRows, swap_adapters
from lightning_lora.surgery._paths import _join, _set_submodule
from lightning_lora.surgery.inject import inject_lora as _inject_first
from lightning_lora.surgery.inject import unload
from lightning_lora.surgery.state import STATE_ATTR, LoRAState, is_lora_key, lora_layers, lora_states

#: the layer attributes `solo` changes and puts back
_VIEW_ATTRS = ("adapter_name", "_active", "_mixed")
#: what a second adapter cannot have (it would change what the first computes or trains)
_FIRST_ONLY = ("modules_to_save", "quantize_base", "target_parameters")


def check_adapter_name(name: object) -> str:
    """`name` if it can name an adapter: a non-empty string without dots (it becomes part of state-dict keys and a
    subfolder) that is not `"__base__"` (`mixed_batch`'s name for rows without an adapter).

    Raises:
        LoRAError: naming the value and what is expected.

    Example:
        >>> check_adapter_name("fr")
        'fr'
    """
    if not isinstance(name, str) or not name.strip() or "." in name or "/" in name or name == BASE_ROWS:
        raise LoRAError(f"adapter_name={name!r} is invalid; expected a non-empty name without dots or slashes, other "
                        f"than {BASE_ROWS!r} (it becomes part of state-dict keys and a folder name), e.g. 'fr'.")
    return name


def _merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in lora_layers(model))


def _record(model: nn.Module) -> tuple[str, LoRAState]:
    states = lora_states(model)
    if not states:
        raise LoRAError("This model has no LoRA adapters; call inject_lora(model, LoRAConfig(...)) first.")
    if len(states) > 1:
        raise LoRAError(f"several adapters are managed on one injected network; this model has {len(states)} "
                        f"({[p for p, _ in states]}); call the function on one of them.")
    return states[0]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter of `model`, the first injected first.

    Raises:
        LoRAError: the model has no adapters.
    """
    _, state = _record(model)
    return [state.adapter_name, *state.others]


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters of `model` that run (PEFT's `active_adapters`).

    Raises:
        LoRAError: the model has no adapters.
    """
    _, state = _record(model)
    return list(state.active) if state.active is not None else [state.adapter_name]


def trainable_adapters(model: nn.Module) -> list[str]:
    """The adapters of `model` that train (`requires_grad`): the active ones after `set_adapter`, the newest alone
    after `inject_lora(..., adapter_name=)`."""
    _, state = _record(model)
    return list(state.trainable) if state.trainable is not None else active_adapters(model)


def _check_names(model: nn.Module, names: Sequence[str], allow_base: bool = False) -> list[str]:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known and not (allow_base and n == BASE_ROWS)]
    if unknown:
        raise LoRAError(f"unknown adapter name(s) {unknown}; this model has {known}"
                        + (f' (and "{BASE_ROWS}" for the base)' if allow_base else "") + ".")
    return list(names)


def _apply_flags(root: nn.Module, state: LoRAState) -> None:
    """Each layer runs the active adapters; the trainable ones (and the first's biases / modules_to_save when it
    trains) have `requires_grad=True`, every other adapter tensor False."""
    active = state.active if state.active is not None else [state.adapter_name]
    trainable = set(state.trainable if state.trainable is not None else active)
    for _, layer in lora_layers(root):
        layer.set_active_adapters(active)
        for name in layer.adapter_names():
            slot = layer.adapter_slot(name)
            tensors = ([m.parameters() for m in (slot.lora_A, slot.lora_B)]
                       + [[p] for n, p in slot._parameters.items() if n in LoRALayer.ADAPTER_TENSORS])
            for group in tensors:
                for p in group:
                    p.requires_grad_(name in trainable)
    params = dict(root.named_parameters(remove_duplicate=False))
    for key in state.trainable_keys:
        if not is_lora_key(key) and key in params:
            params[key].requires_grad_(state.adapter_name in trainable)


@contextlib.contextmanager
def solo(model: nn.Module, adapter_name: str | None) -> Iterator[nn.Module]:
    """Inside the block `model` looks as if it carried adapter `adapter_name` alone (None: no adapter, the base):
    that adapter's tensors are each layer's own (`lora_A.weight`), the other adapters are hidden, layers
    without it are their base modules, and the record is its own. Everything is put back on exit (the same
    objects: a `torch.compile`d model keeps its graphs). Saving, loading and `lora_state_dict(model,
    adapter_name=)` of one adapter go through this view.

    Raises:
        LoRAError: the model has no adapters, or none named `adapter_name`.
    """
    path, state = _record(model)
    if adapter_name is not None:
        _check_names(model, [adapter_name])
    root = model.get_submodule(path) if path else model
    view_state = dataclasses.replace(state, others={}, active=None, trainable=None) \
        if adapter_name in (None, state.adapter_name) else state.others[adapter_name]
    every = list(lora_layers(root))
    layers = [(n, layer) for n, layer in every
              if not any(n.startswith(o + ".") for o, _ in every if o != n)]  # outermost only
    replaced: list[tuple[str, LoRALayer, nn.Module]] = []
    swapped: list[tuple[LoRALayer, nn.Module]] = []
    hidden: list[tuple[LoRALayer, nn.Module]] = []
    saved: list[tuple[LoRALayer, dict[str, object]]] = []
    try:
        for name, layer in layers:
            slot = layer.adapter_slot(adapter_name) if adapter_name is not None else None
            if slot is None:
                base = layer.to_base_module()
                _set_submodule(root, layer.module_path(name), base)
                replaced.append((layer.module_path(name), layer, base))
                continue
            saved.append((layer, {k: layer.__dict__[k] for k in _VIEW_ATTRS if k in layer.__dict__}))
            layer.adapter_name, layer._active, layer._mixed = adapter_name, None, None
            if slot is not layer:
                swap_adapters(layer, slot)
                swapped.append((layer, slot))
            extra = layer._modules.pop("lora_adapters", None)
            if extra is not None:
                hidden.append((layer, extra))
        root.__dict__[STATE_ATTR] = view_state
        if adapter_name is None:
            del root.__dict__[STATE_ATTR]
        yield model
    finally:
        for layer, extra in hidden:
            layer._modules["lora_adapters"] = extra
        for layer, slot in reversed(swapped):
            swap_adapters(layer, slot)
        for layer, own in saved:  # exactly the attributes it had (a compiled model's guards see no change)
            for key in _VIEW_ATTRS:
                layer.__dict__.pop(key, None)
            layer.__dict__.update(own)
        for where, layer, _ in replaced:
            _set_submodule(root, where, layer)
        root.__dict__[STATE_ATTR] = state


def inject_lora(model: nn.Module, config: LoRAConfig | None = None, *, prefix: str = "", skip: Sequence[str] = (),
                adapter_name: str = "default") -> list[str]:
    """Replace the targeted modules of `model` by adapter layers and freeze the base (the first adapter), or add
    adapter `adapter_name` beside those `model` has. See `lightning_lora.surgery.inject.inject_lora` for the
    first; a later adapter has its own config (rank, targets, alpha), runs beside the active adapters and is the
    only one that trains (the others are frozen; `set_adapter` changes both). On any error the model is left
    as it was. PEFT's `inject_adapter_in_model` / `add_adapter`, except that the new adapter runs.

    Returns:
        The paths of the modules the adapter was injected into, relative to `model`.

    Raises:
        LoRAError: the name is taken; a later adapter with `modules_to_save`, `quantize_base`,
            `target_parameters`, a trained bias or PiSSA/OLoRA init (they would change the first adapter's
            base); a target whose adapter layer holds one adapter only (quantized, parameter, attention).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="en")
        ['q_proj']
        >>> inject_lora(m, LoRAConfig(r=4, target_modules=["q_proj"]), adapter_name="fr"); adapter_names(m)
        ['q_proj']
        ['en', 'fr']
    """
    check_adapter_name(adapter_name)
    states = lora_states(model)
    if not states:
        names = _inject_first(model, config, prefix=prefix, skip=skip)
        model.__dict__[STATE_ATTR].adapter_name = adapter_name
        for _, layer in lora_layers(model):
            layer.adapter_name = adapter_name
        return names
    config = config if config is not None else LoRAConfig()
    config = dataclasses.replace(config, task_heads=False)  # a task head trains with the first adapter only
    path, state = _record(model)
    if adapter_name in adapter_names(model):
        raise LoRAError(f"This model already has LoRA adapters ({adapter_names(model)}), one named {adapter_name!r}; "
                        "pass another adapter_name= to add an adapter beside them, or call merge_and_unload(model) or "
                        f"unload(model) (or delete_adapter(model, {adapter_name!r})) first.")
    refused = [f for f in _FIRST_ONLY if getattr(config, f)]
    if config.bias != "none":
        refused.append(f"bias={config.bias!r}")
    if config.init not in ("kaiming", "gaussian"):
        refused.append(f"init={config.init!r}")
    if refused:
        raise LoRAError(f"adapter {adapter_name!r} is added beside {adapter_names(model)}: it cannot use "
                        f"{', '.join(refused)} (that changes the base the other adapters run on); give those to the "
                        "first adapter, or inject this one into a fresh model.")
    root = model.get_submodule(path) if path else model
    if _merged(root):
        raise LoRAError(f"cannot add adapter {adapter_name!r} while adapters are merged into the base; "
                        "unmerge_adapter(model) first.")
    hosts = [n for n, layer in lora_layers(root) if layer.module_path(n) != n]
    if hosts:
        raise LoRAError(f"adapter {adapter_name!r} cannot be added: the model's adapters include target_parameters "
                        f"adapters ({hosts[0]}, ...), which hold one adapter per model; unload(model) first.")
    outside = [s for s in skip if path and not s.startswith(path + ".")]
    if outside:
        raise LoRAError(f"skip={outside} lies outside {path!r}, the network that holds the adapters; the new adapter "
                        "is added to that network.")
    skip = [s[len(path) + 1:] for s in skip] if path else list(skip)
    inner_prefix = _join(prefix, path)
    layers = {n: layer for n, layer in lora_layers(root)}
    with solo(model, None):
        names = _inject_first(root, config, prefix=inner_prefix, skip=skip)
        new_state = root.__dict__[STATE_ATTR]
        new_layers = {n: root.get_submodule(n) for n in names}
        refusals = [f"{n} ({type(layers[n]).__name__})" for n in names
                    if n in layers and not layers[n].several_adapters]
        if refusals:
            unload(root)
            raise LoRAError(f"adapter {adapter_name!r} targets layers that hold one adapter only: {refusals}; "
                            "leave them out of its target_modules.")
    for name, new in new_layers.items():
        new.adapter_name = adapter_name
        old = layers.get(name)
        if old is None:
            _set_submodule(root, name, new)
            continue
        slot = AdapterSlot.__new__(AdapterSlot)
        nn.Module.__init__(slot)
        object.__setattr__(slot, "_host", old)
        for attr in ADAPTER_MODULES:
            slot._modules[attr] = None
        swap_adapters(new, slot)
        if "lora_adapters" not in old._modules:
            old.lora_adapters = nn.ModuleDict()
        old.lora_adapters[adapter_name] = slot
    new_state.adapter_name = adapter_name
    state.others[adapter_name] = new_state
    state.active = [*active_adapters(model), adapter_name]
    state.trainable = [adapter_name]
    _apply_flags(root, state)
    return [_join(path, n) for n in names] if path else names


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str], *, trainable: Sequence[str] | None = None) -> None:
    """Run these adapters (in this order) and train them; the others do not run and are frozen (PEFT's
    `set_adapter`). An adapter absent from a layer is skipped there. `trainable` names the adapters that train
    instead (e.g. a new adapter trained on top of frozen ones that keep running).

    Raises:
        LoRAError: an unknown name (the known ones are listed).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="fr")
        >>> set_adapter(m, "fr"); m.q_proj.lora_A.weight.requires_grad
        False
    """
    names = _check_names(model, [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
    path, state = _record(model)
    if _merged(model):
        raise LoRAError(f"cannot set the active adapters to {names} while {active_adapters(model)} are merged into "
                        "the base; unmerge_adapter(model) first.")
    state.active = list(dict.fromkeys(names))
    state.trainable = None if trainable is None else list(dict.fromkeys(_check_names(model, list(trainable))))
    _apply_flags(model.get_submodule(path) if path else model, state)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` (its tensors and keys); layers left without adapters become their base
    modules. Deleting the first adapter makes the next one first (its keys lose their `lora_adapters.<name>.`).
    PEFT's `delete_adapter`.

    Raises:
        LoRAError: an unknown name; the only adapter (use `unload` or `merge_and_unload`); the first adapter when it
            trains biases or `modules_to_save`; a merged model.
    """
    _check_names(model, [adapter_name])
    path, state = _record(model)
    if not state.others:
        raise LoRAError(f"{adapter_name!r} is the model's only adapter; remove it with unload(model) (or "
                        "merge_and_unload(model)).")
    root = model.get_submodule(path) if path else model
    if any(layer.merged for _, layer in lora_layers(root)):
        raise LoRAError(f"cannot delete adapter {adapter_name!r} while adapters are merged; unmerge_adapter(model) "
                        "first.")
    if adapter_name == state.adapter_name and any(not is_lora_key(k) for k in state.trainable_keys):
        raise LoRAError(f"adapter {adapter_name!r} trains biases or modules_to_save, which the others share; "
                        "unload(model) and load the others again instead.")
    for name, layer in list(lora_layers(root)):
        if layer.adapter_slot(adapter_name) is None:
            continue
        if layer.adapter_names() == [adapter_name]:
            _set_submodule(root, layer.module_path(name), layer.to_base_module())
        else:
            layer.delete_adapter(adapter_name)
    if adapter_name == state.adapter_name:
        first, other = next(iter(state.others.items()))
        del state.others[first]
        state.config, state.adapted, state.adapter_name = other.config, other.adapted, first
        state.trainable_keys = list(other.trainable_keys)
        state.prefix, state.skipped, state.embedding_keys = other.prefix, other.skipped, other.embedding_keys
    else:
        del state.others[adapter_name]
    for attr in ("active", "trainable"):
        names = getattr(state, attr)
        if names is not None:
            setattr(state, attr, [n for n in names if n != adapter_name])
    if state.active == []:  # PEFT: the first remaining adapter becomes active, with a warning
        state.active, state.trainable = [state.adapter_name], None
        warnings.warn(f"delete_adapter: {adapter_name!r} was the only active adapter; {state.adapter_name!r} is "
                      "active now (PEFT's rule). Call set_adapter(model, ...) to choose another.", stacklevel=2)
    _apply_flags(root, state)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], rows_per_name: int = 1) -> Iterator[nn.Module]:
    """Inside the block, row `i` of every batch runs adapter `adapter_names[i]` (`"__base__"`: no adapter) in
    every layer, whichever adapters are active: PEFT's `model(..., adapter_names=[...])`, for forward passes,
    `generate` (rows are the batch dimension) and training (each adapter's gradient is the one its rows alone
    give it; PEFT's mixed batches are inference only).

    Args:
        model: a model with adapters.
        adapter_names: one name per row (per prompt for `generate`).
        rows_per_name: how many consecutive rows each name covers: `generate` expands each prompt to `num_beams`
            rows (beam search) or `num_return_sequences` rows (sampling); pass that number (PEFT reads it from
            `generate`'s arguments).

    Raises:
        LoRAError: an unknown name, a string instead of a list; at the forward, a batch whose size is not
            `rows_per_name * len(adapter_names)`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> with mixed_batch(m, ["default", "__base__"]):
        ...     m(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """
    if isinstance(adapter_names, str):
        raise LoRAError(f"mixed_batch expects one adapter name per row, got the string {adapter_names!r}; pass a list, "
                        f"e.g. mixed_batch(model, [{adapter_names!r}, '__base__']).")
    if isinstance(rows_per_name, bool) or not isinstance(rows_per_name, int) or rows_per_name < 1:
        raise LoRAError(f"rows_per_name={rows_per_name!r} is invalid; expected an integer >= 1 (generate's num_beams).")
    names = _check_names(model, list(adapter_names), allow_base=True)
    names = [n for n in names for _ in range(rows_per_name)]
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise LoRAError("mixed_batch runs each adapter on its rows, which merged weights cannot; "
                        "unmerge_adapter(model) first.")
    whole = [n for n, layer in lora_layers(model) if not layer.several_adapters and not isinstance(layer, LoRALinear)]
    if whole and len(set(names)) > 1:
        raise LoRAError(f"mixed_batch cannot give rows different adapters in {whole[0]} "
                        f"({type(model.get_submodule(whole[0])).__name__}), which computes one effective weight for "
                        "the whole batch; run one adapter per batch there (set_adapter).")
    rows = MixedRows(names)
    for layer in layers:
        layer._mixed = rows
    try:
        yield model
    finally:
        for layer in layers:
            layer._mixed = None


__all__ = ["active_adapters", "adapter_names", "check_adapter_name", "delete_adapter", "inject_lora", "mixed_batch", "set_adapter", "solo",
           "trainable_adapters"]
