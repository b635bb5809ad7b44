"""Quantized frozen bases (QLoRA): a 4-bit NF4 base through torchao, and models quantized with bitsandbytes.

QLoRA (Dettmers et al. 2023) keeps the frozen base weights in 4 bits and trains LoRA adapters on top
in higher precision. Two routes lead there:

* `LoRAConfig(quantize_base="nf4")` (also `LoRA(quantize_base="nf4")` and the YAML key): `inject_lora`
  replaces every `nn.Linear` except the output head, `modules_to_save` and `exclude_modules` (the whole
  frozen base, `quantize_base_modules="all-linear"`, the default; `"adapted"`: only the adapted ones)
  by an `NF4Linear`, whose weight is a torchao
  `NF4Tensor`: 4-bit NormalFloat codes in blocks of 64 values, one int8 scale per block, the scales
  quantized again per group of up to 256 blocks ("double quantisation"). The adapter around it is a
  `LoRANF4Linear`. The forward dequantises the weight on the fly into the input's dtype (torchao's
  `linear_nf4`, with a leaner dequantisation: `nf4_linear`); A and B stay in `adapter_dtype`. A
  weight costs 0.516 bytes per value (4.13 bits), 0.258x of bf16.
* A model quantized by transformers with bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True)` or
  `load_in_8bit=True`) needs no option: its `Linear4bit` / `Linear8bitLt` layers are valid targets
  (`LoRALinear4bit`, `LoRALinear8bitLt`), as in PEFT. Lightning's `BitsandbytesPrecision` is not used.

In both, the state-dict keys are the base model's (`...q_proj.weight`, plus bitsandbytes' own
`weight.absmax`, ... for its layers), adapter-only checkpoints hold no base weight, injection changes
no output bit (B starts at zero), module-wide casts (`bf16-true`, `16-true`, `.half()`) leave the 4-bit
weights as they are (also bitsandbytes codes stored in a float dtype, see `guard_quantized_storage`), and `merge_and_unload` dequantises each weight in float32, adds the delta and rounds once
into a plain `nn.Linear` (in the dtype the rest of the model has, or the `dtype=` asked for).

torchao (`quantize_base="nf4"`) and bitsandbytes are optional: `pip install 'lightning-lora[qlora]'`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> model = nn.Sequential(); model.add_module("q_proj", nn.Linear(256, 256))
    >>> _ = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], quantize_base="nf4"))
    >>> type(model.q_proj).__name__, type(model.q_proj.weight).__name__
    ('LoRANF4Linear', 'NF4Tensor')
    >>> quantized_weight_bytes(model), 256 * 256 * 2      # 4-bit codes, int8 scales, their scales; bf16
    (33876, 131072)

The package: `nf4` (torchao NF4 tensors, `NF4Linear`, `LoRANF4Linear`), `bitsandbytes` (its layers'
adapters, registered lazily), `layers` (`LoRAQuantizedLinear`: the shared quantized-base adapter with
one merge; `UnadaptableQuantizedLayer`), `model` (whole-model operations), `_common` (shared helpers).
Importing it registers the NF4 layer type and the lazy bitsandbytes hook with `lightning_lora.layers`.
"""

from __future__ import annotations

from typing import Any

from lightning_lora.errors import MissingDependencyError, QuantizationError
from lightning_lora.quantization._common import PIP_INSTALL, is_nf4_tensor, is_quantized_storage

# `bitsandbytes` here is the function (it rebinds the name after its submodule has loaded, and no later import
# loads it again): `lightning_lora.quantization.bitsandbytes()` imports bitsandbytes; the submodule is
# `sys.modules["lightning_lora.quantization.bitsandbytes"]`.
from lightning_lora.quantization.bitsandbytes import (
    LoRALinear4bit,
    LoRALinear8bitLt,
    bitsandbytes,
    dequantize_bnb_linear,
    register_bitsandbytes_adapters,
)
from lightning_lora.quantization.layers import LoRAQuantizedLinear, UnadaptableQuantizedLayer
from lightning_lora.quantization.model import (
    cast_safe_class,
    dequantize_for_merge,
    dequantize_module,
    guard_quantized_storage,
    host_init_context,
    is_quantized_module,
    merge_dtype,
    modules_to_quantize,
    quantize_base_modules,
    quantized_weight_bytes,
    restore_modules,
    unguard_quantized_storage,
)
from lightning_lora.quantization.nf4 import (
    NF4_BLOCK_SIZE,
    NF4_SCALER_BLOCK_SIZE,
    LoRANF4Linear,
    NF4Linear,
    clone_nf4,
    dequantize_nf4,
    nf4_bytes,
    nf4_linear,
    scaler_block_size,
    to_nf4,
    torchao_nf4,
)


def __getattr__(name: str) -> Any:
    """`_CastSafe<bitsandbytes class>` (for unpickling a model whose layers were guarded: they pickle
    under this module's path)."""
    cls = cast_safe_class(name)
    if cls is not None:
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LoRALinear4bit",
    "LoRALinear8bitLt",
    "LoRANF4Linear",
    "LoRAQuantizedLinear",
    "MissingDependencyError",
    "NF4Linear",
    "NF4_BLOCK_SIZE",
    "NF4_SCALER_BLOCK_SIZE",
    "PIP_INSTALL",
    "QuantizationError",
    "UnadaptableQuantizedLayer",
    "bitsandbytes",
    "clone_nf4",
    "dequantize_bnb_linear",
    "dequantize_for_merge",
    "dequantize_module",
    "dequantize_nf4",
    "host_init_context",
    "guard_quantized_storage",
    "is_nf4_tensor",
    "is_quantized_module",
    "is_quantized_storage",
    "merge_dtype",
    "modules_to_quantize",
    "nf4_bytes",
    "nf4_linear",
    "quantize_base_modules",
    "quantized_weight_bytes",
    "register_bitsandbytes_adapters",
    "restore_modules",
    "scaler_block_size",
    "to_nf4",
    "torchao_nf4",
    "unguard_quantized_storage",
]
