"""`LoRAMixin`: LoRA helpers on a LightningModule, and adapter-only `load_from_checkpoint`.

Example:
    >>> import lightning as L
    >>> from lightning_lora import LoRAConfig, LoRAMixin
    >>> class MyModule(LoRAMixin, L.LightningModule):          # the mixin first
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = build_model()                       # doctest: +SKIP
    ...         self.apply_lora(LoRAConfig(r=8))                 # or use the LoRA callback
    >>> model = MyModule.load_from_checkpoint("adapter-only.ckpt")  # doctest: +SKIP

`load_from_checkpoint` of an adapter-only checkpoint (from the `LoRA` callback or from a module
that used `apply_lora`) builds the module with its constructor (so the base weights come from
there), re-injects the adapters from the config stored in the checkpoint, and loads them strictly. A
checkpoint of an adapter trained beside frozen ones (`LoRA(adapter_name=...)`) loads the same way when the
constructor loads the frozen adapters: the trained one is added beside them under its name.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lightning_lora.checkpoint import (
    CHECKPOINT_KEY,
    check_adapter_keys,
    check_checkpoint_adapters,
    check_checkpoint_config,
    checkpoint_config,
    make_adapter_only,
    restore_base_keys,
    trained_adapter,
)
from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError, listed
from lightning_lora.peft_format import load_adapter, save_adapter
from lightning_lora.surgery import (
    adapter_names,
    has_lora,
    inject_lora,
    is_lora_key,
    is_merged,
    lora_parameters,
    lora_state_dict,
    lora_states,
    merge_and_unload,
    merged_config,
    unmerge_and_reinject,
)


class LoRAMixin:
    """Mix into a `LightningModule` (before it in the bases) for LoRA helpers and adapter-only
    checkpoint loading. Works with or without the `LoRA` callback.

    Example:
        >>> class Module(LoRAMixin, L.LightningModule): ...   # doctest: +SKIP
        >>> module.apply_lora(LoRAConfig(r=8)); module.lora_parameters()   # doctest: +SKIP
    """

    def apply_lora(self, config: LoRAConfig | None = None) -> list[str]:
        """Inject adapters into this module (call in `__init__` or `configure_model`).

        Returns:
            The names of the adapted modules.
        """
        return inject_lora(self, config)  # type: ignore[arg-type]

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA parameters, each once: pass these to your optimizer."""
        return lora_parameters(self)  # type: ignore[arg-type]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the adapter tensors (plus trainable biases / `modules_to_save`)."""
        return lora_state_dict(self)  # type: ignore[arg-type]

    def merge_and_unload(self, keep: bool = False) -> LoRAMixin:
        """Merge the adapters into the base weights and remove them (see `surgery.merge_and_unload`);
        the module holds a plain model afterwards. Returns the module."""
        merge_and_unload(self, keep=keep)  # type: ignore[arg-type]
        return self

    def save_adapter(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the adapter of the module's network in PEFT format."""
        save_adapter(self, directory, overwrite=overwrite)  # type: ignore[arg-type]

    def load_adapter(self, directory: str | os.PathLike, trainable: bool = False) -> None:
        """Inject and load a PEFT-format adapter (or adapter-only checkpoint) into the module's network."""
        load_adapter(self, directory, trainable=trainable)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapters in the checkpoint, with the LoRA config next to them."""
        if has_lora(self):  # type: ignore[arg-type]
            make_adapter_only(checkpoint, self)  # type: ignore[arg-type]
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the module ready for an adapter-only checkpoint: undo a merge, or inject from the
        checkpoint's config when there are no adapters yet; then check the config and the keys."""
        section = checkpoint.get(CHECKPOINT_KEY)
        if isinstance(section, dict):
            config = checkpoint_config(checkpoint)
            name = section.get("adapter_name") if isinstance(section.get("adapter_name"), str) else None
            if is_merged(self) and not has_lora(self) and merged_config(self) == config:  # type: ignore[arg-type]
                unmerge_and_reinject(self)  # type: ignore[arg-type]
            if has_lora(self):  # type: ignore[arg-type]
                if name is not None and lora_states(self) and name not in adapter_names(self):  # type: ignore[arg-type]
                    inject_lora(self, config, adapter_name=name)  # type: ignore[arg-type]  # beside the frozen ones
                trainer = getattr(self, "_trainer", None)  # no Trainer: load_from_checkpoint, to evaluate
                fitting = trainer is not None and trainer.state.fn == "fit"
                check_checkpoint_adapters(checkpoint, self)  # type: ignore[arg-type]
                check_checkpoint_config(checkpoint, trained_adapter(self)[1], training=fitting)  # type: ignore[arg-type]
                if fitting:  # copies of the module stored by averaging callbacks, which load them strictly
                    restore_base_keys(checkpoint, self)  # type: ignore[arg-type]
            else:
                inject_lora(self, config, adapter_name=name or "default")  # type: ignore[arg-type]
                check_checkpoint_adapters(checkpoint, self)  # type: ignore[arg-type]
            check_adapter_keys(self, checkpoint["state_dict"])  # type: ignore[arg-type]
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Like `nn.Module.load_state_dict`, but an adapter-only state dict loads into an injected
        module even with `strict=True`: base keys may be absent, adapter keys may not."""
        if has_lora(self) and any(is_lora_key(k) for k in state_dict):  # type: ignore[arg-type]
            own = set(nn.Module.state_dict(self))  # type: ignore[arg-type]
            unexpected = sorted(set(state_dict) - own)
            if strict and unexpected:
                raise LoRAError(f"Unexpected keys in the adapter state dict ({len(unexpected)}): "
                                f"{listed(unexpected)}. Was it written for another model?")
            check_adapter_keys(self, state_dict, "The state dict")  # type: ignore[arg-type]
            super().load_state_dict(state_dict, strict=False, assign=assign)  # type: ignore[misc]
            return _IncompatibleKeys([], unexpected)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
