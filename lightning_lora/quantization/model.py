"""Whole-model operations on quantized bases: choose and quantize the base layers (`modules_to_quantize`,
`quantize_base_modules`, `restore_modules`), prepare a merge (`merge_dtype`, `dequantize_module`,
`dequantize_for_merge`, the bitsandbytes config dropped and restored), keep bitsandbytes codes safe
from casts (`guard_quantized_storage` / `unguard_quantized_storage`), build in host memory
(`host_init_context`) and count (`is_quantized_module`, `quantized_weight_bytes`).

Example:
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64))
    >>> quantize_base_modules(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"])
    ['q_proj']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_lora.config import ADAPTER_DTYPES, ALL_LINEAR, LoRAConfig, _dtype_name
from lightning_lora.errors import LoRAError, QuantizationError
from lightning_lora.matching import is_inside, name_matches
from lightning_lora.quantization._common import _apply_keeping_quantized, _bnb_module, is_nf4_tensor, linear_like
from lightning_lora.quantization.bitsandbytes import _LoRABitsAndBytes, bitsandbytes, dequantize_bnb_linear
from lightning_lora.quantization.layers import LoRAQuantizedLinear
from lightning_lora.quantization.nf4 import NF4_BLOCK_SIZE, NF4Linear, nf4_bytes, torchao_nf4
from lightning_lora.replacements import replace_attribute, replace_class, undo_replacements

#: the module path the cast-safe classes pickle under (`lightning_lora.quantization.__getattr__` rebuilds them)
_PICKLE_MODULE = "lightning_lora.quantization"


def is_quantized_module(module: nn.Module) -> bool:
    """Whether `module` holds a quantized weight: an `NF4Linear`, a bitsandbytes 4/8-bit Linear, or
    an adapter around one that is not merged.

    Example:
        >>> is_quantized_module(NF4Linear.from_linear(nn.Linear(64, 8))), is_quantized_module(nn.Linear(64, 8))
        (True, False)
    """
    if isinstance(module, LoRAQuantizedLinear):
        return module.is_quantized
    return isinstance(module, NF4Linear) or _bnb_module(module, "Linear4bit") or _bnb_module(module, "Linear8bitLt")


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights in `model` (NF4 codes and scales; bitsandbytes codes and quant
    state), each counted once.

    Example:
        >>> quantized_weight_bytes(NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False)))
        540996
    """
    total, seen = 0, set()
    for module in model.modules():
        if not is_quantized_module(module) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        w = module.weight
        if is_nf4_tensor(w):
            total += nf4_bytes(w)
        else:
            total += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                             if isinstance(t, torch.Tensor))
            layer = module._synced() if isinstance(module, _LoRABitsAndBytes) else module
            scb = getattr(getattr(layer, "state", None), "SCB", None)
            scb = scb if scb is not None else getattr(w, "SCB", None)
            if scb is not None:
                total += scb.numel() * scb.element_size()
    return total


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def modules_to_quantize(model: nn.Module, config: LoRAConfig, adapted: Sequence[str], *, heads: Sequence[str] = (),
                        saved: Sequence[str] = (), skip: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Paths of the `nn.Linear` layers `config.quantize_base` stores in NF4, in `named_modules()` order:
    the adapted ones, with `quantize_base_modules="all-linear"` (the default) also every other
    `nn.Linear` except the output `heads`, `modules_to_save` (`saved`), `config.exclude_modules`
    (matched at `prefix`, as for adapters) and `skip` subtrees. Layers already quantized (NF4 or
    bitsandbytes) and adapted Conv1D / Embedding layers are left as they are.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64)); m.add_module("o_proj", nn.Linear(64, 64))
        >>> modules_to_quantize(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"])
        ['q_proj', 'o_proj']
        >>> cfg = LoRAConfig(target_modules=["q_proj"], exclude_modules=["o_proj"], quantize_base="nf4")
        >>> modules_to_quantize(m, cfg, ["q_proj"])
        ['q_proj']
    """
    if config.quantize_base is None:
        return []
    chosen = set(adapted)
    out = []
    for name, module in model.named_modules():
        if not name or is_inside(name, skip) or is_quantized_module(module):
            continue
        if name in chosen:
            if isinstance(module, nn.Linear):
                out.append(name)
        elif (config.quantize_base_modules == ALL_LINEAR and type(module) is nn.Linear and name not in heads
              and not is_inside(name, saved) and not is_inside(name, chosen)
              and not name_matches(_join(prefix, name), config.exclude_modules)):
            out.append(name)
    return out


def quantize_base_modules(model: nn.Module, config: LoRAConfig, adapted: Sequence[str], *, heads: Sequence[str] = (),
                          saved: Sequence[str] = (), skip: Sequence[str] = (), prefix: str = "",
                          originals: dict[str, nn.Module] | None = None) -> list[str]:
    """Replace the layers `modules_to_quantize` picks by `NF4Linear` (in place). `inject_lora` calls
    this before it puts the adapters in.

    Every layer is checked before any is replaced. The replaced modules are recorded in `originals`
    (path -> module) as they go, so that a caller can put them back (`restore_modules`).

    Raises:
        MissingDependencyError: torchao is not installed.
        QuantizationError: a layer whose weight cannot be stored in NF4 (its size is not a multiple of
            64 values) or is shared with another module (tied weights).

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64))
        >>> quantize_base_modules(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"])
        ['q_proj']
        >>> type(m.q_proj).__name__
        'NF4Linear'
    """
    names = modules_to_quantize(model, config, adapted, heads=heads, saved=saved, skip=skip, prefix=prefix)
    if not names:
        return []
    torchao_nf4()  # a missing torchao is reported before anything changes
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(_join(name, key))
    for name in names:
        weight = model.get_submodule(name).weight
        full = _join(prefix, name)
        if weight.numel() % NF4_BLOCK_SIZE or not weight.is_floating_point():
            raise QuantizationError(
                f"quantize_base={config.quantize_base!r}: {full} has a {weight.dtype} weight of shape "
                f"{tuple(weight.shape)}, which NF4 cannot store (it needs a floating-point weight with a multiple "
                f"of {NF4_BLOCK_SIZE} values); leave that layer out (exclude_modules) or drop quantize_base.")
        shared = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        if shared:
            raise QuantizationError(
                f"quantize_base={config.quantize_base!r}: the weight of {full} is shared with {shared[0]} (tied "
                "weights), so it cannot be quantized on its own; leave that layer out of target_modules, or untie "
                "the weights first.")
    originals = originals if originals is not None else {}
    for name in names:
        module = model.get_submodule(name)
        _set_submodule(model, name, NF4Linear.from_linear(module))
        originals[name] = module
    return names


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the modules `quantize_base_modules` (or `dequantize_for_merge`) replaced back in place.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64)); before = m.q_proj
        >>> saved = {}
        >>> _ = quantize_base_modules(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"],
        ...                           originals=saved)
        >>> restore_modules(m, saved); m.q_proj is before
        True
    """
    for name, module in originals.items():
        _set_submodule(model, name, module)
    _restore_bnb_quantization_config(model)


def merge_dtype(model: nn.Module, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype `merge_and_unload` writes dequantised weights in: `dtype` if given, else the most
    common dtype (by number of values) of the model's other floating-point parameters (bf16 after a
    `bf16-true` run), else bfloat16.

    Example:
        >>> merge_dtype(nn.Linear(2, 2)), merge_dtype(nn.Linear(2, 2), "bf16")
        (torch.float32, torch.bfloat16)
    """
    if dtype is not None:
        if isinstance(dtype, str):
            try:
                return ADAPTER_DTYPES[_dtype_name(dtype)]  # type: ignore[index]
            except LoRAError:
                raise LoRAError(f"dtype={dtype!r} is not supported; expected one of {sorted(ADAPTER_DTYPES)}.") from None
        return dtype
    counts: dict[torch.dtype, int] = {}
    quantized = {id(m.weight) for m in model.modules() if is_quantized_module(m)}
    for name, param in model.named_parameters():
        if id(param) in quantized or not param.is_floating_point() or ".lora_" in f".{name}":
            continue
        counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.bfloat16


@torch.no_grad()
def dequantize_module(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain `nn.Linear` computing what a quantized Linear (`NF4Linear`, bitsandbytes) computes,
    with its weight dequantised into `dtype` (the bias Parameter is the same object).

    Example:
        >>> dequantize_module(NF4Linear.from_linear(nn.Linear(64, 8)), torch.bfloat16).weight.dtype
        torch.bfloat16
    """
    if isinstance(module, NF4Linear):
        return linear_like(nn.Linear, module, nn.Parameter(module.dequantize(dtype), requires_grad=False))
    if _bnb_module(module, "Linear4bit") or _bnb_module(module, "Linear8bitLt"):
        return linear_like(nn.Linear, module, nn.Parameter(dequantize_bnb_linear(module).to(dtype),
                                                                  requires_grad=False))
    raise LoRAError(f"dequantize_module expects a quantized Linear (NF4Linear or a bitsandbytes Linear4bit / "
                    f"Linear8bitLt), got {type(module).__name__}.")


def dequantize_for_merge(model: nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, nn.Module]:
    """Prepare `model` for `merge_and_unload`: quantized Linear layers without adapters are replaced by
    dense `nn.Linear` layers, and adapters on quantized layers will merge into `dtype`
    (`merge_dtype(model, dtype)`); transformers models lose their bitsandbytes `quantization_config`
    once no bitsandbytes layer is left.

    Returns:
        path -> the quantized module (without adapters) that the merge replaces, so that
        `restore_modules` can undo it (`unmerge_and_reinject`). Empty when nothing is quantized.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", NF4Linear.from_linear(nn.Linear(64, 64)))
        >>> sorted(dequantize_for_merge(m, torch.bfloat16)), type(m.q_proj).__name__, m.q_proj.weight.dtype
        (['q_proj'], 'Linear', torch.bfloat16)
    """
    found = [(n, m) for n, m in model.named_modules() if n and is_quantized_module(m)]
    if not found:
        return {}
    target = merge_dtype(model, dtype)
    originals: dict[str, nn.Module] = {}
    for name, module in found:
        if isinstance(module, LoRAQuantizedLinear):
            originals[name] = module.quantized_base()
            module.dense_dtype = target
        else:
            originals[name] = module
            _set_submodule(model, name, dequantize_module(module, target))
    if not any(_bnb_module(m, "Linear4bit") or _bnb_module(m, "Linear8bitLt") for m in model.modules()):
        _drop_bnb_quantization_config(model)
    return originals


#: attribute of a model whose bitsandbytes quantization record `dequantize_for_merge` removed (to restore it)
_DROPPED_ATTR = "_lora_bnb_quantization_record"
_RECORD_ATTRS = ("hf_quantizer", "quantization_method", "is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit")


def _drop_bnb_quantization_config(model: nn.Module) -> None:
    """What transformers' `dequantize()` does to the model record: no `quantization_config`, not
    quantized, so `save_pretrained` writes a plain model that reloads as one. What is removed is kept
    on the model, so `restore_modules` can put it back."""
    for module in model.modules():
        quantizer = getattr(module, "hf_quantizer", None)
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        if quantizer is None or str(getattr(method, "value", method)) != "bitsandbytes":
            continue
        saved = {k: module.__dict__[k] for k in _RECORD_ATTRS if k in module.__dict__}
        config = getattr(module, "config", None)
        saved["config.quantization_config"] = getattr(config, "quantization_config", None)
        with contextlib.suppress(Exception):
            quantizer.remove_quantization_config(module)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if module.__dict__.get(flag):
                replace_attribute(module, flag, False, owner=__name__,
                                  missing_hook="transformers has no public call that marks a dequantized model as "
                                               "not loaded in 4/8 bits (its dequantize() edits these flags too)")
        model.__dict__.setdefault(_DROPPED_ATTR, []).append((module, saved))


def _restore_bnb_quantization_config(model: nn.Module) -> None:
    for module, saved in model.__dict__.pop(_DROPPED_ATTR, []):
        undo_replacements(module, owner=__name__)  # the is_loaded_in_4bit / 8bit flags
        for key, value in saved.items():  # put back what transformers' remove_quantization_config removed
            if key == "config.quantization_config":
                if value is not None:
                    module.config.quantization_config = value
            else:
                setattr(module, key, value)


@contextlib.contextmanager
def host_init_context(config: LoRAConfig) -> Iterator[None]:
    """Inside, new tensors are created on the CPU when `config.quantize_base` is set (else nothing
    changes): a model built there (e.g. in a LightningModule's `configure_model`, which Lightning runs
    on the accelerator) is loaded in host memory and quantized there, so an 8B model whose bf16
    weights (16 GB) would not fit a 12 GB GPU reaches the GPU in 4 bits.

    Example:
        >>> with host_init_context(LoRAConfig(quantize_base="nf4")):
        ...     torch.empty(1).device.type
        'cpu'
    """
    if config.quantize_base is None:
        yield
        return
    with torch.device("cpu"):
        yield


# ============================================================================ casts and bitsandbytes layers without adapters
# bitsandbytes' Linear4bit lets every module-wide cast reach its weight: `model.to(torch.float16)` (Lightning's
# 16-true / bf16-true conversion) converts the packed 4-bit codes as numbers when they are stored in a float dtype
# (`bnb_4bit_quant_storage=torch.bfloat16`), which silently corrupts the layer (or crashes in bitsandbytes for
# float32 storage). torch's `Module._apply` has no hook, and wrapping the layer in a module of ours would change
# its type for everything that checks `isinstance(m, bnb.nn.Linear4bit)` (transformers, PEFT, this package). So
# the layers without adapters get a subclass of their own class that only overrides `_apply`
# (`_apply_keeping_quantized`): this is the one place where this package replaces an attribute (`__class__`) of
# an object it does not own, and `unguard_quantized_storage` is its undo (`unload` calls it). Adapted layers need
# none of this: `LoRALinear4bit` is ours.

#: bitsandbytes class -> its subclass that keeps quantized storage under casts
_CAST_SAFE: dict[type, type] = {}
_CAST_SAFE_PREFIX = "_CastSafe"


def _cast_safe_apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    base = type(self)._lora_guarded_class
    return _apply_keeping_quantized(self, fn, lambda f: base._apply(self, f, recurse))


def _cast_safe_class(cls: type) -> type:
    """The subclass of bitsandbytes' `cls` that keeps its quantized weight under casts (made once; its
    name is the class's own, so the model prints as before; pickles as `quantization._CastSafe<name>`)."""
    if cls not in _CAST_SAFE:
        _CAST_SAFE[cls] = type(cls.__name__, (cls,), {
            "_apply": _cast_safe_apply, "_lora_guarded_class": cls, "__module__": _PICKLE_MODULE,
            "__qualname__": f"{_CAST_SAFE_PREFIX}{cls.__name__}"})
    return _CAST_SAFE[cls]


def cast_safe_class(name: str) -> type | None:
    """`_CastSafe<bitsandbytes class>` by its name (for unpickling a model whose layers were guarded:
    `lightning_lora.quantization.__getattr__`), or None for another name.

    Example:
        >>> cast_safe_class("Linear") is None
        True
    """
    if name.startswith(_CAST_SAFE_PREFIX):
        cls = getattr(bitsandbytes().nn, name.removeprefix(_CAST_SAFE_PREFIX), None)
        if isinstance(cls, type):
            return _cast_safe_class(cls)
    return None


def guard_quantized_storage(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Make module-wide casts (`.to(dtype)`, `.half()`, `.bfloat16()`, Lightning's precision plugins)
    leave the quantized weights of `model`'s bitsandbytes 4-bit layers without adapters as they are,
    whatever their storage dtype; device moves still reach them. `inject_lora` calls this (outside
    `skip`); `unguard_quantized_storage` undoes it. Adapter layers and NF4 layers keep their codes
    by themselves.

    Returns:
        The paths of the layers guarded now.

    Example:
        >>> guard_quantized_storage(nn.Linear(2, 2))      # no bitsandbytes layer: nothing to do
        []
    """
    guarded = []
    for name, module in model.named_modules():
        if is_inside(name, skip) or not _bnb_module(module, "Linear4bit"):
            continue
        cls = type(module)
        if getattr(cls, "_lora_guarded_class", None) is None:
            replace_class(module, _cast_safe_class(cls), owner=__name__,
                          missing_hook="torch has no hook before Module._apply casts a module's own tensors (a cast "
                                       "would turn bitsandbytes' packed 4-bit codes into floats)")
            guarded.append(name)
    return guarded


def unguard_quantized_storage(model: nn.Module) -> list[str]:
    """Undo `guard_quantized_storage`: the layers get their bitsandbytes class back.

    Returns:
        The paths of the layers given back their class.

    Example:
        >>> unguard_quantized_storage(nn.Linear(2, 2))
        []
    """
    restored = []
    for name, module in model.named_modules():
        original = getattr(type(module), "_lora_guarded_class", None)
        if original is not None:
            if not undo_replacements(module, owner=__name__):  # a module guarded without a record (never here)
                raise LoRAError(f"{name} carries the cast guard of lightning-lora without its replacement record; "
                                "rebuild the model from its checkpoint.")
            restored.append(name)
    return restored


__all__ = ["dequantize_for_merge", "dequantize_module", "guard_quantized_storage", "host_init_context",
           "is_quantized_module", "merge_dtype", "modules_to_quantize", "quantize_base_modules",
           "quantized_weight_bytes", "restore_modules", "unguard_quantized_storage"]
