"""Injection and its undo: `inject_lora` replaces the targeted modules by adapter layers, freezes
the base and records a `LoRAState` (rolled back on any error); `unload` removes the adapters without
merging. Also the tie handling that injection and merging share, and the input-grad hook reentrant
checkpointing needs over a frozen embedding.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    ['q_proj']
    >>> type(unload(m).q_proj).__name__
    'Linear'
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.layers import LoRAParameter, LoRAParameterHost, adapter_class_for, keep_adapters_running
from lightning_lora.layers.parameter import adapter_path
from lightning_lora.matching import is_inside
from lightning_lora.quantization import (
    guard_quantized_storage,
    quantize_base_modules,
    restore_modules,
    unguard_quantized_storage,
)
from lightning_lora.surgery._paths import _join, _set_submodule
from lightning_lora.surgery.state import STATE_ATTR, LoRAState, lora_layers, lora_states
from lightning_lora.surgery.targets import (
    _carried_embedding_keys,
    _modules_to_save,
    compute_trainable_keys,
    find_target_modules,
    find_target_parameters,
)
from lightning_lora.surgery.transformers_lookup import output_head_names, vocab_rows
from lightning_lora.variants import selected_variants, unsupported_targets, variant_fields


def inject_lora(model: nn.Module, config: LoRAConfig | None = None, *, prefix: str = "",
                skip: Sequence[str] = ()) -> list[str]:
    """Replace the targeted modules of `model` by adapter layers, in place, and freeze the base.

    Every base parameter gets `requires_grad=False`, except biases per `config.bias` and the
    parameters of `config.modules_to_save`; parameters inside `skip` keep their flag. What was done is
    recorded in `model.lora_state` (a `LoRAState`); a merge kept there by `merge_and_unload(keep=True)` is
    forgotten (the merged model is the new base). On any error the model is left as it was.

    Args:
        model: any `nn.Module` (a transformers model, a LightningModule, ...).
        config: the `LoRAConfig`; default `LoRAConfig()`.
        prefix: match module names as if `model` sat at this path inside a larger module (a
            checkpoint's config was applied to the LightningModule, with the network at `"model"`).
        skip: subtrees (paths relative to `model`) left alone, e.g. a frozen teacher network.

    Returns:
        The paths of the adapted modules, relative to `model`.

    Raises:
        LoRAError: see `find_target_modules`; `modules_to_save` that match nothing.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        ['q_proj']
    """
    config = config if config is not None else LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}; "
                        "build one with LoRAConfig(r=..., target_modules=[...]).")
    skip = list(skip)
    names = find_target_modules(model, config, prefix, skip)
    parameters = find_target_parameters(model, config, prefix, skip, names)
    _check_variant_targets(model, names, config)
    saved = _modules_to_save(model, config, prefix, skip)
    state = LoRAState(config, prefix, names, saved, skipped=skip, vocab_rows=vocab_rows(model),
                      requires_grad={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)})
    state.embedding_keys = _carried_embedding_keys(model, config, skip)
    dtype = config.torch_adapter_dtype
    previous = model.__dict__.get(STATE_ATTR)  # the record of a merge kept with keep=True: replaced (one record)
    setattr(model, STATE_ATTR, state)
    quantized: dict[str, nn.Module] = {}  # layers replaced by their quantized version (config.quantize_base)
    try:
        if config.quantize_base is not None:
            quantize_base_modules(model, config, names, heads=sorted(output_head_names(model)), saved=saved,
                                  skip=skip, prefix=prefix, originals=quantized)
        model_dtype = floating_dtype(model) if dtype is None else None  # what adapter_dtype=None asks for
        fields = variant_fields(config)
        variants = selected_variants(**fields)
        for name in names:
            module = model.get_submodule(name)
            cls = adapter_class_for(module)
            assert cls is not None
            full = _join(prefix, name)
            r = config.rank_for(full)
            for variant in variants:  # e.g. a weight PiSSA cannot decompose
                variant.check_target(full, module, r)
            cls.check_target(full, module, r, **fields)  # e.g. a grouped conv's r
            extra = {"model_dtype": model_dtype} if dtype is None and cls.takes_model_dtype else {}
            layer = cls(module, r=r, alpha=config.alpha_for(full), dropout=config.dropout,
                        use_rslora=config.use_rslora, adapter_dtype=dtype, **fields, **extra)
            _set_submodule(model, name, layer)
            layer.adapter_compute_dtype = config.adapter_compute_dtype
            parts = name.split(".")  # a fused kernel of an ancestor must not read the adapted weights directly
            keep_adapters_running(layer, [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))])
        names.extend(_inject_parameter_adapters(model, parameters, config, prefix))  # state.adapted is `names`
        if "bitsandbytes" in sys.modules:  # casts must not reach the codes of bitsandbytes layers without adapters
            guard_quantized_storage(model, skip)
        state.originals = _original_tensors(model, saved)
        state.untied = _untie_modules_to_save(model, saved)
        state.originals.update(state.untied)  # a tied parameter's original is the one its partner still uses
        state.trainable_keys = compute_trainable_keys(model, config, prefix, skip)
        trainable = set(state.trainable_keys)
        for key, param in model.named_parameters(remove_duplicate=False):
            if not is_inside(key, skip):
                param.requires_grad_(key in trainable)
    except BaseException:
        unload(model)
        if quantized:
            restore_modules(model, quantized)
        if previous is not None:  # a merge kept by merge_and_unload(keep=True) stays undoable
            model.__dict__[STATE_ATTR] = previous
        raise
    return names


def _inject_parameter_adapters(model: nn.Module, parameters: Sequence[tuple[str, str]], config: LoRAConfig,
                               prefix: str) -> list[str]:
    """Put a `LoRAParameterHost` with one `LoRAParameter` per targeted parameter in place of each owner module
    (`target_parameters`); returns the adapter layers' paths. A host lands only once all its adapters exist."""
    owners: dict[str, list[str]] = {}
    for owner, pname in parameters:
        owners.setdefault(owner, []).append(pname)
    paths = []
    for owner, pnames in owners.items():
        host = LoRAParameterHost(model.get_submodule(owner))
        for pname in pnames:
            full = _join(prefix, _join(owner, pname))  # rank_pattern / alpha_pattern match the parameter's path
            layer = LoRAParameter(host, pname, r=config.rank_for(full), alpha=config.alpha_for(full),
                                  dropout=config.dropout, use_rslora=config.use_rslora, init=config.init,
                                  adapter_dtype=config.torch_adapter_dtype)
            layer.adapter_compute_dtype = config.adapter_compute_dtype
            host.add(pname, layer)
            paths.append(adapter_path(owner, pname))
        _set_submodule(model, owner, host)
    return paths


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating-point dtype holding most of `model`'s parameter values (by count; each tensor
    once), None when it has none. Integer storage (bitsandbytes' 4/8-bit codes) does not count.

    Example:
        >>> from torch import nn
        >>> floating_dtype(nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.LayerNorm(8)))
        torch.bfloat16
    """
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def _check_variant_targets(model: nn.Module, names: Sequence[str], config: LoRAConfig) -> None:
    """Each selected variant supports some layer types only (DoRA, PiSSA/OLoRA: Linear and Conv1D): name the
    matched modules of other types before anything is injected."""
    classes = {n: adapter_class_for(model.get_submodule(n)) for n in names}
    found = unsupported_targets(classes, **variant_fields(config))
    if found:
        variant, refused = found
        raise variant.targets_error(refused, [model.get_submodule(n) for n in refused])


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging them: the base layers come back unchanged, with the
    `requires_grad` flags they had before `inject_lora`. In place; returns `model`.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> type(unload(m).q_proj).__name__, m.q_proj.weight.requires_grad
        ('Linear', True)
    """
    states = [(path, s) for path, s in lora_states(model)]
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        layer.restore_base_weight()  # PiSSA / OLoRA: the original weight, not the residual
        _set_submodule(model, layer.module_path(name), layer.to_base_module())
    for path, state in states:
        root = model.get_submodule(path) if path else model
        for key, original in state.untied.items():
            owner, _, pname = key.rpartition(".")
            (root.get_submodule(owner) if owner else root)._parameters[pname] = original
        params = dict(root.named_parameters(remove_duplicate=False))
        for key, flag in state.requires_grad.items():
            if key in params:
                params[key].requires_grad_(flag)
        if "bitsandbytes" in sys.modules:
            unguard_quantized_storage(root)
        with contextlib.suppress(AttributeError):
            delattr(root, STATE_ATTR)
    return model


def _untie_modules_to_save(model: nn.Module, saved: Sequence[str]) -> dict[str, nn.Parameter]:
    """Give every parameter of `saved` modules that another module shares (a tied `lm_head`) its own
    trainable copy, as PEFT's `modules_to_save` copy does; returns the original parameters by key."""
    owners = _parameter_owners(model)
    untied: dict[str, nn.Parameter] = {}
    for path in saved:
        for sub_name, sub in model.get_submodule(path).named_modules():
            for pname, param in list(sub._parameters.items()):
                if param is not None and owners.get(id(param), 0) > 1:
                    untied[_join(_join(path, sub_name), pname)] = param
                    sub._parameters[pname] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    if untied:
        _untie_word_embeddings_flag(model)
    return untied


def _original_tensors(model: nn.Module, saved: Sequence[str]) -> dict[str, torch.Tensor]:
    """A frozen copy of every parameter and buffer of the `saved` modules (`modules_to_save`), by key:
    the module PEFT keeps as `original_module`, for `disable_lora`."""
    return {_join(path, key): tensor.detach().clone()
            for path in saved
            for key, tensor in [*model.get_submodule(path).named_parameters(remove_duplicate=False),
                                *model.get_submodule(path).named_buffers(remove_duplicate=False)]}


def _parameter_owners(model: nn.Module) -> dict[int, int]:
    """`id(parameter) -> number of modules that register it` (more than one: tied weights)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    return owners


def _untie_word_embeddings_flag(model: nn.Module) -> None:
    """Set `tie_word_embeddings=False` on every transformers config in `model`, so that
    `save_pretrained` / `from_pretrained` keep weights that merging has untied apart."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        text_cfg = None
        with contextlib.suppress(Exception):
            text_cfg = cfg.get_text_config()  # type: ignore[union-attr]
        for c in (cfg, text_cfg):
            if getattr(c, "tie_word_embeddings", False) is True:
                c.tie_word_embeddings = False


def enable_input_grads_for_checkpointing(model: nn.Module) -> None:
    """Reentrant gradient checkpointing needs the checkpointed block's input to require grad; with a
    frozen embedding it would not ("element 0 of tensors does not require grad"). For every
    transformers model inside `model` that has checkpointing on, register its input-grad hook once.

    Example:
        >>> enable_input_grads_for_checkpointing(nn.Linear(2, 2))   # nothing to do
    """
    for module in model.modules():
        on = getattr(module, "is_activation_checkpointing", None)  # transformers >= 5 name
        if on is None:
            on = getattr(module, "is_gradient_checkpointing", False)
        if on and hasattr(module, "enable_input_require_grads") and getattr(module, "_require_grads_hook", None) is None:
            module.enable_input_require_grads()
