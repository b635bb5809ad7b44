"""Every model operation on any `nn.Module`: find targets, inject (rolled back on error), freeze,
trainable keys, merge / unmerge / unload, adapter state dicts, optimizer restriction, counts and
adapter statistics. Nothing here knows about Lightning.

`inject_lora` records what it did in a typed `LoRAState` on the module it was called on
(`model.lora_state`): the config, the adapted module names and the keys training changes, computed
once. Every other function reads that record (`lora_states(model)` finds it on the model or on the
networks inside it).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightning_lora import LoRAConfig, inject_lora, merge_and_unload, count_parameters
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    >>> names = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    >>> names[0], model.lora_state.adapted == names
    ('model.layers.0.self_attn.q_proj', True)
    >>> count_parameters(model)[0]   # per layer: q 4*(64+64) + v 4*(64+32)
    1792
    >>> model = merge_and_unload(model)   # a plain LlamaForCausalLM again
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.errors import LoRAConfigError, LoRAError, listed
from lightning_lora.init import check_weight as check_init_weight
from lightning_lora.init import skip_base_init
from lightning_lora.layers import (
    HFConv1D,
    LoRAEmbedding,
    LoRALayer,
    adapter_class_for,
    refusal_reason,
    unsupported_target_error,
)
from lightning_lora.matching import (
    is_inside,
    modules_to_save_matches,
    name_matches,
    outermost,
    suffix_summary,
)

#: attribute of the module `inject_lora` was called on that holds its `LoRAState`
STATE_ATTR = "lora_state"
#: attribute that `merge_and_unload(keep=True)` sets, so that the merge can be undone
MERGED_ATTR = "lora_merged"
#: last path components that are output heads, never adapted by "all-linear"
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "embed_out", "output")


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


# ============================================================================ finding targets
def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (HFConv1D is not None and isinstance(module, HFConv1D))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def embedding_of(module: nn.Module, which: str) -> nn.Module | None:
    """What `module.get_input_embeddings()` (`which="input"`) or `get_output_embeddings()` (`"output"`)
    returns when it is a module; None for a module without that getter, or whose getter raises
    (transformers' base models raise `NotImplementedError` for the output embeddings).

    Example:
        >>> from torch import nn
        >>> embedding_of(nn.Linear(2, 2), "input") is None
        True
    """
    getter = getattr(module, f"get_{which}_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except Exception:  # noqa: BLE001 - any failing getter means: no such embedding to use
        return None
    return found if isinstance(found, nn.Module) else None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output heads in `model`: what `get_output_embeddings()` returns for every model
    inside it (e.g. BERT's `cls.predictions.decoder`), and modules named like a head (`lm_head`,
    `score`, `classifier`, ...). "all-linear" never adapts them (PEFT's rule).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("lm_head", nn.Linear(2, 2))
        >>> output_head_names(m)
        {'lm_head'}
    """
    outs = [out for module in model.modules() if (out := embedding_of(module, "output")) is not None]
    return {name for name, module in model.named_modules()
            if any(module is o for o in outs) or name.rsplit(".", 1)[-1] in HEAD_NAMES}


#: output heads a task model adds to its base, by PEFT task type (PEFT's `classifier_module_names`,
#: `qa_module_names`): trained and saved with `task_heads=True`
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def _pretrained_models(model: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """`(path, module)` of the outermost transformers models inside `model` (outside `skip`)."""
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return []
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel) and not is_inside(n, skip)]
    return [(n, m) for n, m in found if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in found)]


def task_head_names(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Paths of the heads that the task models inside `model` add (`score` of a
    `LlamaForSequenceClassification`, `classifier` of a `BertForTokenClassification`, `qa_outputs`).

    Example:
        >>> from transformers import LlamaConfig, LlamaForSequenceClassification
        >>> m = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=2, vocab_size=64, num_labels=3, pad_token_id=0))
        >>> task_head_names(m)
        ['score']
    """
    heads = []
    for path, network in _pretrained_models(model, skip):
        for head in TASK_HEADS.get(infer_task_type(network) or "", ()):
            if isinstance(getattr(network, head, None), nn.Module):
                heads.append(_join(path, head))
    return heads


def _modules_to_save(model: nn.Module, config: LoRAConfig, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    heads = task_head_names(model, skip) if config.task_heads else []
    if not config.modules_to_save:
        return heads
    names = [n for n, _ in model.named_modules() if n and not is_inside(n, skip)]
    top = [n[len(prefix) + 1:] if prefix else n
           for n in modules_to_save_matches([_join(prefix, n) for n in names], config.modules_to_save)]
    missing = [s for s in config.modules_to_save if not any(name_matches(_join(prefix, n), [s]) for n in top)]
    if missing:
        raise LoRAError(f"modules_to_save={config.modules_to_save!r}: {missing!r} matched no module; modules in "
                        f"this model end with: {suffix_summary(names)}.")
    return outermost(top + [h for h in heads if h not in top])


def find_target_modules(model: nn.Module, config: LoRAConfig, prefix: str = "",
                        skip: Sequence[str] = ()) -> list[str]:
    """Paths (relative to `model`) of the modules `config` adapts, in `named_modules()` order.

    Args:
        model: any module.
        config: the `LoRAConfig`.
        prefix: match names as if `model` sat at this path (e.g. `"model"` inside a LightningModule).
        skip: subtrees (paths relative to `model`) never searched.

    Raises:
        LoRAError: when the model already has adapters, nothing matches (the message lists the
            model's Linear-like modules), or a matched module's type cannot take an adapter.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> find_target_modules(m, LoRAConfig(target_modules=["q_proj"]))
        ['q_proj']
    """
    named = [(n, m) for n, m in model.named_modules() if n and not is_inside(n, skip)]
    if isinstance(model, LoRALayer) or any(isinstance(m, LoRALayer) for _, m in named):
        raise LoRAError("This model already has LoRA adapters; injecting twice is not supported. "
                        "Call merge_and_unload(model) or unload(model) first, or load the adapters into a fresh "
                        "base model.")
    targets = config.target_modules
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    saved = _modules_to_save(model, config, prefix, skip)
    chosen: list[str] = []
    for name, module in named:
        full = _join(prefix, name)
        hit = (_linear_like(module) and name not in heads) if targets == ALL_LINEAR else name_matches(full, targets)
        if not hit or name_matches(full, config.exclude_modules) or is_inside(name, saved):
            continue  # modules_to_save are trained fully and saved instead
        if any(name.startswith(c + ".") for c in chosen):
            continue  # inside a module that is already adapted
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if adapter_class_for(module) is None or refusal_reason(module, parent) is not None:
            inner = [n for n, m in named if n.startswith(name + ".") and _linear_like(m)]
            raise unsupported_target_error(name, module, targets, suffix_summary(inner, 6), parent)
        chosen.append(name)
    if not chosen:
        linear = [n for n, m in named if _linear_like(m)]
        raise LoRAError(f"target_modules={targets!r} matched no module; Linear modules in this model end with: "
                        f"{suffix_summary(linear) or '(none)'}. Pass some of these names, a regex matching "
                        "whole module paths, or 'all-linear'.")
    return chosen


# ============================================================================ inject / unload
def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_trainable_key(model: nn.Module, key: str, config: LoRAConfig, saved: Sequence[str]) -> bool:
    """Whether a state-dict key is trained and saved: adapters, `modules_to_save`, biases per `config.bias`."""
    if is_lora_key(key) or is_inside(key.rpartition(".")[0], saved):
        return True
    if key.endswith(".bias") or key == "bias":
        if config.bias == "all":
            return True
        if config.bias == "lora_only":
            owner = key.rpartition(".")[0]
            with contextlib.suppress(AttributeError):
                return isinstance(model.get_submodule(owner) if owner else model, LoRALayer)
    return False


def embedding_keys(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """State-dict keys of the input and output embedding matrices (and an output bias) of the
    transformers models inside `model`: what `save_embedding_layers` carries.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=64))
        >>> embedding_keys(m)
        ['model.embed_tokens.weight', 'lm_head.weight']
    """
    keys: list[str] = []
    for path, network in _pretrained_models(model, skip):
        for which in ("input", "output"):
            emb = embedding_of(network, which)
            for name, module in network.named_modules():
                if emb is not None and module is emb:
                    keys += [_join(_join(path, name), k) for k, v in module.named_parameters(recurse=False)
                             if v is not None]
    return list(dict.fromkeys(keys))


def vocab_rows(model: nn.Module) -> int | None:
    """Rows of the input embedding of the (first) transformers model inside `model`, or None.

    Example:
        >>> from torch import nn
        >>> vocab_rows(nn.Linear(2, 2)) is None
        True
    """
    for _, network in _pretrained_models(model):
        embedding = embedding_of(network, "input")
        rows = getattr(embedding, "num_embeddings", None)  # FSDP1 leaves `weight` a flat shard outside forward
        weight = getattr(embedding, "weight", None)
        if isinstance(rows, int) or isinstance(weight, torch.Tensor):
            return int(rows) if isinstance(rows, int) else int(weight.shape[0])
    return None


def base_vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size of the base model that the transformers model inside `model` was made
    from, before any `resize_token_embeddings`: its `config.json` (found offline from
    `name_or_path`, PEFT's rule), else the `vocab_size` its inner modules were built with; None when
    neither is known.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=64))
        >>> _ = m.resize_token_embeddings(70, mean_resizing=False)
        >>> base_vocab_size(m), vocab_rows(m)
        (64, 70)
    """
    networks = _pretrained_models(model)
    if not networks:
        return None
    network = networks[0][1]
    name = str(getattr(network, "name_or_path", "") or "")
    if name:
        with contextlib.suppress(Exception):
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name, local_files_only=True)
            size = getattr(cfg.get_text_config(), "vocab_size", None)
            if isinstance(size, int):
                return size
    sizes = [v for m in network.modules() if isinstance(v := m.__dict__.get("vocab_size"), int) and v > 0]
    return min(sizes) if sizes else None


def _carried_embedding_keys(model: nn.Module, config: LoRAConfig, skip: Sequence[str]) -> list[str]:
    if config.save_embedding_layers is False:
        return []
    if config.save_embedding_layers is True:
        return embedding_keys(model, skip)
    rows, base = vocab_rows(model), base_vocab_size(model)
    return embedding_keys(model, skip) if rows is not None and base is not None and rows != base else []


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


def compute_trainable_keys(model: nn.Module, config: LoRAConfig, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
    """The state-dict keys of an injected `model` that training with `config` changes (adapters,
    `modules_to_save`, biases per `config.bias`), in state-dict order. `inject_lora` records them in
    `LoRAState.trainable_keys`; this computes them for adapters that have no record.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"], bias="all"))
        >>> compute_trainable_keys(m, LoRAConfig(r=2, target_modules=["q_proj"], bias="all"))
        ['q_proj.bias', 'q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """
    saved = _modules_to_save(model, config, prefix, skip)
    # a skipped subtree the user trains (any parameter with requires_grad) is trained and saved whole
    trained = [s for s in skip if any(p.requires_grad for p in model.get_submodule(s).parameters())]
    return [k for k in model.state_dict(keep_vars=True)
            if is_inside(k.rpartition(".")[0], trained)
            or (not is_inside(k, skip) and _is_trainable_key(model, k, config, saved))]


def inject_lora(model: nn.Module, config: LoRAConfig | None = None, *, prefix: str = "",
                skip: Sequence[str] = ()) -> list[str]:
    """Replace the targeted modules of `model` by adapter layers, in place, and freeze the base.

    Every base parameter gets `requires_grad=False`, except biases per `config.bias` and the
    parameters of `config.modules_to_save`; parameters inside `skip` keep their flag. What was done is
    recorded in `model.lora_state` (a `LoRAState`). On any error the model is left as it was.

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
    _check_variant_targets(model, names, config)
    saved = _modules_to_save(model, config, prefix, skip)
    state = LoRAState(config, prefix, names, saved, skipped=skip, vocab_rows=vocab_rows(model),
                      requires_grad={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)})
    state.embedding_keys = _carried_embedding_keys(model, config, skip)
    dtype = config.torch_adapter_dtype
    setattr(model, STATE_ATTR, state)
    quantized: dict[str, nn.Module] = {}  # layers replaced by their quantized version (config.quantize_base)
    try:
        if config.quantize_base is not None:
            from lightning_lora.quantization import quantize_base_modules

            quantize_base_modules(model, config, names, heads=sorted(output_head_names(model)), saved=saved,
                                  skip=skip, prefix=prefix, originals=quantized)
        model_dtype = floating_dtype(model) if dtype is None else None  # what adapter_dtype=None asks for
        for name in names:
            module = model.get_submodule(name)
            cls = adapter_class_for(module)
            assert cls is not None
            full = _join(prefix, name)
            if config.base_changing_init:  # PiSSA / OLoRA: a weight they cannot start from, named
                check_init_weight(config.init, module.weight, config.rank_for(full), name=full)
            extra = {"model_dtype": model_dtype} if dtype is None and cls.takes_model_dtype else {}
            layer = cls(module, r=config.rank_for(full), alpha=config.alpha_for(full), dropout=config.dropout,
                        use_rslora=config.use_rslora, init=config.init, adapter_dtype=dtype,
                        use_dora=config.use_dora, **extra)
            _set_submodule(model, name, layer)
            layer.adapter_compute_dtype = config.adapter_compute_dtype
        if "bitsandbytes" in sys.modules:  # casts must not reach the codes of bitsandbytes layers without adapters
            from lightning_lora.quantization import guard_quantized_storage

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
            from lightning_lora.quantization import restore_modules

            restore_modules(model, quantized)
        raise
    return names


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
    """DoRA and PiSSA/OLoRA adapt Linear and Conv1D layers only: name the embeddings they matched."""
    if not (config.use_dora or config.base_changing_init):
        return
    embeddings = [n for n in names if adapter_class_for(model.get_submodule(n)) is LoRAEmbedding]
    if embeddings:
        what = "use_dora=True" if config.use_dora else f"init={config.init!r}"
        raise LoRAConfigError(f"{what} cannot adapt the embedding(s) {embeddings[:4]}: lightning-lora implements "
                              f"{'DoRA' if config.use_dora else 'PiSSA/OLoRA'} for Linear and Conv1D layers. Add them "
                              "to exclude_modules (or leave them out of target_modules), or drop the option.")


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
        _set_submodule(model, name, layer.to_base_module())
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
            from lightning_lora.quantization import unguard_quantized_storage

            unguard_quantized_storage(root)
        with contextlib.suppress(AttributeError):
            delattr(root, STATE_ATTR)
    return model


# ============================================================================ looking things up
def lora_states(model: nn.Module) -> list[tuple[str, LoRAState]]:
    """`(path, state)` for `model`'s own `LoRAState` or, if it has none, for the outermost modules
    inside it that have one (a network inside a LightningModule).

    Example:
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
        >>> from torch import nn
        >>> outer = nn.Module(); outer.net = nn.Sequential(); outer.net.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(outer.net, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> trainable_keys(outer)
        ['net.q_proj.lora_A.weight', 'net.q_proj.lora_B.weight']
    """
    states = lora_states(model)
    if not states:
        raise LoRAError("This model has no LoRA adapters; call inject_lora(model, LoRAConfig(...)) first.")
    return [_join(path, k) for path, state in states for k in state.trainable_keys]


def saved_keys(model: nn.Module) -> list[str]:
    """The state-dict keys an adapter (and an adapter-only checkpoint) holds: `trainable_keys` plus
    the embedding matrices carried for a resized vocabulary (`LoRAState.embedding_keys`; with
    `save_embedding_layers="auto"` also when the vocabulary was resized after injection).

    Example:
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


#: name components that wrappers add to module / parameter names (FSDP1 units, activation checkpointing, compile)
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _without_wrappers(name: str) -> str:
    """`name` without the components that FSDP1, activation-checkpointing and compile wrappers add."""
    if "_" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what LoRA training changes: `lora_A`/`lora_B` weights, plus trainable biases and the
    state of `modules_to_save` (and the embedding matrices of a resized vocabulary, see
    `saved_keys`). Keys are the model's own state-dict keys.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> sorted(lora_state_dict(m))
        ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """
    full = model.state_dict()
    return {k: full[k] for k in saved_keys(model) if k in full}


def state_dict_problems(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor],
                        unexpected: bool) -> list[str]:
    """Missing, (optionally) unexpected and mis-shaped keys of `state_dict` against `expected`, one
    short summary per kind (the first few keys and how many more: `errors.listed`); empty when it fits.

    Example:
        >>> state_dict_problems({"a": torch.zeros(2)}, {"a": torch.zeros(3), "b": torch.zeros(1)}, unexpected=True)
        ['unexpected keys (1): b', 'shape mismatches (1): a: checkpoint (3,) vs model (2,)']
        >>> state_dict_problems({f"k{i}": torch.zeros(1) for i in range(5)}, {}, unexpected=False)
        ['missing adapter keys (5): k0, k1, k2 ... and 2 more']
    """
    def summary(kind: str, items: list[str], sep: str = ", ") -> str:
        return f"{kind} ({len(items)}): {listed(items, sep=sep)}"

    missing = sorted(k for k in expected if k not in state_dict)
    extra = sorted(k for k in state_dict if k not in expected) if unexpected else []
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(summary("missing adapter keys" if not unexpected else "missing keys", missing))
    if extra:
        parts.append(summary("unexpected keys", extra))
    if shapes:
        parts.append(summary("shape mismatches", shapes, "; "))
    return parts


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter weights strictly: missing, unexpected and wrongly shaped keys are one error.
    Values are copied into the existing parameters (cast to their dtype and device).

    Raises:
        LoRAError: listing every missing, unexpected and mis-shaped key.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> load_lora_state_dict(m, {"q_proj.lora_A.weight": torch.ones(2, 4), "q_proj.lora_B.weight": torch.ones(4, 2)})
        >>> m.q_proj.lora_B.weight.sum().item()
        8.0
    """
    expected = lora_state_dict(model)
    problems = state_dict_problems(expected, state_dict, unexpected=True)
    if problems:
        raise LoRAError("The adapter state dict does not fit this model: " + " | ".join(problems) +
                        ". Check that the adapter was trained for this model with the same LoRA config "
                        "(r, target_modules, rank_pattern).")
    with torch.no_grad():
        for name, layer in lora_layers(model):  # PiSSA / OLoRA: the base becomes the residual of the loaded A0, B0
            a0, b0 = state_dict.get(_join(name, "lora_init_A")), state_dict.get(_join(name, "lora_init_B"))
            if a0 is not None and b0 is not None and getattr(layer, "lora_init_A", None) is not None:
                layer.load_init_adapters(a0, b0)
        params = dict(model.state_dict(keep_vars=True))
        for key, value in state_dict.items():
            params[key].copy_(value)


def inject_and_load(model: nn.Module, config: LoRAConfig, state_dict: dict[str, torch.Tensor], *, prefix: str = "",
                    trainable: bool = False, base_tensors: dict[str, torch.Tensor] | None = None) -> list[str]:
    """`inject_lora(model, config, prefix=prefix)`, then load `state_dict` strictly; on any error the
    model is left exactly as it was (adapters removed, flags and base tensors restored).

    Args:
        model: the base network (keys of `state_dict` are relative to it).
        config: the adapters' `LoRAConfig`.
        state_dict: every key LoRA trains (adapters, trained biases, `modules_to_save`), nothing else.
        prefix: see `inject_lora`.
        trainable: leave what LoRA trains with `requires_grad=True`; by default every parameter of
            the model is frozen (inference).
        base_tensors: base tensors to overwrite as well; each must exist with the same shape. The
            embedding matrices an adapter carries for a resized vocabulary (`saved_keys`) are taken
            out of `state_dict` and treated as such (a vocabulary that does not fit is an error that
            names both sizes).

    Returns:
        The adapted module paths.

    Raises:
        LoRAError: the model already has adapters, or the tensors do not fit (every problem listed).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> sd = {"q_proj.lora_A.weight": torch.ones(2, 4), "q_proj.lora_B.weight": torch.ones(4, 2)}
        >>> inject_and_load(m, LoRAConfig(r=2, target_modules=["q_proj"]), sd)
        ['q_proj']
    """
    base_tensors = dict(base_tensors or {})
    emb = set(embedding_keys(model))  # embedding matrices carried for a resized vocabulary are base tensors
    base_tensors.update({k: v for k, v in state_dict.items() if k in emb and not is_lora_key(k)})
    state_dict = {k: v for k, v in state_dict.items() if k not in base_tensors}
    combined = {**state_dict, **base_tensors}
    problem = vocab_mismatch(model, combined)
    if problem:
        raise LoRAError(f"The vocabulary does not fit: {problem}.")
    own = dict(model.state_dict(keep_vars=True))
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape) if k in own else 'absent'}"
           for k, v in base_tensors.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise LoRAError(f"base tensors do not fit this model ({len(bad)}: {listed(bad, sep='; ')}).")
    names = inject_lora(model, config, prefix=prefix)
    saved = {k: own[k].detach().clone() for k in base_tensors}
    try:
        expected = lora_state_dict(model)
        load_lora_state_dict(model, {k: v for k, v in combined.items() if k in expected or k in state_dict})
        with torch.no_grad():
            for k, v in base_tensors.items():
                if k not in expected:
                    own[k].copy_(v)
    except BaseException:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)
        unload(model)
        raise
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return names


def vocab_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why `tensors` (an adapter's, keyed like `model`'s state dict) cannot load for lack of the same
    vocabulary: an embedding matrix with another number of rows than `model`'s; else None.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=2, vocab_size=64))
        >>> vocab_mismatch(m, {"model.embed_tokens.weight": torch.zeros(70, 32)})[:73]
        'the adapter was trained with a vocabulary of 70 tokens, this model has 64'
    """
    keys = set(embedding_keys(model))
    own = model.state_dict()
    for key, value in tensors.items():
        if key in keys and key in own and value.ndim and value.shape[0] != own[key].shape[0]:
            rows = value.shape[0]
            return (f"the adapter was trained with a vocabulary of {rows} tokens, this model has {own[key].shape[0]} "
                    f"({key}: adapter {tuple(value.shape)}, model {tuple(own[key].shape)}); add the same tokens to "
                    f"the tokenizer and call model.resize_token_embeddings({rows}) before loading")
    return None


# ============================================================================ merging
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


@dataclass
class MergedAdapters:
    """What `merge_and_unload(model, keep=True)` folded in, kept on `model.lora_merged` so that
    `unmerge_and_reinject` can undo the merge (the adapters, on the CPU: a few MB).

    Attributes:
        states: `(path, LoRAState)` of every injection root that was merged.
        adapters: the adapter weights (`lora_A`/`lora_B`) under the model's state-dict keys.
    """

    states: list[tuple[str, LoRAState]]
    adapters: dict[str, torch.Tensor]
    #: the quantized layers the merge replaced by dense ones (path -> module without adapters)
    quantized: dict[str, nn.Module] = field(default_factory=dict)
    #: DoRA layers: the weight norm at merge time, which undoing the merge needs
    dora_norms: dict[str, torch.Tensor] = field(default_factory=dict)


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
        keep: keep the adapters on `model.lora_merged` (a `MergedAdapters`) so that
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
    states = lora_states(model)
    from lightning_lora.quantization import dequantize_for_merge

    quantized = dequantize_for_merge(model, dtype)
    if keep:
        adapters = {k: v.detach().to("cpu", copy=True) for k, v in lora_state_dict(model).items() if is_lora_key(k)}
        model.__dict__[MERGED_ATTR] = MergedAdapters(states, adapters, quantized)
    owners = _parameter_owners(model)
    untied = False
    for name, layer in list(lora_layers(model)):
        if owners.get(id(layer.weight), 0) > 1:
            # Tied weight: merging in place would change the other module too.
            layer.unmerge()
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            untied = True
        layer.merge()
        if keep and layer._dora_merge_norm is not None:
            model.__dict__[MERGED_ATTR].dora_norms[name] = layer._dora_merge_norm.detach().to("cpu", copy=True)
        _set_submodule(model, name, layer.to_base_module())
    if untied:
        _untie_word_embeddings_flag(model)
    for path, _ in states:
        with contextlib.suppress(AttributeError):
            delattr(model.get_submodule(path) if path else model, STATE_ATTR)
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
    record = model.__dict__.get(MERGED_ATTR)
    if not isinstance(record, MergedAdapters):
        raise LoRAError("This model was not merged with merge_and_unload(model, keep=True); there is nothing to "
                        "undo. Load the adapters into a fresh base model instead.")
    if record.quantized:  # the quantized layers come back as they were (nothing is quantized again)
        from lightning_lora.quantization import restore_modules

        restore_modules(model, record.quantized)
    names = []
    for path, state in record.states:
        root = model.get_submodule(path) if path else model
        with skip_base_init():  # PiSSA / OLoRA: the merged weight already holds the residual base
            names += [_join(path, n) for n in inject_lora(root, state.config, prefix=state.prefix, skip=state.skipped)]
        new_state = root.__dict__[STATE_ATTR]
        # what the model was before injection, not the merged model: flags, ties and modules_to_save's originals
        new_state.requires_grad, new_state.untied, new_state.originals = state.requires_grad, state.untied, state.originals
    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for key, value in record.adapters.items():
            params[key].copy_(value)
    for name, layer in lora_layers(model):
        if name not in record.quantized:
            layer.merged = True
            if name in record.dora_norms:
                layer._dora_merge_norm = record.dora_norms[name]
            layer.unmerge()
    del model.__dict__[MERGED_ATTR]
    return names


def is_merged(model: nn.Module) -> bool:
    """Whether `merge_and_unload(model, keep=True)` merged adapters that can still be undone.

    Example:
        >>> from torch import nn
        >>> is_merged(nn.Linear(2, 2))
        False
    """
    return isinstance(model.__dict__.get(MERGED_ATTR), MergedAdapters)


def merged_config(model: nn.Module) -> LoRAConfig | None:
    """The `LoRAConfig` of the adapters that `merge_and_unload(model, keep=True)` merged, or None.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> merged_config(merge_and_unload(m, keep=True)).r
        2
    """
    record = model.__dict__.get(MERGED_ATTR)
    return record.states[0][1].config if isinstance(record, MergedAdapters) and record.states else None


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapters into the base weights but keep them (PEFT's `merge_adapter`); the model then
    computes at the base model's speed. Undo with `unmerge_adapter`.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> merge_adapter(m); m.q_proj.merged
        True
    """
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


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}.",
                  DeprecationWarning, stacklevel=3)


def merge_lora(model: nn.Module) -> nn.Module:
    """Deprecated alias of `merge_and_unload` (fold in and remove).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> type(merge_lora(m).q_proj).__name__
        'Linear'
    """
    _deprecated("merge_lora", "merge_and_unload")
    return merge_and_unload(model)


def merge_adapters(model: nn.Module) -> None:
    """Deprecated alias of `merge_adapter` (fold in, keep the adapters)."""
    _deprecated("merge_adapters", "merge_adapter")
    merge_adapter(model)


def unmerge_adapters(model: nn.Module) -> None:
    """Deprecated alias of `unmerge_adapter`."""
    _deprecated("unmerge_adapters", "unmerge_adapter")
    unmerge_adapter(model)


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


# ============================================================================ optimizers
def find_optimizers(obj: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer inside what `configure_optimizers` returned (an optimizer, list, tuple, dict).

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> find_optimizers({"optimizer": opt, "lr_scheduler": None}) == [opt]
        True
    """
    if isinstance(obj, torch.optim.Optimizer):
        return [obj]
    if isinstance(obj, dict):
        return [o for v in obj.values() for o in find_optimizers(v)]
    if isinstance(obj, (list, tuple)):
        return [o for v in obj for o in find_optimizers(v)]
    return []  # schedulers and other entries


def restrict_optimizer(optimizer: torch.optim.Optimizer, trainable: Sequence[nn.Parameter],
                       base: Sequence[nn.Parameter] | None = None) -> None:
    """Leave `optimizer` holding only `trainable` parameters (groups keep their order and options,
    so a scheduler built on the optimizer stays valid).

    An optimizer whose one group holds exactly the `base` parameters was built over the whole
    module before the adapters existed (LightningCLI's `--optimizer` does this): its group is given
    the trainable parameters instead.

    Raises:
        LoRAError: when no trainable parameter is left in the optimizer.

    Example:
        >>> w, a = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w, a], lr=0.1)
        >>> restrict_optimizer(opt, [a]); opt.param_groups[0]["params"] == [a]
        True
    """
    groups = optimizer.param_groups
    if base is not None and len(groups) == 1 and {id(p) for p in groups[0]["params"]} == {id(p) for p in base}:
        groups[0]["params"] = list(trainable)
        return
    keep = {id(p) for p in trainable}
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    if not any(group["params"] for group in groups):
        raise LoRAError(f"{type(optimizer).__name__} holds none of the LoRA parameters after freezing the base. "
                        "Build it from self.parameters() (or self.trainer.model.parameters()) so that the "
                        "adapters are included.")


def restrict_optimizers(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """`restrict_optimizer` for each optimizer, with `model`'s trainable parameters (those with
    `requires_grad`) and its base parameters (all but the adapters).

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> opt = torch.optim.AdamW(m.parameters())          # built before injection
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> restrict_optimizers(m, [opt]); len(opt.param_groups[0]["params"])
        2
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = [p for n, p in model.named_parameters() if not is_lora_key(n)]
    for optimizer in optimizers:
        restrict_optimizer(optimizer, trainable, base)


# ============================================================================ counts and statistics
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (tied parameters counted once).

    Example:
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
        row.lora += layer.lora_magnitude_vector.numel() if layer.use_dora else 0
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
    runs without autograd (`LoRALayer.dora_weight_norm` keeps the norm there).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"], use_dora=True))
        >>> m.q_proj.lora_B.weight.data.fill_(0.1) is not None
        True
        >>> forget_dora_norms(m)
    """
    for _, layer in lora_layers(model):
        layer.forget_dora_norm()


def weight_norms(model: nn.Module) -> dict[str, float]:
    """`||W||_F` (float32) of every adapted layer's base weight, by layer path.

    Example:
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
    (`||B A||_F^2 = sum((B^T B) * (A A^T))`), so no out x in matrix is formed.

    Args:
        model: a model with adapters.
        norms: `weight_norms(model)` computed earlier (the base weights do not change in training).

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> delta_ratio(m)      # B = 0 at the start
        0.0
    """
    ratios = []
    for name, layer in lora_layers(model):
        a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
        delta = layer.scaling * torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0)).item()
        w = (norms or {}).get(name) or layer.weight_norm()
        ratios.append(delta / w if w > 0 else math.inf)
    return sum(ratios) / len(ratios) if ratios else 0.0


def adapter_grad_norm(model: nn.Module) -> float:
    """The global L2 norm of the gradients of `lora_parameters(model)` (0.0 when none has one).

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> adapter_grad_norm(m)
        0.0
    """
    grads = [p.grad.detach().float().norm() for p in lora_parameters(model) if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


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


def networks_to_skip(pl_module: nn.Module, networks: list[str] | None) -> list[str]:
    """The subtrees of `pl_module` the callback leaves alone.

    With `networks` (paths inside the module), everything outside them; otherwise the direct children
    whose parameters were all frozen before setup (a teacher), when another child has trainable ones.

    Raises:
        LoRAError: a path in `networks` that is not a submodule.

    Example:
        >>> from torch import nn
        >>> m = nn.Module(); m.student = nn.Linear(2, 2); m.teacher = nn.Linear(2, 2).requires_grad_(False)
        >>> networks_to_skip(m, None), networks_to_skip(m, ["teacher"])
        (['teacher'], ['student'])
    """
    if networks:
        for path in networks:
            try:
                pl_module.get_submodule(path)
            except AttributeError:
                children = ", ".join(n for n, _ in pl_module.named_children())
                raise LoRAError(f"networks={networks!r}: {path!r} is not a submodule of "
                                      f"{type(pl_module).__name__}; its submodules are: {children}.") from None
        return outermost(n for n, _ in pl_module.named_modules()
                         if n and not any(n == p or n.startswith(p + ".") or p.startswith(n + ".") for p in networks))
    children = [(n, [p.requires_grad for p in c.parameters()]) for n, c in pl_module.named_children()]
    if not any(any(flags) for _, flags in children):
        return []
    return [n for n, flags in children if flags and not any(flags)]


class AdapterProbe:
    """Notes which adapter layers of `model` run until `close()` (forward pre-hooks on the layers;
    the adapter paths do not change). An adapter that never runs never trains: its parent reads its
    `.weight` directly, or no input reached it.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4)); m.add_module("k_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]))
        >>> probe = AdapterProbe(m); _ = m.q_proj(torch.zeros(1, 4)); probe.close()
        ['k_proj']
    """

    def __init__(self, model: nn.Module) -> None:
        self.ran = {name: False for name, _ in lora_layers(model)}
        self._handles = [layer.register_forward_pre_hook(lambda *_, name=name: self.ran.__setitem__(name, True))
                         for name, layer in lora_layers(model)]

    def close(self) -> list[str]:
        """Remove the hooks; returns the paths of the adapter layers that did not run."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return [name for name, ran in self.ran.items() if not ran]


# ============================================================================ the network inside a module
def find_network(model: nn.Module) -> tuple[str, nn.Module]:
    """`(path, module)` of the network inside `model`: the outermost transformers `PreTrainedModel`
    that holds adapters (e.g. `("model", pl_module.model)` and not a frozen teacher next to it), else
    the outermost `PreTrainedModel`, else `("", model)`.

    Example:
        >>> from torch import nn
        >>> find_network(nn.Linear(2, 2))[0]
        ''
    """
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return "", model
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    found = [(n, m) for n, m in found if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in found)]
    for name, module in found:
        if has_lora(module) or lora_states(module):
            return name, module
    return found[0] if found else ("", model)


#: PEFT task types and the transformers auto-mapping that tells them from a model class
_TASK_MAPPINGS = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("ForCausalLM", "LMHeadModel")),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", ("ForSequenceClassification",)),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", ("ForSeq2SeqLM",)),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", ("ForTokenClassification",)),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", ("ForQuestionAnswering",)),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES", ()),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task type (`"CAUSAL_LM"`, `"SEQ_CLS"`, ...) for a transformers model class, else None.

    Example:
        >>> from torch import nn
        >>> infer_task_type(nn.Linear(2, 2)) is None
        True
    """
    cls_name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto
    except Exception:  # pragma: no cover
        modeling_auto = None
    for task, mapping_name, suffixes in _TASK_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, {}) if modeling_auto is not None else {}
        for value in mapping.values():
            names = value if isinstance(value, (tuple, list)) else (value,)
            if cls_name in names:
                return task
        if any(cls_name.endswith(s) for s in suffixes):
            return task
    return None
