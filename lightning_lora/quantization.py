"""Quantized frozen bases (QLoRA): a 4-bit NF4 base through torchao, and models quantized with bitsandbytes.

QLoRA (Dettmers et al. 2023) keeps the frozen base weights in 4 bits and trains LoRA adapters on top
in higher precision. Two routes lead there:

* `LoRAConfig(quantize_base="nf4")` (also `LoRA(quantize_base="nf4")` and the YAML key): `inject_lora`
  replaces every `nn.Linear` except the output head, `modules_to_save` and `exclude_modules` (the whole
  frozen base, `quantize_base_modules="all-linear"`, the default; `"adapted"`: only the adapted ones)
  by an `NF4Linear`, whose weight is a torchao
  `NF4Tensor`: 4-bit NormalFloat codes in blocks of 64 values, one int8 scale per block, the scales
  quantized again per group of up to 256 blocks ("double quantisation"). The adapter around it is a
  `LoRANF4Linear`. The forward dequantises the weight on the fly into the input's dtype (torchao's
  `linear_nf4`, with a leaner dequantisation: `nf4_linear`); A and B stay in `adapter_dtype`. A
  weight costs 0.516 bytes per value (4.13 bits), 0.258x of bf16.
* A model quantized by transformers with bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True)` or
  `load_in_8bit=True`) needs no option: its `Linear4bit` / `Linear8bitLt` layers are valid targets
  (`LoRALinear4bit`, `LoRALinear8bitLt`), as in PEFT. Lightning's `BitsandbytesPrecision` is not used.

In both, the state-dict keys are the base model's (`...q_proj.weight`, plus bitsandbytes' own
`weight.absmax`, ... for its layers), adapter-only checkpoints hold no base weight, injection changes
no output bit (B starts at zero), module-wide casts (`bf16-true`, `16-true`, `.half()`) leave the 4-bit
weights as they are (also bitsandbytes codes stored in a float dtype, see `guard_quantized_storage`), and `merge_and_unload` dequantises each weight in float32, adds the delta and rounds once
into a plain `nn.Linear` (in the dtype the rest of the model has, or the `dtype=` asked for).

torchao (`quantize_base="nf4"`) and bitsandbytes are optional: `pip install 'lightning-lora[qlora]'`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> model = nn.Sequential(); model.add_module("q_proj", nn.Linear(256, 256))
    >>> _ = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"], quantize_base="nf4"))
    >>> type(model.q_proj).__name__, type(model.q_proj.weight).__name__
    ('LoRANF4Linear', 'NF4Tensor')
    >>> quantized_weight_bytes(model), 256 * 256 * 2      # 4-bit codes, int8 scales, their scales; bf16
    (33876, 131072)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import dora
from lightning_lora.config import ADAPTER_DTYPES, ALL_LINEAR, LoRAConfig, _dtype_name
from lightning_lora.errors import LoRAError, MissingDependencyError, QuantizationError
from lightning_lora.layers import LoRALayer, LoRALinear, register_adapter_type
from lightning_lora.matching import is_inside, name_matches

#: values per NF4 block (one int8 scale each), as in QLoRA and torchtune
NF4_BLOCK_SIZE = 64
#: most blocks whose scales share one second-level scale (fewer when the block count is not a multiple)
NF4_SCALER_BLOCK_SIZE = 256
#: what to run when an optional dependency is missing
PIP_INSTALL = "pip install 'lightning-lora[qlora]'"


# ============================================================================ optional dependencies
@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence import-time log lines of optional packages (torchao logs every optional kernel it cannot load)."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


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


def bitsandbytes() -> Any:
    """The `bitsandbytes` package.

    Raises:
        MissingDependencyError: bitsandbytes is not installed (the message says what to install).

    Example:
        >>> bitsandbytes().nn.Linear4bit.__name__     # doctest: +SKIP
        'Linear4bit'
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise MissingDependencyError(f"this model uses bitsandbytes layers, and bitsandbytes cannot be imported "
                                     f"({err}); run: {PIP_INSTALL}   (or: pip install 'bitsandbytes>=0.48')") from None
    return bnb


def is_nf4_tensor(tensor: Any) -> bool:
    """Whether `tensor` is a torchao `NF4Tensor` (checked without importing torchao).

    Example:
        >>> is_nf4_tensor(torch.zeros(2))
        False
    """
    return any(c.__name__ == "NF4Tensor" and c.__module__.startswith("torchao") for c in type(tensor).__mro__)


def _bnb_module(module: nn.Module, name: str) -> bool:
    """Whether `module` is an instance of bitsandbytes' `nn.<name>` (False when bitsandbytes was never imported)."""
    bnb = sys.modules.get("bitsandbytes")
    cls = getattr(getattr(bnb, "nn", None), name, None)
    return cls is not None and isinstance(module, cls)


# ============================================================================ NF4 tensors
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


# ============================================================================ the NF4 base layer
def is_quantized_storage(tensor: Any) -> bool:
    """Whether `tensor` holds quantized codes that a dtype cast must never touch: a torchao
    `NF4Tensor`, or a bitsandbytes 4-bit weight once quantized (whatever its storage dtype: uint8, or
    bfloat16 / float32 with `bnb_4bit_quant_storage`, as FSDP-QLoRA setups load it).

    Example:
        >>> is_quantized_storage(to_nf4(torch.randn(64, 64))), is_quantized_storage(torch.zeros(2))
        (True, False)
    """
    return is_nf4_tensor(tensor) or bool(getattr(tensor, "bnb_quantized", False))


def _apply_keeping_quantized(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                             apply: Callable[[Callable[[torch.Tensor], torch.Tensor]], nn.Module]) -> nn.Module:
    """`module._apply(fn)` that moves quantized weights between devices but never casts them.

    torchao's `NF4Tensor.to(dtype)` returns a dense tensor, and a bitsandbytes 4-bit weight stored in
    a float dtype would have its packed codes converted as numbers, so `model.to(torch.bfloat16)`,
    `.half()` or Lightning's `bf16-true` / `16-true` conversion would silently turn a 4-bit weight into
    a full one or into garbage. Here a dtype cast instead changes `module.dense_dtype` where the
    module has one (the dtype the weight stands for, used when it is dequantised for a merge); the
    codes stay as they are. Everything else (bias, adapters) gets `fn`.
    """
    quantized = [p for p in list(module._parameters.values()) + [module.__dict__.get("_quantized_weight")]
                 if p is not None and is_quantized_storage(p)]
    if not quantized:
        return apply(fn)
    dense = getattr(module, "dense_dtype", None) or torch.get_default_dtype()
    probe = fn(torch.zeros((), dtype=dense, device=quantized[0].device))
    if probe.is_floating_point() and hasattr(module, "dense_dtype"):
        module.dense_dtype = probe.dtype
    ids = {id(p) for p in quantized}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if id(t) in ids:
            return t if t.device == probe.device else t.to(probe.device)
        return fn(t)

    stash = module.__dict__.get("_quantized_weight")
    if stash is not None and is_quantized_storage(stash) and stash.device != probe.device:
        moved = stash.to(probe.device)
        module.__dict__["_quantized_weight"] = (moved if isinstance(moved, nn.Parameter)
                                                else nn.Parameter(moved, requires_grad=False))
    return apply(keep)


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
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.dense_dtype = linear.weight.dtype
        layer.weight = nn.Parameter(to_nf4(linear.weight), requires_grad=False)
        layer.register_parameter("bias", linear.bias)
        layer.train(linear.training)
        return layer

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


# ============================================================================ adapters on quantized bases
class LoRAQuantizedLinear(LoRALinear):
    """Base of the adapters around a quantized Linear: the base weight stays quantized and frozen.

    A subclass says how the quantized layer computes (`quantized_forward`), how its weight is
    dequantised (`dequantized_weight`) and which module it was (`quantized_base`). With
    `adapter_dtype=None` the adapters take `dense_dtype` (the dtype the weight stands for), never the
    storage dtype of the 4/8-bit codes; a weight that keeps no record of that dtype (a bitsandbytes
    8-bit layer without a bias) stands for `model_dtype`, the dtype of the model around it.

    `merge()` dequantises the weight in float32, adds the delta and rounds once into `dense_dtype`;
    the quantized weight is kept aside, so `unmerge()` restores it exactly (no re-quantisation).
    """

    _fusable = True
    takes_model_dtype = True
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

    def dora_base_weight(self) -> tuple[torch.Tensor, bool]:
        """QDoRA: the dequantised weight (float32, (out, in)) while quantized."""
        if self.is_quantized:
            return self.dequantized_weight(), False
        return super().dora_base_weight()

    def dora_base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_quantized:
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        return super().dora_base_matmul(x)

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
        dense = self.dequantized_weight()
        if self.use_dora:  # QDoRA: the rescaled dequantised weight; the norm is kept for a later unmerge
            dense, self._dora_merge_norm = dora.merged_weight(dense, self.delta_weight(), self.lora_magnitude_vector)
        else:
            dense.add_(self.delta_weight().to(dense.device))
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
        self._dora_merge_norm = None
        self.merged = False

    def to_base_module(self) -> nn.Module:
        """The quantized base module; once merged, a plain `nn.Linear` holding the merged dense weight."""
        if self.is_quantized:
            return self.quantized_base()
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        linear.register_parameter("bias", self.bias)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={self.is_quantized}"


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
        layer = NF4Linear.__new__(NF4Linear)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = self.in_features, self.out_features
        layer.dense_dtype = self.dense_dtype
        layer.weight = self.weight
        layer.register_parameter("bias", self.bias)
        layer.train(self.training)
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> LoRANF4Linear:
        return _apply_keeping_quantized(self, fn, lambda f: super(LoRANF4Linear, self)._apply(f, recurse))  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict[int, Any]) -> LoRANF4Linear:
        return _deepcopy_keeping_nf4(self, memo)  # type: ignore[return-value]


class _LoRABitsAndBytes(LoRAQuantizedLinear):
    """Common part of the adapters around bitsandbytes layers.

    The bitsandbytes layer is kept (not as a submodule: the state-dict keys stay the base's) and
    computes the base output with its own forward and writes its own state-dict entries
    (`weight.absmax`, `SCB`, ...), on the Parameters this layer registers.
    """

    _base_attrs = ("in_features", "out_features")

    def __init__(self, base: nn.Linear, r: int, alpha: float, **kwargs: Any) -> None:
        self.check_quantized(base)
        self.__dict__["_bnb_layer"] = base  # before the layer is built: DoRA's magnitude dequantises through it
        super().__init__(base, r, alpha, **kwargs)

    @staticmethod
    def check_quantized(base: nn.Module) -> None:
        """Raise a `QuantizationError` when `base` has not quantized its weight yet."""

    def _synced(self) -> nn.Module:
        """The bitsandbytes layer, holding this layer's current Parameters and train/eval mode."""
        base = self.__dict__["_bnb_layer"]
        for key in base._parameters:
            base._parameters[key] = self._parameters.get(key)
        base.training = self.training
        return base

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._synced().forward(x)

    def _apply(self, fn: Any, recurse: bool = True) -> _LoRABitsAndBytes:
        return _apply_keeping_quantized(self, fn, lambda f: super(_LoRABitsAndBytes, self)._apply(f, recurse))  # type: ignore[return-value]

    def quantized_base(self) -> nn.Module:
        return self._synced()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if not self.is_quantized:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._synced()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias, bitsandbytes' entries
        for name, tensor in self._own_adapter_tensors():  # DoRA's magnitude
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _own_adapter_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The adapter tensors held by this layer itself (not by lora_A / lora_B), e.g. DoRA's magnitude."""
        own = {**self._parameters, **self._buffers}
        return [(n, own[n]) for n in self.ADAPTER_TENSORS if own.get(n) is not None]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        if not self.is_quantized:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        adapter = dict(self._own_adapter_tensors())
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix)
               and k[len(prefix):].split(".", 1)[0] not in self._modules and k[len(prefix):] not in adapter}
        base = self._synced()
        base._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name, tensor in adapter.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
            elif state_dict[key].shape != tensor.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, "
                                  f"the shape in the current model is {tuple(tensor.shape)}.")
            else:
                with torch.no_grad():
                    tensor.copy_(state_dict[key])
        for key in base._parameters:  # bitsandbytes may have replaced a Parameter
            self._parameters[key] = base._parameters[key]


class LoRALinear4bit(_LoRABitsAndBytes):
    """LoRA around bitsandbytes' `Linear4bit` (NF4 or FP4; transformers' `load_in_4bit=True`).

    Example:
        >>> import bitsandbytes as bnb                                                  # doctest: +SKIP
        >>> base = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")                # quantizes  # doctest: +SKIP
        >>> LoRALinear4bit(base, r=4, alpha=8).lora_A.weight.shape                      # doctest: +SKIP
        torch.Size([4, 64])
    """

    @staticmethod
    def check_quantized(base: nn.Module) -> None:
        if not getattr(base.weight, "bnb_quantized", False):
            raise QuantizationError(
                f"this bitsandbytes {type(base).__name__} has not quantized its weight yet (it is still "
                f"{base.weight.dtype}); bitsandbytes quantizes when the layer is moved to its device: call "
                "model.to('cuda') (or .to('cpu')) first, or load the model with transformers' BitsAndBytesConfig.")

    @staticmethod
    def initial_dense_dtype(base: nn.Module) -> torch.dtype | None:
        state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        return getattr(state, "original_dtype", None) or getattr(state, "dtype", None)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_bnb_linear(self._synced())


class LoRALinear8bitLt(_LoRABitsAndBytes):
    """LoRA around bitsandbytes' `Linear8bitLt` (LLM.int8(); transformers' `load_in_8bit=True`).

    Example:
        >>> import bitsandbytes as bnb                                                          # doctest: +SKIP
        >>> base = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")                # doctest: +SKIP
        >>> LoRALinear8bitLt(base, r=4, alpha=8).lora_B.weight.shape                            # doctest: +SKIP
        torch.Size([32, 4])
    """

    @staticmethod
    def check_quantized(base: nn.Module) -> None:
        if base.weight.dtype != torch.int8:
            raise QuantizationError(
                f"this bitsandbytes Linear8bitLt holds a {base.weight.dtype} weight, not int8 codes "
                "(has_fp16_weights=True, or not moved to its device yet); build it with has_fp16_weights=False "
                "and move it to its device, or load the model with transformers' BitsAndBytesConfig(load_in_8bit=True).")

    @staticmethod
    def initial_dense_dtype(base: nn.Module) -> torch.dtype | None:
        return base.bias.dtype if base.bias is not None else None  # bitsandbytes keeps no record of it

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_bnb_linear(self._synced())


def dequantize_bnb_linear(module: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes `Linear4bit` / `Linear8bitLt` as a dense float32 (out, in) tensor.

    Example:
        >>> dequantize_bnb_linear(bnb_model.model.layers[0].self_attn.q_proj).dtype   # doctest: +SKIP
        torch.float32
    """
    bnb = bitsandbytes()
    weight = module.weight
    if _bnb_module(module, "Linear8bitLt"):
        state = module.state
        scb = state.SCB if state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()
    quant_state = weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first inference call; undo it as
        # its own state_dict() does
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
        module.quant_state = quant_state = weight.quant_state
    return bnb.functional.dequantize_4bit(weight.data, quant_state).float()


class UnadaptableQuantizedLayer(LoRALayer):
    """Registered for quantized layer types that cannot take an adapter (bitsandbytes' quantized
    embeddings): building one raises a `QuantizationError` that says so."""

    adaptable = False

    def __init__(self, base: nn.Module, *args: Any, **kwargs: Any) -> None:  # noqa: D107
        raise QuantizationError(
            f"a bitsandbytes {type(base).__name__} (a quantized embedding) cannot take a LoRA adapter; leave it "
            "out of target_modules, or keep it unquantized when loading (BitsAndBytesConfig("
            "llm_int8_skip_modules=[...]) naming it).")


def register_bitsandbytes_adapters() -> None:
    """Make bitsandbytes' `Linear4bit` and `Linear8bitLt` valid LoRA targets (and refuse its quantized
    embeddings clearly). `lightning_lora.layers` calls this the first time it meets a bitsandbytes module.

    Example:
        >>> register_bitsandbytes_adapters()        # doctest: +SKIP
    """
    bnb = bitsandbytes()
    register_adapter_type(bnb.nn.Linear4bit, LoRALinear4bit)
    register_adapter_type(bnb.nn.Linear8bitLt, LoRALinear8bitLt)
    for name in ("Embedding4bit", "Embedding8bit"):
        cls = getattr(bnb.nn, name, None)
        if cls is not None:
            register_adapter_type(cls, UnadaptableQuantizedLayer)


register_adapter_type(NF4Linear, LoRANF4Linear)


# ============================================================================ casts and bitsandbytes layers without adapters
# bitsandbytes' Linear4bit lets every module-wide cast reach its weight: `model.to(torch.float16)` (Lightning's
# 16-true / bf16-true conversion) converts the packed 4-bit codes as numbers when they are stored in a float dtype
# (`bnb_4bit_quant_storage=torch.bfloat16`), which silently corrupts the layer (or crashes in bitsandbytes for
# float32 storage). torch's `Module._apply` has no hook, and wrapping the layer in a module of ours would change
# its type for everything that checks `isinstance(m, bnb.nn.Linear4bit)` (transformers, PEFT, this package). So
# the layers without adapters get a subclass of their own class that only overrides `_apply`
# (`_apply_keeping_quantized`): this is the one place where this package replaces an attribute (`__class__`) of
# an object it does not own, and `unguard_quantized_storage` is its undo (`unload` calls it). Adapted layers need
# none of this: `LoRALinear4bit` is ours.

#: bitsandbytes class -> its subclass that keeps quantized storage under casts
_CAST_SAFE: dict[type, type] = {}
_CAST_SAFE_PREFIX = "_CastSafe"


def _cast_safe_apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    base = type(self)._lora_guarded_class
    return _apply_keeping_quantized(self, fn, lambda f: base._apply(self, f, recurse))


def _cast_safe_class(cls: type) -> type:
    """The subclass of bitsandbytes' `cls` that keeps its quantized weight under casts (made once; its
    name is the class's own, so the model prints as before; pickles as `quantization._CastSafe<name>`)."""
    if cls not in _CAST_SAFE:
        _CAST_SAFE[cls] = type(cls.__name__, (cls,), {
            "_apply": _cast_safe_apply, "_lora_guarded_class": cls, "__module__": __name__,
            "__qualname__": f"{_CAST_SAFE_PREFIX}{cls.__name__}"})
    return _CAST_SAFE[cls]


def __getattr__(name: str) -> Any:
    """`_CastSafe<bitsandbytes class>` (for unpickling a model whose layers were guarded)."""
    if name.startswith(_CAST_SAFE_PREFIX):
        cls = getattr(bitsandbytes().nn, name.removeprefix(_CAST_SAFE_PREFIX), None)
        if isinstance(cls, type):
            return _cast_safe_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def guard_quantized_storage(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Make module-wide casts (`.to(dtype)`, `.half()`, `.bfloat16()`, Lightning's precision plugins)
    leave the quantized weights of `model`'s bitsandbytes 4-bit layers without adapters as they are,
    whatever their storage dtype; device moves still reach them. `inject_lora` calls this (outside
    `skip`); `unguard_quantized_storage` undoes it. Adapter layers and NF4 layers keep their codes
    by themselves.

    Returns:
        The paths of the layers guarded now.

    Example:
        >>> guard_quantized_storage(nn.Linear(2, 2))      # no bitsandbytes layer: nothing to do
        []
    """
    guarded = []
    for name, module in model.named_modules():
        if is_inside(name, skip) or not _bnb_module(module, "Linear4bit"):
            continue
        cls = type(module)
        if getattr(cls, "_lora_guarded_class", None) is None:
            module.__class__ = _cast_safe_class(cls)
            guarded.append(name)
    return guarded


def unguard_quantized_storage(model: nn.Module) -> list[str]:
    """Undo `guard_quantized_storage`: the layers get their bitsandbytes class back.

    Returns:
        The paths of the layers given back their class.

    Example:
        >>> unguard_quantized_storage(nn.Linear(2, 2))
        []
    """
    restored = []
    for name, module in model.named_modules():
        original = getattr(type(module), "_lora_guarded_class", None)
        if original is not None:
            module.__class__ = original
            restored.append(name)
    return restored


# ============================================================================ whole-model operations
def is_quantized_module(module: nn.Module) -> bool:
    """Whether `module` holds a quantized weight: an `NF4Linear`, a bitsandbytes 4/8-bit Linear, or
    an adapter around one that is not merged.

    Example:
        >>> is_quantized_module(NF4Linear.from_linear(nn.Linear(64, 8))), is_quantized_module(nn.Linear(64, 8))
        (True, False)
    """
    if isinstance(module, LoRAQuantizedLinear):
        return module.is_quantized
    return isinstance(module, NF4Linear) or _bnb_module(module, "Linear4bit") or _bnb_module(module, "Linear8bitLt")


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights in `model` (NF4 codes and scales; bitsandbytes codes and quant
    state), each counted once.

    Example:
        >>> quantized_weight_bytes(NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False)))
        540996
    """
    total, seen = 0, set()
    for module in model.modules():
        if not is_quantized_module(module) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        w = module.weight
        if is_nf4_tensor(w):
            total += nf4_bytes(w)
        else:
            total += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                             if isinstance(t, torch.Tensor))
            layer = module._synced() if isinstance(module, _LoRABitsAndBytes) else module
            scb = getattr(getattr(layer, "state", None), "SCB", None)
            scb = scb if scb is not None else getattr(w, "SCB", None)
            if scb is not None:
                total += scb.numel() * scb.element_size()
    return total


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def modules_to_quantize(model: nn.Module, config: LoRAConfig, adapted: Sequence[str], *, heads: Sequence[str] = (),
                        saved: Sequence[str] = (), skip: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Paths of the `nn.Linear` layers `config.quantize_base` stores in NF4, in `named_modules()` order:
    the adapted ones, with `quantize_base_modules="all-linear"` (the default) also every other
    `nn.Linear` except the output `heads`, `modules_to_save` (`saved`), `config.exclude_modules`
    (matched at `prefix`, as for adapters) and `skip` subtrees. Layers already quantized (NF4 or
    bitsandbytes) and adapted Conv1D / Embedding layers are left as they are.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64)); m.add_module("o_proj", nn.Linear(64, 64))
        >>> modules_to_quantize(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"])
        ['q_proj', 'o_proj']
        >>> cfg = LoRAConfig(target_modules=["q_proj"], exclude_modules=["o_proj"], quantize_base="nf4")
        >>> modules_to_quantize(m, cfg, ["q_proj"])
        ['q_proj']
    """
    if config.quantize_base is None:
        return []
    chosen = set(adapted)
    out = []
    for name, module in model.named_modules():
        if not name or is_inside(name, skip) or is_quantized_module(module):
            continue
        if name in chosen:
            if isinstance(module, nn.Linear):
                out.append(name)
        elif (config.quantize_base_modules == ALL_LINEAR and type(module) is nn.Linear and name not in heads
              and not is_inside(name, saved) and not is_inside(name, chosen)
              and not name_matches(_join(prefix, name), config.exclude_modules)):
            out.append(name)
    return out


def quantize_base_modules(model: nn.Module, config: LoRAConfig, adapted: Sequence[str], *, heads: Sequence[str] = (),
                          saved: Sequence[str] = (), skip: Sequence[str] = (), prefix: str = "",
                          originals: dict[str, nn.Module] | None = None) -> list[str]:
    """Replace the layers `modules_to_quantize` picks by `NF4Linear` (in place). `inject_lora` calls
    this before it puts the adapters in.

    Every layer is checked before any is replaced. The replaced modules are recorded in `originals`
    (path -> module) as they go, so that a caller can put them back (`restore_modules`).

    Raises:
        MissingDependencyError: torchao is not installed.
        QuantizationError: a layer whose weight cannot be stored in NF4 (its size is not a multiple of
            64 values) or is shared with another module (tied weights).

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64))
        >>> quantize_base_modules(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"])
        ['q_proj']
        >>> type(m.q_proj).__name__
        'NF4Linear'
    """
    names = modules_to_quantize(model, config, adapted, heads=heads, saved=saved, skip=skip, prefix=prefix)
    if not names:
        return []
    torchao_nf4()  # a missing torchao is reported before anything changes
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append(_join(name, key))
    for name in names:
        weight = model.get_submodule(name).weight
        full = _join(prefix, name)
        if weight.numel() % NF4_BLOCK_SIZE or not weight.is_floating_point():
            raise QuantizationError(
                f"quantize_base={config.quantize_base!r}: {full} has a {weight.dtype} weight of shape "
                f"{tuple(weight.shape)}, which NF4 cannot store (it needs a floating-point weight with a multiple "
                f"of {NF4_BLOCK_SIZE} values); leave that layer out (exclude_modules) or drop quantize_base.")
        shared = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        if shared:
            raise QuantizationError(
                f"quantize_base={config.quantize_base!r}: the weight of {full} is shared with {shared[0]} (tied "
                "weights), so it cannot be quantized on its own; leave that layer out of target_modules, or untie "
                "the weights first.")
    originals = originals if originals is not None else {}
    for name in names:
        module = model.get_submodule(name)
        _set_submodule(model, name, NF4Linear.from_linear(module))
        originals[name] = module
    return names


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the modules `quantize_base_modules` (or `dequantize_for_merge`) replaced back in place.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(64, 64)); before = m.q_proj
        >>> saved = {}
        >>> _ = quantize_base_modules(m, LoRAConfig(target_modules=["q_proj"], quantize_base="nf4"), ["q_proj"],
        ...                           originals=saved)
        >>> restore_modules(m, saved); m.q_proj is before
        True
    """
    for name, module in originals.items():
        _set_submodule(model, name, module)
    _restore_bnb_quantization_config(model)


def merge_dtype(model: nn.Module, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype `merge_and_unload` writes dequantised weights in: `dtype` if given, else the most
    common dtype (by number of values) of the model's other floating-point parameters (bf16 after a
    `bf16-true` run), else bfloat16.

    Example:
        >>> merge_dtype(nn.Linear(2, 2)), merge_dtype(nn.Linear(2, 2), "bf16")
        (torch.float32, torch.bfloat16)
    """
    if dtype is not None:
        if isinstance(dtype, str):
            try:
                return ADAPTER_DTYPES[_dtype_name(dtype)]  # type: ignore[index]
            except LoRAError:
                raise LoRAError(f"dtype={dtype!r} is not supported; expected one of {sorted(ADAPTER_DTYPES)}.") from None
        return dtype
    counts: dict[torch.dtype, int] = {}
    quantized = {id(m.weight) for m in model.modules() if is_quantized_module(m)}
    for name, param in model.named_parameters():
        if id(param) in quantized or not param.is_floating_point() or ".lora_" in f".{name}":
            continue
        counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.bfloat16


def _dense_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = module.in_features, module.out_features
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.register_parameter("bias", module.bias)
    linear.train(module.training)
    return linear


@torch.no_grad()
def dequantize_module(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain `nn.Linear` computing what a quantized Linear (`NF4Linear`, bitsandbytes) computes,
    with its weight dequantised into `dtype` (the bias Parameter is the same object).

    Example:
        >>> dequantize_module(NF4Linear.from_linear(nn.Linear(64, 8)), torch.bfloat16).weight.dtype
        torch.bfloat16
    """
    if isinstance(module, NF4Linear):
        return _dense_linear(module, module.dequantize(dtype))
    if _bnb_module(module, "Linear4bit") or _bnb_module(module, "Linear8bitLt"):
        return _dense_linear(module, dequantize_bnb_linear(module).to(dtype))
    raise LoRAError(f"dequantize_module expects a quantized Linear (NF4Linear or a bitsandbytes Linear4bit / "
                    f"Linear8bitLt), got {type(module).__name__}.")


def dequantize_for_merge(model: nn.Module, dtype: torch.dtype | str | None = None) -> dict[str, nn.Module]:
    """Prepare `model` for `merge_and_unload`: quantized Linear layers without adapters are replaced by
    dense `nn.Linear` layers, and adapters on quantized layers will merge into `dtype`
    (`merge_dtype(model, dtype)`); transformers models lose their bitsandbytes `quantization_config`
    once no bitsandbytes layer is left.

    Returns:
        path -> the quantized module (without adapters) that the merge replaces, so that
        `restore_modules` can undo it (`unmerge_and_reinject`). Empty when nothing is quantized.

    Example:
        >>> m = nn.Sequential(); m.add_module("q_proj", NF4Linear.from_linear(nn.Linear(64, 64)))
        >>> sorted(dequantize_for_merge(m, torch.bfloat16)), type(m.q_proj).__name__, m.q_proj.weight.dtype
        (['q_proj'], 'Linear', torch.bfloat16)
    """
    found = [(n, m) for n, m in model.named_modules() if n and is_quantized_module(m)]
    if not found:
        return {}
    target = merge_dtype(model, dtype)
    originals: dict[str, nn.Module] = {}
    for name, module in found:
        if isinstance(module, LoRAQuantizedLinear):
            originals[name] = module.quantized_base()
            module.dense_dtype = target
        else:
            originals[name] = module
            _set_submodule(model, name, dequantize_module(module, target))
    if not any(_bnb_module(m, "Linear4bit") or _bnb_module(m, "Linear8bitLt") for m in model.modules()):
        _drop_bnb_quantization_config(model)
    return originals


#: attribute of a model whose bitsandbytes quantization record `dequantize_for_merge` removed (to restore it)
_DROPPED_ATTR = "_lora_bnb_quantization_record"
_RECORD_ATTRS = ("hf_quantizer", "quantization_method", "is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit")


def _drop_bnb_quantization_config(model: nn.Module) -> None:
    """What transformers' `dequantize()` does to the model record: no `quantization_config`, not
    quantized, so `save_pretrained` writes a plain model that reloads as one. What is removed is kept
    on the model, so `restore_modules` can put it back."""
    for module in model.modules():
        quantizer = getattr(module, "hf_quantizer", None)
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        if quantizer is None or str(getattr(method, "value", method)) != "bitsandbytes":
            continue
        saved = {k: module.__dict__[k] for k in _RECORD_ATTRS if k in module.__dict__}
        config = getattr(module, "config", None)
        saved["config.quantization_config"] = getattr(config, "quantization_config", None)
        with contextlib.suppress(Exception):
            quantizer.remove_quantization_config(module)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if module.__dict__.get(flag):
                module.__dict__[flag] = False
        model.__dict__.setdefault(_DROPPED_ATTR, []).append((module, saved))


def _restore_bnb_quantization_config(model: nn.Module) -> None:
    for module, saved in model.__dict__.pop(_DROPPED_ATTR, []):
        for key, value in saved.items():
            if key == "config.quantization_config":
                if value is not None:
                    module.config.quantization_config = value
            else:
                module.__dict__[key] = value


@contextlib.contextmanager
def host_init_context(config: LoRAConfig) -> Iterator[None]:
    """Inside, new tensors are created on the CPU when `config.quantize_base` is set (else nothing
    changes): a model built there (e.g. in a LightningModule's `configure_model`, which Lightning runs
    on the accelerator) is loaded in host memory and quantized there, so an 8B model whose bf16
    weights (16 GB) would not fit a 12 GB GPU reaches the GPU in 4 bits.

    Example:
        >>> with host_init_context(LoRAConfig(quantize_base="nf4")):
        ...     torch.empty(1).device.type
        'cpu'
    """
    if config.quantize_base is None:
        yield
        return
    with torch.device("cpu"):
        yield


__all__ = [
    "LoRALinear4bit",
    "LoRALinear8bitLt",
    "LoRANF4Linear",
    "LoRAQuantizedLinear",
    "MissingDependencyError",
    "NF4Linear",
    "NF4_BLOCK_SIZE",
    "PIP_INSTALL",
    "QuantizationError",
    "clone_nf4",
    "dequantize_bnb_linear",
    "dequantize_for_merge",
    "dequantize_module",
    "dequantize_nf4",
    "host_init_context",
    "guard_quantized_storage",
    "is_nf4_tensor",
    "is_quantized_module",
    "is_quantized_storage",
    "merge_dtype",
    "modules_to_quantize",
    "nf4_bytes",
    "nf4_linear",
    "quantize_base_modules",
    "quantized_weight_bytes",
    "register_bitsandbytes_adapters",
    "restore_modules",
    "scaler_block_size",
    "to_nf4",
    "torchao_nf4",
    "unguard_quantized_storage",
]
