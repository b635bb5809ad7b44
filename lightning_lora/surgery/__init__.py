"""Every model operation on any `nn.Module`: find targets, inject (rolled back on error), freeze,
trainable keys, merge / unmerge / unload, adapter state dicts, optimizer restriction, counts and
adapter statistics. Nothing here knows about Lightning.

`inject_lora` records what it did in a typed `LoRAState` on the module it was called on
(`model.lora_state`): the config, the adapted module names and the keys training changes, computed
once. Every other function reads that record (`lora_states(model)` finds it on the model or on the
networks inside it).

One concept per module, each importing only those before it:

- `_paths`: module paths (join, replace the module at a path, strip wrapper components).
- `transformers_lookup`: the transformers models inside a module: embeddings, output and task heads,
  vocabulary, PEFT task type.
- `state`: the one record on the model (`LoRAState`, or `MergedAdapters` after a kept merge) and what
  is read from it: adapter layers, trainable and saved keys, `lora_parameters`, `find_network`.
- `targets`: what an injection touches: target modules, `modules_to_save`, trainable keys,
  `networks_to_skip`.
- `inject`: `inject_lora` (the first adapter), `unload`.
- `adapters`: several adapters: `inject_lora(..., adapter_name=)`, `set_adapter`, `delete_adapter`,
  `mixed_batch`, `solo` (one adapter seen alone).
- `load`: adapter state dicts: `lora_state_dict`, `load_lora_state_dict`, `inject_and_load`.
- `merge`: `merge_and_unload`, `unmerge_and_reinject`, `merge_adapter` / `unmerge_adapter`, `disable_lora`.
- `optimizers`: `restrict_optimizers`.
- `weighted`: `add_weighted_adapter` (the math in `lightning_lora.combine`).
- `statistics`: counts, `parameter_summary`, norms, `AdapterProbe`.

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

from lightning_lora.surgery._paths import _without_wrappers
from lightning_lora.surgery.adapters import (
    active_adapters,
    adapter_names,
    check_adapter_name,
    delete_adapter,
    inject_lora,
    mixed_batch,
    set_adapter,
    solo,
    trainable_adapters,
)
from lightning_lora.surgery.inject import (
    enable_input_grads_for_checkpointing,
    floating_dtype,
    unload,
)
from lightning_lora.surgery.load import (
    inject_and_load,
    load_lora_state_dict,
    lora_state_dict,
    state_dict_problems,
    vocab_mismatch,
)
from lightning_lora.surgery.merge import (
    disable_lora,
    forget_merged,
    is_merged,
    merge_adapter,
    merge_and_unload,
    merged_config,
    unmerge_adapter,
    unmerge_and_reinject,
)
from lightning_lora.surgery.optimizers import find_optimizers, restrict_optimizer, restrict_optimizers
from lightning_lora.surgery.state import (
    STATE_ATTR,
    LoRAState,
    MergedAdapters,
    adapter_keys,
    find_network,
    get_lora_config,
    get_lora_state,
    has_lora,
    is_lora_key,
    lora_layers,
    lora_parameters,
    lora_states,
    saved_keys,
    trainable_keys,
)
from lightning_lora.surgery.statistics import (
    AdapterProbe,
    LayerRow,
    ParameterSummary,
    adapter_grad_norm,
    count_parameters,
    delta_ratio,
    forget_dora_norms,
    parameter_summary,
    weight_norms,
)
from lightning_lora.surgery.targets import (
    compute_trainable_keys,
    find_target_modules,
    find_target_parameters,
    networks_to_skip,
)
from lightning_lora.surgery.transformers_lookup import (
    HEAD_NAMES,
    TASK_HEADS,
    base_vocab_size,
    embedding_keys,
    embedding_of,
    infer_task_type,
    output_head_names,
    task_head_names,
    vocab_rows,
)
from lightning_lora.surgery.weighted import add_weighted_adapter

__all__ = [
    "HEAD_NAMES",
    "STATE_ATTR",
    "TASK_HEADS",
    "AdapterProbe",
    "LayerRow",
    "LoRAState",
    "MergedAdapters",
    "ParameterSummary",
    "_without_wrappers",
    "active_adapters",
    "add_weighted_adapter",
    "adapter_keys",
    "adapter_names",
    "adapter_grad_norm",
    "base_vocab_size",
    "check_adapter_name",
    "compute_trainable_keys",
    "count_parameters",
    "delete_adapter",
    "delta_ratio",
    "disable_lora",
    "embedding_keys",
    "embedding_of",
    "enable_input_grads_for_checkpointing",
    "find_network",
    "find_optimizers",
    "find_target_modules",
    "find_target_parameters",
    "floating_dtype",
    "forget_dora_norms",
    "forget_merged",
    "get_lora_config",
    "get_lora_state",
    "has_lora",
    "infer_task_type",
    "inject_and_load",
    "inject_lora",
    "is_lora_key",
    "is_merged",
    "load_lora_state_dict",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "lora_states",
    "merge_adapter",
    "merge_and_unload",
    "merged_config",
    "mixed_batch",
    "networks_to_skip",
    "output_head_names",
    "parameter_summary",
    "restrict_optimizer",
    "restrict_optimizers",
    "saved_keys",
    "set_adapter",
    "solo",
    "state_dict_problems",
    "task_head_names",
    "trainable_adapters",
    "trainable_keys",
    "unload",
    "unmerge_adapter",
    "unmerge_and_reinject",
    "vocab_mismatch",
    "vocab_rows",
    "weight_norms",
]
