"""Adapter layers around dense matrix products: `LoRALinear` (`nn.Linear`) and `LoRAConv1D`
(transformers' GPT-2 `Conv1D`, whose weight is stored (in, out)).

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    >>> LoRALinear.peft_layer_type, LoRALinear.fan_in_fan_out, LoRAConv1D.fan_in_fan_out
    ('linear', False, True)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.layers.base import LoRALayer

try:  # transformers is a dependency, but keep the layers importable without it
    from transformers.pytorch_utils import Conv1D as HFConv1D
except Exception:  # pragma: no cover
    HFConv1D = None  # type: ignore[assignment,misc]


class LoRALinear(LoRALayer):
    """LoRA around `nn.Linear`: `W x + b + scaling * B A dropout(x)`.

    Example:
        >>> layer = LoRALinear(nn.Linear(4096, 4096, bias=False), r=8, alpha=16)
        >>> layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
        65536
    """

    _base_attrs = ("in_features", "out_features")
    _fusable = True
    peft_layer_type: ClassVar[str] = "linear"

    def __init__(self, base: nn.Linear, r: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(base, *type(self).features(base), r, alpha, **kwargs)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _fused_base_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        return _dense_weight(self, x, LoRALinear, transposed=False)


class LoRAConv1D(LoRALayer):
    """LoRA around transformers' `Conv1D` (GPT-2), whose weight is stored as (in, out).

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> layer = LoRAConv1D(Conv1D(24, 8), r=2, alpha=4)   # nf=24 outputs, nx=8 inputs
        >>> tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape)
        ((2, 8), (24, 2))
    """

    _base_attrs = ("nf", "nx")
    _fusable = True
    peft_layer_type: ClassVar[str] = "linear"
    fan_in_fan_out: ClassVar[bool] = True

    def __init__(self, base: nn.Module, r: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(base, *type(self).features(base), r, alpha, **kwargs)

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        in_features, out_features = base.weight.shape
        return int(in_features), int(out_features)

    @classmethod
    def delta_from(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return super().delta_from(a, b, scaling).T

    def _fused_base_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        if HFConv1D is None or self.base_cls.forward is not HFConv1D.forward:
            return None
        return _dense_weight(self, x, LoRAConv1D, transposed=True)


def _dense_weight(layer: LoRALayer, x: torch.Tensor, cls: type[LoRALayer], transposed: bool) -> torch.Tensor | None:
    """`layer.weight` as (out, in) if `layer` computes its base exactly as `cls` does (no subclass
    overriding `base_forward`) from a plain dense weight (no tensor subclass, e.g. a quantized one) in
    `x`'s dtype and on its device; else None."""
    w = layer.weight
    if (type(layer).base_forward is not cls.base_forward or type(w) not in (nn.Parameter, torch.Tensor)
            or w.dtype != x.dtype or w.device != x.device or w.layout != torch.strided):
        return None
    return w.t() if transposed else w


__all__ = ["HFConv1D", "LoRAConv1D", "LoRALinear"]
