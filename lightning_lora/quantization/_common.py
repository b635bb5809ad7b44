"""What the quantized-base modules share: optional-dependency plumbing, recognising quantized
weights without importing their packages, casts that never touch quantized codes, and building a
plain `nn.Linear` around a given weight.

Example:
    >>> import torch
    >>> is_quantized_storage(torch.zeros(2)), is_nf4_tensor(torch.zeros(2))
    (False, False)
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: what to run when an optional dependency is missing
PIP_INSTALL = "pip install 'lightning-lora[qlora]'"


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


def is_quantized_storage(tensor: Any) -> bool:
    """Whether `tensor` holds quantized codes that a dtype cast must never touch: a torchao
    `NF4Tensor`, or a bitsandbytes 4-bit weight once quantized (whatever its storage dtype: uint8, or
    bfloat16 / float32 with `bnb_4bit_quant_storage`, as FSDP-QLoRA setups load it).

    Example:
        >>> from lightning_lora.quantization import to_nf4
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


def linear_like(cls: type[nn.Linear], module: nn.Module, weight: nn.Parameter, **attrs: Any) -> nn.Linear:
    """A `cls` (an `nn.Linear` type) with `module`'s features, bias Parameter and train/eval mode, holding
    `weight` (the Parameter itself) and the plain attributes `attrs`, built without allocating a weight.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> new = linear_like(nn.Linear, lin, nn.Parameter(torch.zeros(2, 4), requires_grad=False))
        >>> new.bias is lin.bias, new.weight.requires_grad
        (True, False)
    """
    linear = cls.__new__(cls)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = module.in_features, module.out_features
    for key, value in attrs.items():
        setattr(linear, key, value)
    linear.weight = weight
    linear.register_parameter("bias", module.bias)
    linear.train(module.training)
    return linear


__all__ = ["PIP_INSTALL", "is_nf4_tensor", "is_quantized_storage", "linear_like"]
