"""Adapter state dicts: what an adapter holds (`lora_state_dict`), strict loading with every problem
named (`load_lora_state_dict`, `state_dict_problems`, `vocab_mismatch`), and injecting and loading in one
step that leaves the model as it was on any error (`inject_and_load`).

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> sorted(lora_state_dict(m))
    ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError, listed
from lightning_lora.surgery.adapters import solo
from lightning_lora.surgery.inject import inject_lora, unload
from lightning_lora.surgery.state import is_lora_key, lora_layers, saved_keys
from lightning_lora.surgery.transformers_lookup import embedding_keys


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Only what LoRA training changes: `lora_A`/`lora_B` weights, plus trainable biases and the
    state of `modules_to_save` (and the embedding matrices of a resized vocabulary, see
    `saved_keys`). Keys are the model's own state-dict keys. With `adapter_name`, that adapter's
    tensors under the keys it would have were it the model's only adapter (`...q_proj.lora_A.weight`;
    `lightning_lora.surgery.solo`).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> sorted(lora_state_dict(m))
        ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """
    if adapter_name is not None:
        with solo(model, adapter_name):
            return lora_state_dict(model)
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


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    """Load adapter weights strictly: missing, unexpected and wrongly shaped keys are one error.
    Values are copied into the existing parameters (cast to their dtype and device). With `adapter_name`,
    into that adapter, `state_dict` keyed as `lora_state_dict(model, adapter_name=)` gives.

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
    if adapter_name is not None:
        with solo(model, adapter_name):
            return load_lora_state_dict(model, state_dict)
    expected = lora_state_dict(model)
    problems = state_dict_problems(expected, state_dict, unexpected=True)
    if problems:
        raise LoRAError("The adapter state dict does not fit this model: " + " | ".join(problems) +
                        ". Check that the adapter was trained for this model with the same LoRA config "
                        "(r, target_modules, rank_pattern).")
    with torch.no_grad():
        for name, layer in lora_layers(model):  # e.g. PiSSA / OLoRA: the base becomes the residual of the loaded A0, B0
            for variant in layer.variants:
                variant.load_state(layer, state_dict, f"{name}." if name else "")
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
