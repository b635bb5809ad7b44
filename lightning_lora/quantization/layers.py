"""The adapter around a quantized Linear (`LoRAQuantizedLinear`, the base of the NF4 and bitsandbytes
adapters) with its one merge, and `UnadaptableQuantizedLayer` (registered for quantized types that
cannot take an adapter).

Example:
    >>> LoRAQuantizedLinear.peft_layer_type, LoRAQuantizedLinear.takes_model_dtype
    ('linear', True)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import QuantizationError
from lightning_lora.layers import LoRALayer, LoRALinear
from lightning_lora.quantization._common import linear_like


class LoRAQuantizedLinear(LoRALinear):
    """Base of the adapters around a quantized Linear: the base weight stays quantized and frozen.

    A subclass says how the quantized layer computes (`quantized_forward`), how its weight is
    dequantised (`dequantized_weight`) and which module it was (`quantized_base`). With
    `adapter_dtype=None` the adapters take `dense_dtype` (the dtype the weight stands for), never the
    storage dtype of the 4/8-bit codes; a weight that keeps no record of that dtype (a bitsandbytes
    8-bit layer without a bias) stands for `model_dtype`, the dtype of the model around it.

    `merge()` dequantises the weight in float32, merges the delta into it as a dense layer does
    (`LoRALayer.merged_weight`: `W + delta`, or the variant's, e.g. QDoRA) and rounds once into
    `dense_dtype`; the quantized weight is kept aside, so `unmerge()` restores it exactly (no
    re-quantisation, so nothing is rounded twice).
    """

    _fusable = True
    takes_model_dtype = True
    several_adapters = False  # one adapter on a quantized base (QLoRA)
    dense_dtype: torch.dtype | None

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, adapter_dtype: torch.dtype | None = torch.float32,
                 model_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        dense = self.initial_dense_dtype(base) or model_dtype
        super().__init__(base, r, alpha, adapter_dtype=adapter_dtype or dense or torch.get_default_dtype(), **kwargs)
        if adapter_dtype is None:  # adapters follow module-wide casts, as with a dense base
            self.keep_adapter_dtype = False
        self.dense_dtype = dense

    # ------------------------------------------------------------------ to implement
    @staticmethod
    def initial_dense_dtype(base: nn.Module) -> torch.dtype | None:
        """The dtype the quantized weight of `base` stands for (None: unknown)."""
        return getattr(base, "dense_dtype", None)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the quantized base layer computes."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The quantized weight as a dense float32 (out, in) tensor."""
        raise NotImplementedError

    def quantized_base(self) -> nn.Module:
        """The quantized base module (the layer without adapters)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ compute
    @property
    def is_quantized(self) -> bool:
        """Whether the weight is (still) quantized: False while merged (then it is a dense Parameter)."""
        return "_quantized_weight" not in self.__dict__

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_quantized:
            return self.quantized_forward(x)
        w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)

    def dense_base_weight(self) -> tuple[torch.Tensor, bool]:
        """The dequantised weight (float32, (out, in)) while quantized (QDoRA's norm)."""
        if self.is_quantized:
            return self.dequantized_weight(), False
        return super().dense_base_weight()

    def dense_base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_quantized:
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        return super().dense_base_matmul(x)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def weight_norm(self) -> float:
        """`||W||_F` of the weight the layer computes with (dequantised in float32 when quantized)."""
        if not self.is_quantized:
            return super().weight_norm()
        return self.dequantized_weight().norm().item()

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the quantized weight by `round(dequantised + delta)` in `dense_dtype` (one rounding);
        the quantized weight is kept for `unmerge`."""
        if self.merged:
            return
        quantized = self._parameters["weight"]
        dense = self.merged_weight(self.dequantized_weight(), self.delta_weight())  # float32; QDoRA: rescaled
        self.__dict__["_quantized_weight"] = quantized
        self._parameters["weight"] = nn.Parameter(dense.to(self.dense_dtype or torch.get_default_dtype()),
                                                  requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the quantized weight back (exact: it was kept, not re-quantized)."""
        if not self.merged:
            return
        self._parameters["weight"] = self.__dict__.pop("_quantized_weight")
        self.discard_merge()
        self.merged = False

    def to_base_module(self) -> nn.Module:
        """The quantized base module; once merged, a plain `nn.Linear` holding the merged dense weight."""
        if self.is_quantized:
            return self.quantized_base()
        return linear_like(nn.Linear, self, self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={self.is_quantized}"


class UnadaptableQuantizedLayer(LoRALayer):
    """Registered for quantized layer types that cannot take an adapter (bitsandbytes' quantized
    embeddings): building one raises a `QuantizationError` that says so."""

    adaptable = False

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:  # noqa: D107
        raise QuantizationError(
            f"a bitsandbytes {type(base).__name__} (a quantized embedding) cannot take a LoRA adapter; leave it "
            "out of target_modules, or keep it unquantized when loading (BitsAndBytesConfig("
            "llm_int8_skip_modules=[...]) naming it).")


__all__ = ["LoRAQuantizedLinear", "UnadaptableQuantizedLayer"]
