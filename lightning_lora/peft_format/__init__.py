"""Read and write adapters in the Hugging Face PEFT on-disk format, and convert adapter-only checkpoints.

A PEFT LoRA adapter is a directory with two files:

* `adapter_model.safetensors` (metadata `{"format": "pt"}`): the adapter tensors under the prefix
  `base_model.model.`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
  Embedding adapters are `<module>.lora_embedding_A` / `<module>.lora_embedding_B` (no `.weight`),
  the bias of an adapted layer is `<module>.base_layer.bias`, and a module in `modules_to_save` is
  stored under its own name (`base_model.model.score.weight`).
* `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `target_modules`, ... .

`save_adapter` writes that format from a model with lightning-lora adapters, so
`peft.PeftModel.from_pretrained(base, directory)` loads it with no missing or unexpected keys;
`load_adapter` reads it (written by PEFT or by us) into a base model. `checkpoint_to_peft` turns an
adapter-only Lightning checkpoint into such a directory. Nothing here imports Lightning or PEFT.

Example:
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> from lightning_lora.peft_format import save_adapter, load_adapter
    >>> _ = inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))   # doctest: +SKIP
    >>> save_adapter(model, "out/adapter")                                              # doctest: +SKIP
    >>> names = load_adapter(fresh_base_model, "out/adapter")                            # doctest: +SKIP

The package: `keys` (file names, config keys, tensor-key translation), `load` (reading), `save` (writing,
read back before it lands).
"""

from __future__ import annotations

from lightning_lora._io import atomic_directory, check_output_dir
from lightning_lora.checkpoint import (
    CHECKPOINT_KEY,
    CHECKPOINT_VERSION,
    AdapterCheckpoint,
    read_checkpoint,
)
from lightning_lora.errors import AdapterFormatError, UnsupportedAdapterError
from lightning_lora.peft_format.keys import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    from_peft_key,
)
from lightning_lora.peft_format.load import (
    load_adapter,
    lora_config_from_peft,
    peft_to_state_dict,
    read_adapter_config,
)
from lightning_lora.peft_format.save import (
    checkpoint_to_peft,
    save_adapter,
    to_peft,
)
from lightning_lora.surgery import find_network, infer_task_type

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterCheckpoint",
    "AdapterFormatError",
    "CHECKPOINT_KEY",
    "CHECKPOINT_VERSION",
    "PEFT_PREFIX",
    "UnsupportedAdapterError",
    "atomic_directory",
    "check_output_dir",
    "checkpoint_to_peft",
    "find_network",
    "from_peft_key",
    "infer_task_type",
    "load_adapter",
    "lora_config_from_peft",
    "peft_to_state_dict",
    "read_adapter_config",
    "read_checkpoint",
    "save_adapter",
    "to_peft",
]
