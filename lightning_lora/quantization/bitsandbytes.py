"""bitsandbytes layers (transformers' `load_in_4bit` / `load_in_8bit`): the import, the dense weight of a
4/8-bit Linear (`dequantize_bnb_linear`) and the adapters `LoRALinear4bit` / `LoRALinear8bitLt`,
registered the first time `adapter_class_for` meets a bitsandbytes module (this module registers that
hook when it is imported; bitsandbytes itself is imported only then).

Example:
    >>> import sys
    >>> from lightning_lora.layers.registry import _LAZY_REGISTRATIONS
    >>> "bitsandbytes" in _LAZY_REGISTRATIONS or "bitsandbytes" in sys.modules
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_lora.errors import MissingDependencyError, QuantizationError
from lightning_lora.layers import register_adapter_type, register_adapter_types_lazily
from lightning_lora.quantization._common import PIP_INSTALL, _apply_keeping_quantized, _bnb_module
from lightning_lora.quantization.layers import LoRAQuantizedLinear, UnadaptableQuantizedLayer


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


register_adapter_types_lazily("bitsandbytes", register_bitsandbytes_adapters)


__all__ = ["LoRALinear4bit", "LoRALinear8bitLt", "bitsandbytes", "dequantize_bnb_linear",
           "register_bitsandbytes_adapters"]
