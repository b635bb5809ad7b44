"""NF4 (torchao) storage: the tensor helpers (`to_nf4`, `dequantize_nf4`, `nf4_linear`, ...), the frozen
base layer `NF4Linear` and its adapter `LoRANF4Linear` (registered for `NF4Linear` when this module is imported).

Example:
    >>> w = torch.randn(128, 64)
    >>> ((dequantize_nf4(to_nf4(w)) - w).norm() / w.norm()).item() < 0.11
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import MissingDependencyError, QuantizationError
from lightning_lora.layers import register_adapter_type
from lightning_lora.quantization._common import (
    PIP_INSTALL,
    _apply_keeping_quantized,
    _quiet,
    is_nf4_tensor,
    linear_like,
)
from lightning_lora.quantization.layers import LoRAQuantizedLinear

#: values per NF4 block (one int8 scale each), as in QLoRA and torchtune
NF4_BLOCK_SIZE = 64
#: most blocks whose scales share one second-level scale (fewer when the block count is not a multiple)
NF4_SCALER_BLOCK_SIZE = 256


def torchao_nf4() -> Any:
    """torchao's NF4 module (`to_nf4`, `NF4Tensor`, `linear_nf4`).

    Raises:
        MissingDependencyError: torchao is not installed (the message says what to install).

    Example:
        >>> torchao_nf4().NF4Tensor.__name__
        'NF4Tensor'
    """
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            try:
                from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
            except ModuleNotFoundError as err:
                if err.name is None or not err.name.startswith("torchao.quantization"):
                    raise
                from torchao.dtypes import nf4tensor as nf4_tensor  # torchao < 0.15
    except ImportError as err:
        raise MissingDependencyError(f"quantize_base='nf4' needs torchao, which is not installed ({err}); run: "
                                     f"{PIP_INSTALL}   (or: pip install 'torchao>=0.18')") from None
    return nf4_tensor


def scaler_block_size(numel: int, block_size: int = NF4_BLOCK_SIZE) -> int:
    """Blocks per second-level scale: the largest divisor of the block count up to 256.

    torchao needs the number of blocks to be a multiple of it; SmolLM2's 576 x 576 projections have
    5184 blocks (= 216 x 24), so they use 216.

    Example:
        >>> scaler_block_size(4096 * 4096), scaler_block_size(576 * 576), scaler_block_size(192 * 576)
        (256, 216, 216)
    """
    blocks = numel // block_size
    return max(d for d in range(1, min(NF4_SCALER_BLOCK_SIZE, blocks) + 1) if blocks % d == 0)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (2-D, a multiple of 64 values) as a torchao `NF4Tensor` in blocks of 64 with
    double-quantised scales, in the weight's own dtype.

    A weight on the CPU is quantized on the current CUDA device when there is one (much faster for a
    large model) and brought back to the CPU.

    Raises:
        QuantizationError: the weight is not 2-D, not floating point, or not a multiple of 64 values.

    Example:
        >>> w = torch.randn(128, 64)
        >>> q = to_nf4(w)
        >>> ((q.get_original_weight() - w).norm() / w.norm()).item() < 0.11
        True
    """
    nf4 = torchao_nf4()
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() % NF4_BLOCK_SIZE:
        raise QuantizationError(f"cannot store a {weight.dtype} weight of shape {tuple(weight.shape)} in NF4: "
                                f"expected a 2-D floating-point weight with a multiple of {NF4_BLOCK_SIZE} values.")
    source = weight.detach().contiguous()
    device = source.device
    if device.type == "cpu" and torch.cuda.is_available():
        source = source.to(torch.device("cuda", torch.cuda.current_device()))
    out = nf4.to_nf4(source, NF4_BLOCK_SIZE, scaler_block_size(source.numel()))
    return out.to(device) if out.device != device else out


def nf4_bytes(tensor: torch.Tensor) -> int:
    """Bytes an `NF4Tensor` holds: the 4-bit codes, the int8 block scales, their scales, the mean of
    the scales and the 16-entry code book.

    Example:
        >>> nf4_bytes(to_nf4(torch.randn(1024, 1024)))   # 512 KiB codes + 16 KiB scales + 256 + 4 + 64
        540996
    """
    names, _ = tensor.__tensor_flatten__()
    return sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)


def clone_nf4(tensor: torch.Tensor) -> torch.Tensor:
    """An exact copy of an `NF4Tensor`: the same codes, scales and layout in new storage.

    torchao's own `clone` dequantises and quantizes again with a scaler block of 256, which fails for
    a weight whose block count is not a multiple of 256 (every 576 x 576 SmolLM2 projection) and is
    not guaranteed to give the same codes. `copy.deepcopy` of our NF4 layers uses this.

    Example:
        >>> w = to_nf4(torch.randn(576, 576))
        >>> c = clone_nf4(w)
        >>> torch.equal(c.quantized_data, w.quantized_data), c.quantized_data is w.quantized_data
        (True, False)
    """
    names, context = tensor.__tensor_flatten__()
    inner = {name: getattr(tensor, name).clone() for name in names}
    return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def _deepcopy_keeping_nf4(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """`copy.deepcopy(module)` whose NF4 weights (the weight, and the 4-bit weight kept aside while
    merged) are copied exactly with `clone_nf4` instead of torchao's re-quantizing `clone`."""
    for param in (*module._parameters.values(), module.__dict__.get("_quantized_weight")):
        if param is not None and is_nf4_tensor(param) and id(param) not in memo:
            memo[id(param)] = nn.Parameter(clone_nf4(param), requires_grad=param.requires_grad)
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    new.__setstate__(copy.deepcopy(module.__getstate__(), memo))
    return new


#: 4-bit codes dequantised per step: bounds the temporaries (CPU: cache-sized; CUDA: few launches)
_DEQUANT_CHUNK_BYTES = {"cpu": 1 << 16}
_DEQUANT_CHUNK_BYTES_DEFAULT = 1 << 22


@torch.no_grad()
def dequantize_nf4(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of an `NF4Tensor` in `dtype` (default: its own), bit for bit what torchao's
    `get_original_weight().to(dtype)` gives.

    torchao's version keeps ~40 bytes of temporaries per weight value (int64 code indices, expanded
    scales, a stacked copy: 2.4 GB for one 14336 x 4096 Llama-3-8B projection); this one looks the
    pairs of values up per byte in a 256-entry table and scales them block by block, in chunks, into
    the output: the output and a few MB of temporaries.

    Example:
        >>> w = to_nf4(torch.randn(576, 576))
        >>> torch.equal(dequantize_nf4(w), w.get_original_weight())
        True
    """
    dtype = dtype or weight.dtype
    nf4 = weight.nf4
    codes = torch.arange(256, device=nf4.device)
    pairs = torch.stack([nf4[codes >> 4], nf4[codes & 15]], dim=1)  # byte -> (high value, low value)
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size)   # one per block, in the weight's dtype
    data = weight.quantized_data
    block, half = weight.block_size, weight.block_size // 2
    out = torch.empty(weight.shape, dtype=dtype, device=data.device)
    blocks = out.view(-1, block)
    step = max(1, _DEQUANT_CHUNK_BYTES.get(data.device.type, _DEQUANT_CHUNK_BYTES_DEFAULT) // half)
    for start in range(0, blocks.shape[0], step):
        values = torch.index_select(pairs, 0, data[start * half:(start + step) * half].int()).view(-1, block)
        blocks[start:start + step] = values.mul_(scales[start:start + step].unsqueeze(-1))
    return out


class _NF4LinearFunction(torch.autograd.Function):
    """`x @ deq(W)^T` with the weight dequantised in the input's dtype for the forward and again for
    the backward (never kept): torchao's `linear_nf4`, with `dequantize_nf4`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize_nf4(weight, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ dequantize_nf4(weight, grad.dtype), None


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for an NF4 weight: bit for bit torchao's `F.linear` on an
    `NF4Tensor` (`linear_nf4(x, weight) + bias`), with less memory (see `dequantize_nf4`).

    Example:
        >>> w, x = to_nf4(torch.randn(64, 128)), torch.randn(3, 128)
        >>> torch.equal(nf4_linear(x, w), F.linear(x, w))
        True
    """
    out = _NF4LinearFunction.apply(x, weight)
    return out if bias is None else out + bias


class NF4Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight is a torchao `NF4Tensor` (bias, if any, stays dense).

    The forward is `nf4_linear`: torchao's `linear_nf4` (the weight dequantised into the input's
    dtype, for the forward and again for the backward), with a leaner dequantisation.
    `dense_dtype` is the dtype the weight stands for (its dtype when it was quantized, then
    whatever module-wide casts asked for).

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(64, 32))
        >>> layer(torch.randn(2, 64)).shape, layer.weight.requires_grad
        (torch.Size([2, 32]), False)
    """

    dense_dtype: torch.dtype | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.dense_dtype = self.weight.dtype
        self.weight = nn.Parameter(to_nf4(self.weight), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        """An `NF4Linear` holding `linear`'s weight in NF4 and its very bias Parameter.

        Example:
            >>> lin = nn.Linear(64, 8)
            >>> NF4Linear.from_linear(lin).bias is lin.bias
            True
        """
        return linear_like(cls, linear, nn.Parameter(to_nf4(linear.weight), requires_grad=False),  # type: ignore[return-value]
                           dense_dtype=linear.weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight this layer computes with, in `dtype` (default `dense_dtype`).

        Example:
            >>> NF4Linear.from_linear(nn.Linear(64, 8)).dequantize(torch.bfloat16).dtype
            torch.bfloat16
        """
        return dequantize_nf4(self.weight, dtype or self.dense_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        return _apply_keeping_quantized(self, fn, lambda f: super(NF4Linear, self)._apply(f, recurse))  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict[int, Any]) -> NF4Linear:
        return _deepcopy_keeping_nf4(self, memo)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4 (dense {str(self.dense_dtype).removeprefix('torch.')})"


class LoRANF4Linear(LoRAQuantizedLinear):
    """LoRA around an `NF4Linear`: `linear_nf4(x, W_nf4) + b + scaling * B A dropout(x)`.

    Example:
        >>> layer = LoRANF4Linear(NF4Linear.from_linear(nn.Linear(64, 32)), r=4, alpha=8)
        >>> x = torch.randn(3, 64)
        >>> torch.equal(layer(x), layer.quantized_base()(x))      # B = 0: the quantized base's output
        True
    """

    _base_attrs = ("in_features", "out_features")

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)  # what NF4Linear computes

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nf4(self.weight, torch.float32)

    def quantized_base(self) -> NF4Linear:
        return linear_like(NF4Linear, self, self.weight, dense_dtype=self.dense_dtype)  # type: ignore[return-value]

    def _apply(self, fn: Any, recurse: bool = True) -> LoRANF4Linear:
        return _apply_keeping_quantized(self, fn, lambda f: super(LoRANF4Linear, self)._apply(f, recurse))  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict[int, Any]) -> LoRANF4Linear:
        return _deepcopy_keeping_nf4(self, memo)  # type: ignore[return-value]


register_adapter_type(NF4Linear, LoRANF4Linear)


__all__ = ["NF4_BLOCK_SIZE", "NF4_SCALER_BLOCK_SIZE", "LoRANF4Linear", "NF4Linear", "clone_nf4", "dequantize_nf4",
           "nf4_bytes", "nf4_linear", "scaler_block_size", "to_nf4", "torchao_nf4"]
