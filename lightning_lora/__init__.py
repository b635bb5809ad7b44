"""lightning-lora: LoRA fine-tuning for PyTorch Lightning.

Example:
    >>> from lightning_lora import LoRAConfig, inject_lora, merge_and_unload, lora_state_dict
"""

from lightning_lora.callback import LoRA
from lightning_lora.config import LoRAConfig
from lightning_lora.errors import AdapterFormatError, LoRAConfigError, LoRAError
from lightning_lora.mixin import LoRAMixin
from lightning_lora.peft_format import load_adapter, save_adapter
from lightning_lora.surgery import (
    LoRAState,
    active_adapters,
    adapter_names,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_lora,
    get_lora_config,
    get_lora_state,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    mixed_batch,
    parameter_summary,
    set_adapter,
    unload,
    unmerge_adapter,
    unmerge_and_reinject,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "LoRA",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRAMixin",
    "LoRAState",
    "active_adapters",
    "adapter_names",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disable_lora",
    "get_lora_config",
    "get_lora_state",
    "inject_lora",
    "load_adapter",
    "load_lora_state_dict",
    "lora_parameters",
    "lora_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "mixed_batch",
    "parameter_summary",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge_adapter",
    "unmerge_and_reinject",
]
