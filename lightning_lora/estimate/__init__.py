"""`lightning-lora estimate`: parameters and training memory, full fine-tune vs LoRA vs QLoRA, with no weights.

The package is split by concept:

| module | what lives there |
| --- | --- |
| `models.py` | model resolution: shipped names, Hugging Face ids, model directories, config.json -> a `meta`-device model |
| `quantize.py` | bytes of a 4-bit weight (torchao NF4, bitsandbytes NF4) and of its dequantisation |
| `sharding.py` | per-GPU layout: DDP replicas, FSDP2 dim-0 shards and the units in flight |
| `report.py` | the results (`MemoryBreakdown`, `Estimate`), rich tables and JSON |
| `shapes.py` | the numbers memory depends on: a Llama-style decoder's shape, the precision's byte sizes |
| `parameters.py` | parameters per rank: weights, gradients, optimizer state, 4-bit weights, DoRA magnitudes |
| `activations.py` | what autograd saves per decoder layer, and the activation timeline of a step |
| `memory.py` | the memory model: the parts added up per column (full, LoRA, QLoRA) and `estimate_memory` |
| `command.py` | the `lightning-lora estimate` command |

Example:
    >>> from lightning_lora.estimate import estimate_memory
    >>> est = estimate_memory("llama-3-8b", r=8, target_modules=["q_proj", "v_proj"])
    >>> est.lora.trainable_params, est.full.trainable_params
    (3407872, 8030261248)
"""

from __future__ import annotations

from lightning_lora.estimate.command import build_parser, main
from lightning_lora.estimate.memory import (
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    dora_norm_temp,
    estimate_memory,
)
from lightning_lora.estimate.models import (
    ALIASES,
    CONFIG_DIR,
    UnknownModelError,
    build_meta_model,
    known_models,
    load_model_config,
)
from lightning_lora.estimate.quantize import (
    QUANTIZE,
    QUANTIZE_MODULES,
    QuantLayout,
    bnb_nf4_layout,
    dequant_transient,
    nf4_layout,
)
from lightning_lora.estimate.report import (
    GIB,
    MIB,
    Estimate,
    MemoryBreakdown,
    format_bytes,
)
from lightning_lora.estimate.sharding import STRATEGIES, Layout

__all__ = ["ALIASES", "CONFIG_DIR", "GIB", "MIB", "OPTIMIZERS", "OPTIMIZER_IMPLS", "PRECISIONS", "QUANTIZE",
           "QUANTIZE_MODULES", "STRATEGIES", "Estimate", "Layout", "MemoryBreakdown", "QuantLayout",
           "UnknownModelError", "bnb_nf4_layout", "build_meta_model", "build_parser", "dequant_transient",
           "dora_norm_temp", "estimate_memory", "format_bytes", "known_models", "load_model_config", "main",
           "nf4_layout"]
