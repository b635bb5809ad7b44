"""Adapter layers: `LoRALinear`, `LoRAConv1D` (transformers' GPT-2 style) and `LoRAEmbedding`.

Each adapter layer *is* the base layer plus two small matrices. It registers the base layer's own
parameters under their own names (`weight`, `bias`), so an injected model's state dict is the base
model's plus `<module>.lora_A.weight` and `<module>.lora_B.weight` (PEFT's names), and it computes

    h = base(x) + scaling * B(A(dropout(x)))

The package: `base` (`LoRALayer`, `AdapterPath`, the dtype policy and the choice of the fused path),
`linear` (`LoRALinear`, `LoRAConv1D`), `embedding` (`LoRAEmbedding`), `conv` (`LoRAConv1d/2d/3d` around
`nn.Conv1d/2d/3d`), `attention` (`LoRAMultiheadAttention`; the hook that keeps fused encoder kernels from
bypassing adapters), `parameter` (`LoRAParameterHost`, `LoRAParameter`: adapters on parameters named by
`target_parameters`, e.g. MoE experts), `registry` (which module type takes which adapter class). Variants (DoRA, PiSSA/OLoRA) live in `lightning_lora.variants`; quantized
bases in `lightning_lora.quantization`, which registers its layer types itself.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora.layers import LoRALinear
    >>> base = nn.Linear(16, 8)
    >>> layer = LoRALinear(base, r=4, alpha=8.0)
    >>> x = torch.randn(2, 16)
    >>> torch.equal(layer(x), base(x))
    True
    >>> sorted(layer.state_dict())
    ['bias', 'lora_A.weight', 'lora_B.weight', 'weight']
"""

from lightning_lora.layers.attention import FUSED_KERNEL_PARENTS, LoRAMultiheadAttention, keep_adapters_running
from lightning_lora.layers.base import FUSED_PATHS, AdapterPath, LoRALayer
from lightning_lora.layers.conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAConvNd
from lightning_lora.layers.embedding import LoRAEmbedding
from lightning_lora.layers.linear import HFConv1D, LoRAConv1D, LoRALinear
from lightning_lora.layers.parameter import LoRAParameter, LoRAParameterHost
from lightning_lora.layers.registry import (
    ADAPTER_TYPES,
    WEIGHT_READING_PARENTS,
    adapter_class_for,
    refusal_reason,
    register_adapter_type,
    register_adapter_types_lazily,
    supported_types,
    unsupported_target_error,
)

__all__ = [
    "ADAPTER_TYPES",
    "FUSED_KERNEL_PARENTS",
    "FUSED_PATHS",
    "WEIGHT_READING_PARENTS",
    "AdapterPath",
    "HFConv1D",
    "LoRAConv1D",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAConvNd",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAParameter",
    "LoRAParameterHost",
    "LoRAMultiheadAttention",
    "adapter_class_for",
    "keep_adapters_running",
    "refusal_reason",
    "register_adapter_type",
    "register_adapter_types_lazily",
    "supported_types",
    "unsupported_target_error",
]
