"""The one record `surgery` keeps on a model, and what is read from it.

`inject_lora` records what it did in a typed `LoRAState` on the module it was called on
(`model.lora_state`, `STATE_ATTR`): the config, the adapted module names and the keys training changes,
computed once. `merge_and_unload(keep=True)` replaces it by a `MergedAdapters` (the adapters kept so that
the merge can be undone), so a model holds at most one attribute of ours. Every other function reads the
record (`lora_states(model)` finds it on the model or on the networks inside it). The record is a plain
object, not a Module or Parameter: state dicts and checkpoints never see it.

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> get_lora_state(m).adapted, trainable_keys(m)
    (['q_proj'], ['q_proj.lora_A.weight', 'q_proj.lora_B.weight'])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.layers import LoRALayer
from lightning_lora.surgery._paths import _join, _without_wrappers
from lightning_lora.surgery.transformers_lookup import _pretrained_models, embedding_keys, vocab_rows

#: attribute of the module `inject_lora` was called on that holds its record: a `LoRAState` while the
#: adapters are injected, a `MergedAdapters` after `merge_and_unload(keep=True)`
STATE_ATTR = "lora_state"
#: the attribute that holds a `MergedAdapters`: the same one (one record per model; `forget_merged` drops it)


@dataclass
class LoRAState:
    """What `inject_lora` did to a model, recorded once on the module it was called on.

    Attributes:
        config: the `LoRAConfig` used.
        prefix: the path the module was matched at (`inject_lora(..., prefix=)`), "" normally.
        adapted: paths of the adapter layers, relative to the module.
        modules_to_save: paths of the modules trained and saved whole.
        trainable_keys: state-dict keys (relative to the module) that training changes: adapter
            weights, trained biases and the state of `modules_to_save`, in state-dict order.
        skipped: subtrees left alone (`inject_lora(..., skip=)`: e.g. a frozen teacher).
        embedding_keys: base tensors saved with the adapters (the input/output embedding matrices
            of a model whose vocabulary differs from its base's: `save_embedding_layers`).
        vocab_rows: rows of the input embedding at injection (None without a transformers model).
        requires_grad: every parameter's `requires_grad` before injection (restored by `unload`).
        untied: parameters of `modules_to_save` that were shared with another module, by key, as
            they were before injection (the module trains a copy; `unload` restores the tie).
        originals: every parameter and buffer of `modules_to_save` as it was at injection, by key
            (PEFT's `original_module`): what `disable_lora` runs. A tied parameter is its original
            Parameter (the one the other module still uses), any other a frozen copy.

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> m.lora_state.trainable_keys
        ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """

    config: LoRAConfig
    prefix: str = ""
    adapted: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    trainable_keys: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    embedding_keys: list[str] = field(default_factory=list)
    vocab_rows: int | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict, repr=False)
    untied: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: the adapter's name (`inject_lora(..., adapter_name=)`); the model's other adapters' records, by name, each
    #: as `inject_lora` made it for that adapter alone; the adapters that run and those that train (None: this one)
    adapter_name: str = "default"
    others: dict[str, LoRAState] = field(default_factory=dict, repr=False)
    active: list[str] | None = None
    trainable: list[str] | None = None


@dataclass
class MergedAdapters:
    """What `merge_and_unload(model, keep=True)` folded in, kept on `model.lora_state` (the model's one
    record, in place of the `LoRAState`s of its injections, which it holds) so that `unmerge_and_reinject`
    can undo the merge (the adapters, on the CPU: a few MB); `forget_merged` drops it.

    Attributes:
        states: `(path, LoRAState)` of every injection root that was merged.
        adapters: the adapter weights (`lora_A`/`lora_B`) under the model's state-dict keys.

    Example:
        >>> from torch import nn
        >>> from lightning_lora import LoRAConfig, inject_lora, merge_and_unload
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> record = merge_and_unload(m, keep=True).lora_state
        >>> type(record).__name__, sorted(record.adapters), lora_states(m)
        ('MergedAdapters', ['q_proj.lora_A.weight', 'q_proj.lora_B.weight'], [])
    """

    states: list[tuple[str, LoRAState]]
    adapters: dict[str, torch.Tensor]
    #: the quantized layers the merge replaced by dense ones (path -> module without adapters)
    quantized: dict[str, nn.Module] = field(default_factory=dict)
    #: what each layer's variants need to undo the merge (`LoRALayer.merge_record`: DoRA's weight norm at merge
    #: time), by layer path
    merge_records: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def lora_states(model: nn.Module) -> list[tuple[str, LoRAState]]:
    """`(path, state)` for `model`'s own `LoRAState` or, if it has none, for the outermost modules
    inside it that have one (a network inside a LightningModule).

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> outer = nn.Module(); outer.net = nn.Sequential(); outer.net.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(outer.net, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> [path for path, _ in lora_states(outer)]
        ['net']
    """
    own = model.__dict__.get(STATE_ATTR)
    if isinstance(own, LoRAState):
        return [("", own)]
    found: list[tuple[str, LoRAState]] = []
    for name, module in model.named_modules():  # pre-order: outer modules come first
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        state = module.__dict__.get(STATE_ATTR)
        if isinstance(state, LoRAState):
            found.append((name, state))
    return found


def get_lora_state(model: nn.Module) -> LoRAState:
    """The `LoRAState` of `model` (or of the network inside it that `inject_lora` was called on).

    Raises:
        LoRAError: the model has no adapters.

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> get_lora_state(m).config.r
        2
    """
    states = lora_states(model)
    if not states:
        raise LoRAError("This model has no LoRA adapters; call inject_lora(model, LoRAConfig(...)) first.")
    return states[0][1]


def get_lora_config(model: nn.Module) -> LoRAConfig:
    """The `LoRAConfig` that `inject_lora` used on `model` or on a network inside it.

    Raises:
        LoRAError: the model has no adapters.

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> get_lora_config(m).r
        2
    """
    return get_lora_state(model).config


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """`(path, layer)` for every adapter layer in `model`.

    Example:
        >>> from torch import nn
        >>> list(lora_layers(nn.Linear(2, 2)))
        []
    """
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    """Whether `model` contains adapter layers.

    Example:
        >>> from torch import nn
        >>> has_lora(nn.Linear(2, 2))
        False
    """
    return any(True for _ in lora_layers(model))


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key / parameter name belongs to an adapter (`lora_A` / `lora_B`).

    Adapter keys are `lora_A` / `lora_B`, DoRA's `lora_magnitude_vector` and the initial adapters of
    PiSSA / OLoRA (`lora_init_A`, `lora_init_B`: buffers a checkpoint needs to rebuild the residual base).

    Example:
        >>> is_lora_key("model.layers.0.self_attn.q_proj.lora_A.weight"), is_lora_key("lm_head.weight")
        (True, False)
        >>> is_lora_key("model.layers.0.self_attn.q_proj.lora_magnitude_vector")
        True
    """
    key = f".{key}"
    return ".lora_A." in key or ".lora_B." in key or key.endswith(LoRALayer.ADAPTER_TENSORS_SUFFIXES)


def trainable_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of `model` that LoRA training changes (adapters, trained biases,
    `modules_to_save`), as recorded at injection.

    Raises:
        LoRAError: the model has no adapters.

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> outer = nn.Module(); outer.net = nn.Sequential(); outer.net.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(outer.net, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> trainable_keys(outer)
        ['net.q_proj.lora_A.weight', 'net.q_proj.lora_B.weight']
    """
    states = lora_states(model)
    if not states:
        raise LoRAError("This model has no LoRA adapters; call inject_lora(model, LoRAConfig(...)) first.")
    return [k for path, state in states
            for k in (several_trainable_keys(model, path, state) if state.others or state.active is not None
                      else [_join(path, k) for k in state.trainable_keys])]


def adapter_keys(model: nn.Module, adapter_name: str) -> list[str]:
    """The state-dict keys of adapter `adapter_name`'s tensors in `model` (A, B, the variants' tensors), in
    state-dict order; its trained biases / `modules_to_save` are not included (see `trainable_keys`).

    Example:
        >>> from torch import nn
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="fr")
        >>> adapter_keys(m, "fr")
        ['q_proj.lora_adapters.fr.lora_A.weight', 'q_proj.lora_adapters.fr.lora_B.weight']
    """
    keys: list[str] = []
    for path, layer in lora_layers(model):
        slot = layer.adapter_slot(adapter_name)
        if slot is layer:
            keys += [_join(path, k) for k in layer.state_dict(keep_vars=True)
                     if is_lora_key(k) and not k.startswith("lora_adapters.")]
        elif slot is not None:
            keys += [_join(path, f"lora_adapters.{adapter_name}.{k}") for k in slot.state_dict(keep_vars=True)]
    return keys


def several_trainable_keys(model: nn.Module, path: str, state: LoRAState) -> list[str]:
    """`trainable_keys` of a record with several adapters: the keys of each trainable adapter (and the first's
    trained biases / `modules_to_save` when it trains), relative to `model`."""
    root = model.get_submodule(path) if path else model
    names = state.trainable if state.trainable is not None else (state.active or [state.adapter_name])
    keys: list[str] = []
    for name in names:
        if name == state.adapter_name:
            keys += [k for k in state.trainable_keys if not is_lora_key(k)]
        keys += adapter_keys(root, name)
    return [_join(path, k) for k in dict.fromkeys(keys)]


def saved_keys(model: nn.Module) -> list[str]:
    """The state-dict keys an adapter (and an adapter-only checkpoint) holds: `trainable_keys` plus
    the embedding matrices carried for a resized vocabulary (`LoRAState.embedding_keys`; with
    `save_embedding_layers="auto"` also when the vocabulary was resized after injection).

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> saved_keys(m)
        ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """
    keys = trainable_keys(model)
    for path, state in lora_states(model):
        root = model.get_submodule(path) if path else model
        extra = list(state.embedding_keys)
        if (not extra and state.config.save_embedding_layers == "auto" and state.vocab_rows is not None
                and vocab_rows(root) not in (None, state.vocab_rows)):
            extra = embedding_keys(root, state.skipped)
        keys += [_join(path, k) for k in extra]
    return list(dict.fromkeys(keys))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters LoRA trains (adapters, plus biases / `modules_to_save` per the config), each
    once (a parameter shared by two modules appears once). Pass these to your optimizer.

    Example:
        >>> from lightning_lora import inject_lora
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> [tuple(p.shape) for p in lora_parameters(m)]
        [(2, 4), (4, 2)]
    """
    keys = trainable_keys(model)
    params = {_without_wrappers(k): p for k, p in model.named_parameters(remove_duplicate=False)}
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for key in keys:
        p = params.get(key)
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def find_network(model: nn.Module) -> tuple[str, nn.Module]:
    """`(path, module)` of the network inside `model`: the outermost transformers `PreTrainedModel`
    that holds adapters (e.g. `("model", pl_module.model)` and not a frozen teacher next to it), else
    the outermost `PreTrainedModel`, else `("", model)`.

    Example:
        >>> from torch import nn
        >>> find_network(nn.Linear(2, 2))[0]
        ''
    """
    found = _pretrained_models(model)
    for name, module in found:
        if has_lora(module) or lora_states(module):
            return name, module
    return found[0] if found else ("", model)
