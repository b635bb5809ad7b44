"""The numbers a step's memory depends on: a Llama-style decoder's shape and the precision's byte sizes.

`_shape_of` reads hidden, intermediate, layers, heads, kv heads, head dim and vocabulary from a transformers
config (its text config for a multimodal one); `_precision` maps a Lightning precision to the bytes of the
base weights, of matmul outputs and of the residual stream, and whether autocast casts per use.

Example:
    >>> "bf16-true" in PRECISIONS
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_lora.errors import LoRAError

PRECISIONS = ("bf16-true", "bf16-mixed", "16-true", "16-mixed", "32-true")


@dataclass
class _Shape:
    """The numbers of a Llama-style decoder that activation memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn: str

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _shape_of(config: Any) -> _Shape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        if default is None:
            raise LoRAError(f"model config ({getattr(text, 'model_type', '?')}) has none of {names}; the estimate "
                            "needs a decoder-only (Llama-style) transformers config.")
        return default

    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    return _Shape(hidden=hidden, intermediate=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
                  layers=int(get("num_hidden_layers", "n_layer")), heads=heads,
                  kv_heads=int(get("num_key_value_heads", default=heads)),
                  head_dim=int(getattr(text, "head_dim", None) or hidden // heads), vocab=int(get("vocab_size")),
                  tied=bool(getattr(config, "tie_word_embeddings", False)),
                  attn=str(getattr(config, "_attn_implementation", None) or "sdpa"))


@dataclass
class _Precision:
    param: torch.dtype  # dtype of the base weights
    compute: int  # bytes of matmul outputs (q, k, v, MLP)
    resid: int  # bytes of the residual stream / RMSNorm outputs
    mixed: bool  # autocast: linear inputs and weights cast to 16 bit per use


def _precision(name: str) -> _Precision:
    if name == "32-true":
        return _Precision(torch.float32, 4, 4, False)
    if name == "bf16-true":
        return _Precision(torch.bfloat16, 2, 2, False)
    if name == "16-true":
        return _Precision(torch.float16, 2, 2, False)
    if name in ("bf16-mixed", "16-mixed"):
        return _Precision(torch.float32, 2, 4, True)
    raise LoRAError(f"precision={name!r} is not supported; expected one of {', '.join(PRECISIONS)}.")


__all__ = ["PRECISIONS"]
