"""The protocol every adapter variant answers (`LoRAVariant`) and the description of its extra tensors.

`lightning_lora.variants` documents the protocol and holds the registry; this module only defines it,
so that the variant modules (`variants.dora`, `variants.pissa`) import it without a cycle.

A variant object is built by `LoRAVariant.from_config` from `LoRAConfig` fields (one per layer: the
layer resolves its variants once, in its constructor, and keeps them in `layer.variants`). It keeps no
tensors of its own: what a variant needs per layer (DoRA's magnitude, PiSSA's initial adapters, a merge
record) lives on the layer, under the names its `extra_tensors` declares, so the state dict holds it.
Every method has the plain-LoRA answer as its default, so a variant overrides only what it changes.

Example:
    >>> v = LoRAVariant()
    >>> v.extra_tensors(16, 8, 4), v.extra_parameters(16, 8, 4), v.extra_repr()
    ((), 0, '')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.errors import LoRAConfigError


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor a variant registers on the adapter layer itself (next to `lora_A` / `lora_B`).

    Attributes:
        name: the attribute and state-dict key suffix on the layer (`q_proj.<name>`).
        shape: its shape for a layer with `in_features`, `out_features` and rank `r`.
        peft_key: its key suffix in PEFT's files, or None when it is never written there (PEFT files get
            the variant's conversion instead).
        trainable: a Parameter the optimizer updates (else a buffer).

    Example:
        >>> ExtraTensor("lora_magnitude_vector", (8,), "lora_magnitude_vector", True).trainable
        True
    """

    name: str
    shape: tuple[int, ...]
    peft_key: str | None
    trainable: bool


class LoRAVariant:
    """What a variant must answer; the defaults are plain LoRA's answers (see `lightning_lora.variants`).

    Class attributes:
        name: short name ("dora", "pissa").
        title: its name in messages ("DoRA", "PiSSA/OLoRA").
        config_fields: the `LoRAConfig` fields that select it.
        example: field values that select it (listings, tests).
        layer_types: the `peft_layer_type` values of the adapter classes it implements (others are refused
            by `unsupported_error`).
        sets_adapters: `init` writes A and B itself (the layer type's own random init is skipped, and these
            variants initialise before the others).
        owns_forward: `forward` computes the whole adapted output (no fused/plain adapter path).
        owns_merge: `merged_weight` / `unmerged_weight` replace `W + delta` / `W - delta`.

    Example:
        >>> LoRAVariant.from_config(use_dora=True) is None     # the base class is selected by nothing
        True
    """

    name: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA"
    config_fields: ClassVar[tuple[str, ...]] = ()
    example: ClassVar[dict[str, Any]] = {}
    layer_types: ClassVar[frozenset[str]] = frozenset({"linear"})
    sets_adapters: ClassVar[bool] = False
    owns_forward: ClassVar[bool] = False
    owns_merge: ClassVar[bool] = False

    # ------------------------------------------------------------------ selection
    @classmethod
    def from_config(cls, **fields: Any) -> LoRAVariant | None:
        """The variant the config fields select, or None (`fields`: `LoRAConfig` field -> value)."""
        return None

    def option(self) -> str:
        """The option that selected it, as a user wrote it (`use_dora=True`), for messages."""
        return self.name

    def supports(self, layer_cls: type[nn.Module]) -> bool:
        """Whether adapter layers of `layer_cls` can carry this variant (by their `peft_layer_type`)."""
        return getattr(layer_cls, "peft_layer_type", "linear") in self.layer_types

    def unsupported_error(self, base: nn.Module | type) -> LoRAConfigError:
        """The error for a layer type it does not implement (`base`: the module being adapted, or its class)."""
        return LoRAConfigError(f"{self.option()} cannot adapt {label(base)} ({base}).")

    def targets_error(self, names: list[str], modules: list[nn.Module] | None = None) -> LoRAConfigError:
        """The error for matched modules (`names`, the `modules` themselves when known) whose layer type it does not
        implement (before any injection)."""
        what = "the embedding(s)"
        if modules and not all(isinstance(m, nn.Embedding) for m in modules):
            what = f"the {'/'.join(sorted({label(m) for m in modules}))} module(s)"
        kinds = {"linear": "Linear and Conv1D", "conv": "Conv1d/2d/3d", "embedding": "Embedding"}
        implemented = " and ".join(kinds.get(k, k) for k in sorted(self.layer_types, key=list(kinds).index))
        return LoRAConfigError(f"{self.option()} cannot adapt {what} {names[:4]}: lightning-lora implements "
                               f"{self.title} for {implemented} layers. Add them to exclude_modules (or leave "
                               "them out of target_modules), or drop the option.")

    # ------------------------------------------------------------------ tensors
    def extra_tensors(self, in_features: int, out_features: int, r: int) -> tuple[ExtraTensor, ...]:
        """The tensors it adds to a layer of these features and rank (names, shapes, PEFT keys)."""
        return ()

    def extra_parameters(self, in_features: int, out_features: int, r: int) -> int:
        """Trainable values it adds to such a layer (the memory estimate: times the adapter dtype's size)."""
        return sum(_numel(t.shape) for t in self.extra_tensors(in_features, out_features, r) if t.trainable)

    # ------------------------------------------------------------------ lifecycle
    def check_target(self, name: str, module: nn.Module, r: int) -> None:
        """Raise a `LoRAConfigError` naming `name` if this base module cannot start the variant (checked for
        every matched module before anything is injected; e.g. PiSSA on a weight it cannot decompose)."""

    def init(self, layer: Any, dtype: torch.dtype) -> None:
        """Called once by the layer's constructor after A and B exist (`dtype`: the adapters' dtype)."""

    def load_state(self, layer: Any, state_dict: dict[str, Any], prefix: str) -> None:
        """Called before the layer loads `state_dict` (e.g. to rebuild a base that depends on its tensors)."""

    def restore_base(self, layer: Any) -> None:
        """Put the original base weight back if the variant changed it (`unload`)."""

    # ------------------------------------------------------------------ compute
    def forward(self, layer: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The adapted output from `result = base(x)` (only called when `owns_forward`)."""
        raise NotImplementedError

    def disabled_forward(self, layer: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The output with the adapters disabled, from `result = base(x)` (the base function)."""
        return result

    def forget_cache(self, layer: Any) -> None:
        """Drop what it keeps between calls (after an edit of the weights through `.data`)."""

    # ------------------------------------------------------------------ merge
    def merged_weight(self, layer: Any, weight: torch.Tensor, delta: torch.Tensor,
                      unmerged: torch.Tensor | None = None) -> torch.Tensor:
        """The merged weight from the dense base `weight` and `delta` (only called when `owns_merge`); `unmerged`:
        the weight before the layer's other adapters were merged into `weight` (several adapters), or None."""
        raise NotImplementedError

    def unmerged_weight(self, layer: Any, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Undo `merged_weight` (only called when `owns_merge`)."""
        raise NotImplementedError

    def discard_merge(self, layer: Any) -> None:
        """Forget what `merged_weight` recorded (the merge was undone without `unmerged_weight`)."""

    def merge_record(self, layer: Any) -> dict[str, torch.Tensor]:
        """What a reversible merge must keep to be undone later (see `LoRALayer.merge_record`)."""
        return {}

    def load_merge_record(self, layer: Any, record: dict[str, torch.Tensor]) -> None:
        """Take back what `merge_record` gave."""

    # ------------------------------------------------------------------ PEFT files and printing
    def peft_conversion(self, a: torch.Tensor, b: torch.Tensor, extras: dict[str, torch.Tensor], alpha: float,
                        use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """`(A, B, alpha)` as written to PEFT files from ours and the layer's extra tensors that have no PEFT key."""
        return a, b, alpha

    def extra_repr(self) -> str:
        """Its part of the layer's repr (", use_dora=True"), empty for none."""
        return ""


def label(base: nn.Module | type) -> str:
    """`nn.Embedding` for torch's modules, else the class name (for messages).

    Example:
        >>> label(nn.Embedding(2, 2)), label(nn.Linear)
        ('nn.Embedding', 'nn.Linear')
    """
    cls = base if isinstance(base, type) else type(base)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = ["ExtraTensor", "LoRAVariant", "label"]
