"""lightning-lora: LoRA fine-tuning for PyTorch Lightning.

Example:
    >>> from lightning_lora import LoRAConfig, inject_lora, merge_lora, lora_state_dict
"""

from lightning_lora.callback import LoRA
from lightning_lora.config import LoRAConfig, LoRAConfigError
from lightning_lora.mixin import LoRAMixin
from lightning_lora.peft_format import load_adapter, save_adapter
from lightning_lora.surgery import (
    LoRAError,
    count_parameters,
    disable_lora,
    get_lora_config,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_adapters,
    merge_lora,
    parameter_summary,
    unmerge_adapters,
)

__version__ = "0.1.0"

__all__ = [
    "LoRA",
    "LoRAMixin",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "count_parameters",
    "disable_lora",
    "get_lora_config",
    "inject_lora",
    "load_lora_state_dict",
    "lora_parameters",
    "load_adapter",
    "lora_state_dict",
    "merge_adapters",
    "merge_lora",
    "parameter_summary",
    "save_adapter",
    "unmerge_adapters",
]
