"""llama.cpp's tensor names and the value transforms its converter applies (`tensor_plan`), rotary scaling."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_lora.errors import (
    UnsupportedArchitectureError,
)
from lightning_lora.gguf_export._common import (
    _NORM_PLUS_ONE,
    _PERMUTE_QK,
    SUPPORTED_ARCHITECTURES,
    gguf_architecture,
    require_gguf,
)


# ====================================================================== tensor names and transforms
def _permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rows of each head reordered from
    transformers' half-split rotary layout to llama.cpp's interleaved one. transformers'
    `LlamaTensorProcessor._reverse_permute_weights` is its inverse."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _unpermute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The inverse of `_permute_qk` (what transformers applies on load)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@dataclass(frozen=True)
class TensorPlan:
    """How one transformers tensor becomes one GGUF tensor.

    Attributes:
        hf_name: the state-dict key (`model.layers.0.self_attn.q_proj.weight`).
        gguf_name: llama.cpp's name (`blk.0.attn_q.weight`).
        shape: the transformers shape (GGUF lists it reversed).
        permute_heads: `(n_head, n_head_kv)` when llama.cpp permutes the rows (Llama q/k), else None.
        plus_one: llama.cpp stores `1 + w` (Gemma's norms).
    """

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    permute_heads: tuple[int, int | None] | None = None
    plus_one: bool = False

    def to_gguf(self, weights: np.ndarray) -> np.ndarray:
        """The transformers values as llama.cpp stores them.

        Example:
            >>> TensorPlan("a.weight", "a.weight", (2,), plus_one=True).to_gguf(np.zeros(2, np.float32))
            array([1., 1.], dtype=float32)
        """
        if self.permute_heads is not None:
            weights = _permute_qk(weights, *self.permute_heads)
        if self.plus_one:
            weights = weights + np.float32(1.0)
        return weights


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def rope_scaling(config: Any) -> dict[str, Any] | None:
    """The rotary scaling of a config's full-attention layers (`rope_parameters`, or the older
    `rope_scaling`), or None when it is the default (unscaled) rotary embedding.

    Example:
        >>> from transformers import LlamaConfig
        >>> rope_scaling(LlamaConfig()) is None
        True
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope.get("full_attention"), Mapping):
        rope = rope["full_attention"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    return None if kind in (None, "default") else {**rope, "rope_type": kind}


def _rope_problem(config: Any, arch: str) -> str | None:
    scaling = rope_scaling(config)
    if scaling is None or scaling["rope_type"] in ("linear", "yarn") or (
            scaling["rope_type"] == "llama3" and arch == "llama"):
        return None
    return (f"rope_type={scaling['rope_type']!r} rotary scaling is not written (written: linear, yarn, and llama3 for "
            "Llama)")


def llama3_rope_freqs(config: Any) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for Llama 3.1's `rope_type="llama3"`: per rotary frequency, the factor
    it is divided by (1 for high frequencies, `factor` for low ones, blended in between), as its converter
    computes it.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_scaling={
        ...     "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        ...     "original_max_position_embeddings": 64})
        >>> llama3_rope_freqs(cfg)[[0, -1]].tolist()
        [1.0, 8.0]
    """
    rope = rope_scaling(config) or {}
    head_dim = int(_config_value(config, "head_dim", default=config.hidden_size // config.num_attention_heads))
    base = float(rope.get("rope_theta", _config_value(config, "rope_theta", default=10000.0)))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _tied_output_key(model: torch.nn.Module) -> str | None:
    """The state-dict key of the output projection when it is the input embedding (the same tensor, or
    equal values: a merge can leave a tied pair as two copies), else None. A trained untied copy
    (`modules_to_save` on a tied head) is written as `output.weight` even where the config says tied."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return None
    name = next((n for n, m in model.named_modules() if m is outputs), None)
    w_in, w_out = inputs.weight, outputs.weight
    if w_out is w_in:
        tied = True
    elif w_out.is_meta or w_in.is_meta:
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
    else:
        tied = w_out.shape == w_in.shape and (w_out.data_ptr() == w_in.data_ptr() or torch.equal(w_out, w_in))
    return f"{name}.weight" if tied and name is not None else None


def tensor_plan(model: torch.nn.Module) -> list[TensorPlan]:
    """Every tensor a model's GGUF holds: its state-dict key, llama.cpp's name and transform. Works on a
    model on the meta device (names and shapes only). The output projection is left out when it is tied
    to the embedding (llama.cpp then writes no `output.weight`, and readers tie it back).

    Raises:
        UnsupportedArchitectureError: the architecture is not supported, or a tensor has no llama.cpp name.

    Example:
        >>> [p.gguf_name for p in tensor_plan(tiny_llama)][:2]   # doctest: +SKIP
        ['token_embd.weight', 'blk.0.attn_q.weight']
    """
    gguf = require_gguf()
    config = model.config
    arch = gguf_architecture(config)
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    name_map = gguf.get_tensor_name_map(arch_id, int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv = int(_config_value(config, "num_key_value_heads", default=n_head))
    tied_key = _tied_output_key(model)
    plans, unnamed = [], []
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key == tied_key:
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        stem, dot, suffix = key.rpartition(".")
        if suffix not in ("weight", "bias"):
            unnamed.append(key)
            continue
        name = name_map.get_name(stem)
        if name is None:
            unnamed.append(key)
            continue
        gguf_name = f"{name}{dot}{suffix}"
        permute = None
        if arch in _PERMUTE_QK and re.search(r"\.attn_q\.", gguf_name):
            permute = (n_head, n_head)
        elif arch in _PERMUTE_QK and re.search(r"\.attn_k\.", gguf_name):
            permute = (n_head, n_kv)
        plus_one = arch in _NORM_PLUS_ONE and gguf_name.endswith("norm.weight")
        plans.append(TensorPlan(key, gguf_name, tuple(tensor.shape), permute, plus_one))
    if unnamed:
        raise UnsupportedArchitectureError(
            f"{len(unnamed)} tensor(s) of this {config.model_type} model have no llama.cpp name: "
            f"{', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''}; the GGUF would be incomplete"
            f"{' (llama.cpp has no output head apart from the embedding for ' + arch + ')' if 'lm_head.weight' in unnamed else ''}. "
            f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)} (their standard layers).")
    return plans


