"""LoRA on sharded models: FSDP2 (`fully_shard`, Lightning's `ModelParallelStrategy`) and FSDP1
(`FullyShardedDataParallel`, Lightning's `FSDPStrategy`).

The `LoRA` callback uses this package by itself when the Trainer's strategy is one of those two (through
`lightning_lora.strategies`, the Lightning side); the functions are public for users who shard in their own
`configure_model`. The package is torch only, one concept per module: `plan` (units, `shard_lora_model`,
refusals), `fsdp1` (auto-wrap policy, FSDP1 repairs), `checkpoints` (adapter state dicts, gathered
writes, sharded checkpoints), `statistics` (norms reduced over shards).

What it does, and why:

* **Inject, then shard.** Adapters must exist before `fully_shard` runs: FSDP2 manages the modules it
  sees at that moment, and a module swapped in later is never gathered. Under `ModelParallelStrategy`
  the callback injects right after `configure_model` and then calls `shard_lora_model` (unless your
  `configure_model` already called it). A network that your `configure_model` sharded with plain
  `fully_shard` before the adapters existed is refused with a `LoRAError` that says what to call instead.
* **Units of uniform dtype.** One `fully_shard` unit per decoder layer (transformers'
  `_no_split_modules`, or `FSDPOptions.layers`), one for the input embedding and one for the output
  head when they are not tied (as torchtune does), and the network as the root. FSDP2 requires one
  dtype among a unit's *trainable* parameters; frozen parameters may differ. So fp32 adapters share
  their layer's unit with the frozen bf16 base when the installed PyTorch all-gathers mixed dtypes
  (2.13 does: one all-gather per layer, the fused adapter kernels keep running), and otherwise the
  layer's adapters get a unit of their own (`FSDPOptions.adapter_units`), whose hooks make the
  adapter layers take the plain module path. A unit whose trainable parameters still mix dtypes
  (e.g. `bias="all"` on a bf16 base with fp32 adapters) is a `LoRAError`.
* **Frozen means free.** Frozen base shards get no gradient and no optimizer state (FSDP2 reduces
  only what has a gradient); the optimizer holds the adapter DTensors only.
* **Adapter-only checkpoints.** `lightning_lora.strategies.adapter_only_checkpoints(strategy)` makes the
  strategy's state-dict path return only the adapter keys (sharded DTensors for a distributed checkpoint,
  full tensors on rank 0 for `save_distributed_checkpoint=False`) and load a distributed checkpoint that holds only
  adapters. No base weight is gathered or written.
* **Fit end.** `gather_adapters` all-gathers the adapters (never the base); rank 0 writes the PEFT
  adapter. The merged model is written only when the full model fits in rank 0's memory
  (`write_merged`); otherwise, and for the model in memory, the merge is left to
  `lightning-lora merge` from the adapter.

Example (a module that shards itself; with the callback alone nothing of this is needed):
    >>> import lightning as L
    >>> from lightning.pytorch.strategies import ModelParallelStrategy
    >>> from lightning_lora import LoRA
    >>> from lightning_lora.fsdp import shard_lora_model
    >>> class Module(L.LightningModule):
    ...     def configure_model(self):
    ...         self.model = build_network()
    ...         shard_lora_model(self)      # injects with the Trainer's LoRA callback, then shards
    >>> trainer = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=8, tensor_parallel_size=1),
    ...                     callbacks=[LoRA(r=16, target_modules="all-linear")])    # doctest: +SKIP
"""

from __future__ import annotations

from lightning_lora.fsdp._dist import clean_name, is_sharded, mixed_dtype_all_gather
from lightning_lora.fsdp.checkpoints import (
    adapter_state_dict,
    consolidate_checkpoint,
    gather_adapters,
    load_sharded_adapters,
    write_adapter,
    write_merged,
)
from lightning_lora.fsdp.fsdp1 import fsdp1_adapter_state_dict, fsdp1_auto_wrap_policy, restore_frozen_views
from lightning_lora.fsdp.plan import (
    ADAPTER_UNITS,
    FSDPOptions,
    Unit,
    broadcast_adapters,
    decoder_layers,
    injecting_with,
    refuse_dora,
    refuse_presharded,
    refuse_unshardable_layers,
    shard_lora_model,
)
from lightning_lora.fsdp.statistics import sharded_delta_ratio, sharded_grad_norm, sharded_weight_norms

__all__ = ["ADAPTER_UNITS", "FSDPOptions", "Unit", "adapter_state_dict", "broadcast_adapters", "clean_name",
           "consolidate_checkpoint", "decoder_layers", "fsdp1_adapter_state_dict", "fsdp1_auto_wrap_policy",
           "gather_adapters", "injecting_with", "is_sharded", "load_sharded_adapters", "mixed_dtype_all_gather",
           "refuse_dora", "refuse_presharded", "refuse_unshardable_layers", "restore_frozen_views", "shard_lora_model",
           "sharded_delta_ratio", "sharded_grad_norm", "sharded_weight_norms", "write_adapter", "write_merged"]
