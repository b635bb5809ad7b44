"""GGUF for llama.cpp and Ollama: the merged model, a LoRA adapter, and an Ollama `Modelfile`.

Three artifacts, each written atomically (a temporary name in the same directory, then a rename):

- `write_model_gguf`: a merged causal LM as one `.gguf` file with llama.cpp's tensor names
  (`blk.0.attn_q.weight`, ...), its metadata keys (`llama.block_count`, ...) and the tokenizer with its
  chat template (`tokenizer.ggml.*`, `tokenizer.chat_template`), in f32, f16, bf16 or q8_0. llama.cpp's
  value transforms are applied as its converter does (Llama's q/k rows permuted for its rotary layout,
  Gemma's RMSNorm weights stored as `1 + w`), so transformers' GGUF reader, which undoes them, gets the
  model back. `verify_model_gguf` reloads the file with `from_pretrained(dir, gguf_file=...)` and compares
  its logits with the merged model (cosine >= 0.9999; q8_0: >= 0.999) and its tokenizer with the original.
- `write_adapter_gguf`: a PEFT LoRA adapter as llama.cpp's LoRA-adapter GGUF (`general.type = adapter`,
  `adapter.type = lora`, `adapter.lora.alpha`, a `<tensor>.lora_a` / `<tensor>.lora_b` pair per adapted
  base tensor), checked against the base model's GGUF tensor names and shapes (`check_adapter_gguf`).
- `write_modelfile`: an Ollama `Modelfile` next to the model (`FROM`, `TEMPLATE` in Ollama's Go template
  syntax for the chat formats it recognises, `PARAMETER stop` for the end-of-turn tokens).

Supported architectures (`SUPPORTED_ARCHITECTURES`): those transformers' GGUF reader reads back and that
this module maps: Llama, Mistral (written as llama.cpp's `llama`, as llama.cpp does), Qwen2, Qwen3,
Gemma 2, Gemma 3 (text). Anything else is an `UnsupportedArchitectureError` listing them.

Needs the optional `gguf` package (`pip install gguf`); without it a `MissingDependencyError`.

Example:
    >>> from lightning_lora.gguf_export import write_model_gguf, verify_model_gguf
    >>> path = write_model_gguf(model, tokenizer, "out/model.q8_0.gguf", outtype="q8_0")   # doctest: +SKIP
    >>> ids = check_input_ids(tokenizer)                                                   # doctest: +SKIP
    >>> verify_model_gguf(path, reference_logits(model, ids), "q8_0", tokenizer)          # doctest: +SKIP
    'reloads with from_pretrained(gguf_file=...): logits cosine 0.999638 (>= 0.999) on 42 tokens, same tokenizer ...'
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lightning_lora.errors import (
    AdapterFormatError,
    GGUFVerificationError,
    LoRAError,
    MissingDependencyError,
    OutputExistsError,
    UnsupportedAdapterError,
    UnsupportedArchitectureError,
    first_line,
)
from lightning_lora.hub import load_tokenizer, make_serializable
from lightning_lora.layers import LoRALayer
from lightning_lora.peft_format import read_adapter_config
from lightning_lora.surgery import find_network

#: transformers `model_type` -> llama.cpp `general.architecture`
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
#: `--outtype` values -> llama.cpp's `general.file_type` (`gguf.LlamaFileType`)
OUTTYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
#: the minimum cosine between the merged model's logits and the reloaded file's
MIN_COSINE: dict[str, float] = {"f32": 0.9999, "f16": 0.9999, "bf16": 0.9999, "q8_0": 0.999}
#: the text whose token ids must be the same with the original tokenizer and the one read from the file
TOKENIZER_CHECK_TEXT = "Hello world! 1234 <|im_start|> naïve café 🙂\n\tindent"
#: architectures whose q/k projection rows llama.cpp permutes (its rotary embedding pairs adjacent dims)
_PERMUTE_QK = {"llama"}
#: architectures whose RMSNorm weights llama.cpp stores as `1 + w` (Gemma's norm computes `x * (1 + w)`)
_NORM_PLUS_ONE = {"gemma2", "gemma3"}


def require_gguf() -> Any:
    """The `gguf` module, or a `MissingDependencyError` naming the install command.

    Example:
        >>> require_gguf().__name__
        'gguf'
    """
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("Writing GGUF files needs the gguf package, which is not installed; install "
                                     "it with: pip install gguf") from None
    return gguf


def gguf_architecture(config: Any) -> str:
    """llama.cpp's architecture name for a transformers config.

    Raises:
        UnsupportedArchitectureError: the model type is not one of `SUPPORTED_ARCHITECTURES`.

    Example:
        >>> from transformers import MistralConfig
        >>> gguf_architecture(MistralConfig())
        'llama'
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} cannot be written as GGUF; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Merge to a transformers directory instead (--format hf) and "
            "convert it with llama.cpp's convert_hf_to_gguf.py.")
    return SUPPORTED_ARCHITECTURES[model_type]


def check_outtype(outtype: str) -> str:
    """`outtype` when it is one of `OUTTYPES`, else a `LoRAError` naming them.

    Example:
        >>> check_outtype("q8_0")
        'q8_0'
    """
    if outtype not in OUTTYPES:
        raise LoRAError(f"outtype={outtype!r} is not supported; expected one of {', '.join(OUTTYPES)}, e.g. "
                        "outtype='q8_0'.")
    return outtype


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


# ====================================================================== metadata
def _add_hparams(writer: Any, config: Any, arch: str) -> None:
    """The `<arch>.*` keys llama.cpp's converter writes (and transformers' reader maps back)."""
    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(_config_value(config, "head_dim", default=hidden // n_head))
    writer.add_context_length(int(_config_value(config, "max_position_embeddings", default=2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(_config_value(config, "num_key_value_heads", default=n_head)))
    writer.add_layer_norm_rms_eps(float(_config_value(config, "rms_norm_eps", default=1e-6)))
    writer.add_vocab_size(int(config.vocab_size))
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, Mapping) and "full_attention" in rope and isinstance(rope["full_attention"], Mapping):
        rope = rope["full_attention"]
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    theta = theta if theta is not None else _config_value(config, "rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    scaling = rope_scaling(config)
    if scaling is not None and scaling["rope_type"] in ("linear", "yarn"):
        gguf = require_gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(float(scaling.get("factor", 1.0)))
        if scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        window = _config_value(config, "sliding_window")
        if window is not None:
            writer.add_sliding_window(int(window))
        for name, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                          ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            value = getattr(config, name, None)
            if value is not None:
                add(float(value))


# ====================================================================== tokenizer
def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoRAError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; the GGUF needs its "
                        "tokenizer.json. Save the base model's tokenizer with AutoTokenizer (use_fast=True).")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, from its split rule: the name
    transformers' GGUF reader maps to the same regex, GPT-2's plain byte-level rule, or `default`."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    regexes = [r for r in regexes if r]
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    gpt2 = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    if regexes:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_PRE_TOKENIZER_SPLITS,
            )
        except ImportError:  # an older transformers: no table to match against
            GGUF_PRE_TOKENIZER_SPLITS = {}
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == regexes[0]:
                return name
        return "default"
    if gpt2 and digits:
        return "smollm"
    if gpt2:
        return "gpt-2"
    return "default"


def _encodes_with(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """`tokenizer.ggml.*` and `tokenizer.chat_template` from a transformers fast tokenizer (byte-level
    BPE as llama.cpp's `gpt2` model; byte-fallback BPE as its `llama` model)."""
    gguf = require_gguf()
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LoRAError(f"the tokenizer's model is {model.get('type')!r}; GGUF export supports BPE tokenizers "
                        "(byte-level like Llama 3 / Qwen / SmolLM, or byte-fallback like Llama 2 / Mistral / Gemma).")
    spm = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    if max(by_id) >= vocab_size:
        raise LoRAError(f"the tokenizer has token id {max(by_id)}, the model's vocabulary only {vocab_size} rows; "
                        "resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tok))).")
    added = {index: token for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    tokens, types, scores = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            if spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # llama.cpp's byte fallback needs them typed BYTE
                types.append(gguf.TokenType.BYTE)
            elif index == tokenizer.unk_token_id:
                types.append(gguf.TokenType.UNKNOWN if spm else gguf.TokenType.CONTROL)
            elif index in added:
                types.append(gguf.TokenType.CONTROL if (added[index].special or index in special_ids)
                             else gguf.TokenType.USER_DEFINED)
            elif index in special_ids:
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.NORMAL)
        scores.append(-float(index))  # SentencePiece-BPE vocabularies are ordered by merge rank
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else _pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(scores)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(_encodes_with(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_encodes_with(tokenizer, tokenizer.eos_token_id, first=False))
    if spm:
        writer.add_add_space_prefix(True)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template if isinstance(template, str) else
                                 [{"name": k, "template": v} for k, v in template.items()])


def _copy_tokenizer(writer: Any, reference: str | os.PathLike, vocab_size: int) -> None:
    """Copy every `tokenizer.*` key of an existing GGUF of the same base (llama.cpp's own spelling of the
    tokenizer, e.g. the bundled SmolLM2 file's `tokenizer.ggml.pre = smollm`)."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(reference))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        raise LoRAError(f"{reference}: its tokenizer has {0 if tokens is None else len(tokens.data)} tokens, the model "
                        f"{vocab_size}; pass a GGUF of the same base model, or none.")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


# ====================================================================== tensor data
def _encode(weights: np.ndarray, outtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """`(data, raw_dtype)` for `GGUFWriter.add_tensor`: 1-D tensors stay f32 (as llama.cpp keeps them);
    q8_0 rows whose length is not a multiple of 32 fall back to f16."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    qtype = gguf.GGMLQuantizationType
    if weights.ndim < 2 or outtype == "f32":
        return weights, None
    if outtype == "q8_0" and weights.shape[-1] % gguf.GGML_QUANT_SIZES[qtype.Q8_0][0] == 0:
        return gguf.quants.quantize(weights, qtype.Q8_0), qtype.Q8_0
    if outtype == "bf16":
        bits = torch.from_numpy(weights).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits, qtype.BF16
    return weights.astype(np.float16), None


@dataclass
class _AtomicFile:
    """A temporary file next to `target`, renamed onto it by `commit` (removed by `discard`)."""

    target: Path
    tmp: Path

    @classmethod
    def open(cls, target: str | os.PathLike, overwrite: bool) -> _AtomicFile:
        target = Path(target).expanduser().absolute()
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it, or "
                                    "choose another file name.")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        return cls(target, Path(tmp))

    def commit(self) -> Path:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o666 & ~mask)
        os.replace(self.tmp, self.target)
        return self.target

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _write(writer: Any, path: Path) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _model_name(model: torch.nn.Module) -> str:
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "name_or_path", "") or "")
    return Path(name.rstrip("/")).name or f"{model.config.model_type}-merged"


def readback_problem(config: Any) -> str | None:
    """Why transformers' GGUF reader would not rebuild this config from the file (it reads no head size
    for Qwen3 and takes the config class's 128), or None.

    Example:
        >>> from transformers import Qwen3Config
        >>> readback_problem(Qwen3Config(head_dim=128)) is None
        True
    """
    if getattr(config, "model_type", None) == "qwen3" and int(getattr(config, "head_dim", 128) or 128) != 128:
        return (f"head_dim={config.head_dim}: transformers' GGUF reader assumes Qwen3's head_dim 128, so the file "
                "cannot be verified (llama.cpp itself reads attention.key_length)")
    return None


def check_writable(config: Any) -> str:
    """llama.cpp's architecture name for `config` when a verifiable GGUF of it can be written.

    Raises:
        UnsupportedArchitectureError: the architecture is not supported, or transformers' reader would not
            rebuild it (`readback_problem`).

    Example:
        >>> from transformers import Qwen2Config
        >>> check_writable(Qwen2Config())
        'qwen2'
    """
    arch = gguf_architecture(config)
    problem = _rope_problem(config, arch) or readback_problem(config)
    if problem:
        raise UnsupportedArchitectureError(f"cannot write a verifiable GGUF of this model: {problem}.")
    return arch


def write_model_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike, outtype: str = "f16",
                     *, name: str | None = None, tokenizer_gguf: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Write a (merged, LoRA-free) transformers causal LM as one llama.cpp GGUF file, atomically.

    Args:
        model: the causal LM (any dtype; values are converted from float32).
        tokenizer: its transformers fast tokenizer (written as `tokenizer.ggml.*` with its chat template);
            ignored when `tokenizer_gguf` is given.
        path: the `.gguf` file to write.
        outtype: `f32`, `f16`, `bf16` or `q8_0` (1-D tensors stay f32, as llama.cpp keeps them).
        name: `general.name` (default: the model's directory name).
        tokenizer_gguf: an existing GGUF of the same base whose `tokenizer.*` keys are copied verbatim.
        overwrite: replace an existing file.

    Returns:
        The path written.

    Raises:
        UnsupportedArchitectureError: the architecture is not one of `SUPPORTED_ARCHITECTURES`.
        LoRAError: a bad `outtype`, a tokenizer that cannot be written, an existing file without `overwrite`.

    Example:
        >>> write_model_gguf(model, tokenizer, "out/model.f16.gguf")   # doctest: +SKIP
        PosixPath('/abs/out/model.f16.gguf')
    """
    gguf = require_gguf()
    check_outtype(outtype)
    if any(isinstance(m, LoRALayer) for m in model.modules()):
        raise LoRAError("the model still has LoRA adapters; merge them first (merge_and_unload(model)) and write the "
                        "merged model.")
    arch = check_writable(model.config)
    plans = tensor_plan(model)
    state = model.state_dict()
    out = _AtomicFile.open(path, overwrite)
    try:
        writer = gguf.GGUFWriter(None, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        name = name or _model_name(model)
        # transformers' reader takes a file named exactly "mistral" for an architecture gguf-py does not have
        writer.add_name(f"{name}-merged" if name == "mistral" else name)
        _add_hparams(writer, model.config, arch)
        writer.add_file_type(OUTTYPES[outtype])
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_gguf is not None:
            _copy_tokenizer(writer, tokenizer_gguf, int(model.config.vocab_size))
        else:
            _add_tokenizer(writer, tokenizer, int(model.config.vocab_size))
        scaling = rope_scaling(model.config)
        if scaling is not None and scaling["rope_type"] == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(model.config))
        for plan in plans:
            weights = plan.to_gguf(state[plan.hf_name].detach().to("cpu", torch.float32).numpy())
            data, raw_dtype = _encode(weights, outtype, gguf)
            writer.add_tensor(plan.gguf_name, data, raw_dtype=raw_dtype)
        _write(writer, out.tmp)
        return out.commit()
    finally:
        out.discard()


# ====================================================================== verification
def logits_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine similarity of two logits tensors, flattened, in float64.

    Example:
        >>> round(logits_cosine(torch.ones(2, 3), 2 * torch.ones(2, 3)), 6)
        1.0
    """
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


#: the chat the check prompt holds (through the tokenizer's chat template, when it has one)
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def check_input_ids(tokenizer: Any) -> torch.Tensor:
    """The prompt (shape `(1, n)`) on which a GGUF's logits are compared with the merged model's: a short chat
    through the tokenizer's chat template with the generation prompt, or a plain sentence without one. Real
    text, not arbitrary ids: a run of special tokens sends small models into outlier activations where
    q8_0's rounding alone flips the logits (SmolLM2 on ids 1..8: one position at cosine -0.7).

    Example:
        >>> check_input_ids(tokenizer).shape   # doctest: +SKIP
        torch.Size([1, 42])
    """
    ids: Any = None
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True)
        except Exception:  # noqa: BLE001 - a template that needs other roles or fields: use plain text
            ids = None
        if ids is not None and hasattr(ids, "keys"):
            ids = ids["input_ids"]
    if not ids:
        ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


def reference_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The logits of `model` on `tokens`, computed in float32 (a 16-bit model is cast to float32 for the call
    and back, which restores its weights exactly), in eval mode, returned on CPU: what the float32 model read
    back from a GGUF must reproduce.

    Example:
        >>> reference_logits(model, check_input_ids(tokenizer)).shape   # doctest: +SKIP
        torch.Size([1, 42, 49152])
    """
    parameter = next(model.parameters())
    dtype, was_training = parameter.dtype, model.training
    model.eval()
    try:
        if dtype != torch.float32:
            model.to(torch.float32)
        with torch.no_grad():
            return model(tokens.to(parameter.device)).logits.float().cpu()
    finally:
        if dtype != torch.float32:
            model.to(dtype)
        model.train(was_training)


def load_gguf_model(path: str | os.PathLike, rope_parameters: Mapping[str, Any] | None = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` in float32, offline, in eval mode.

    transformers' GGUF reader does not read rotary scaling back (`rope.scaling.*`, `rope_freqs.weight`);
    `rope_parameters` (the merged model's) is then passed to it, so that the comparison covers every other
    tensor and key (the scaling keys themselves are tested against transformers' rotary functions).

    Example:
        >>> load_gguf_model("out/model.f16.gguf").config.model_type   # doctest: +SKIP
        'llama'
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    extra = {} if rope_parameters is None else {"rope_parameters": dict(rope_parameters)}
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True, **extra).eval()


def _check_tokenizer(path: Path, tokenizer: Any) -> str:
    from transformers import AutoTokenizer

    reread = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    for text in (TOKENIZER_CHECK_TEXT, "The quick brown fox jumps over the lazy dog."):
        want, got = tokenizer(text)["input_ids"], reread(text)["input_ids"]
        if want != got:
            raise GGUFVerificationError(f"{path}: the tokenizer read back from the file encodes {text!r} as {got[:12]}, "
                                        f"the model's tokenizer as {want[:12]}.")
    template = getattr(tokenizer, "chat_template", None)
    if template and getattr(reread, "chat_template", None) != template:
        raise GGUFVerificationError(f"{path}: the chat template read back from the file differs from the tokenizer's.")
    return "same tokenizer" + (" and chat template" if template else "")


def verify_model_gguf(path: str | os.PathLike, expected: torch.Tensor, outtype: str, tokenizer: Any = None,
                      tokens: torch.Tensor | None = None, config: Any = None) -> str:
    """Check that a model GGUF reads back with transformers' GGUF loader and computes `expected`.

    Args:
        path: the `.gguf` file.
        expected: the merged model's float32 logits on `tokens` (`reference_logits(model, tokens)`).
        outtype: the file's outtype (sets the threshold, `MIN_COSINE`).
        tokenizer: when given, the tokenizer read back must encode test texts to the same ids and carry
            the same chat template.
        tokens: the input ids (default: `check_input_ids(tokenizer)` with a tokenizer, else 1, 2, ...).
        config: the merged model's config; its rotary scaling, when it has one, is given to the reader
            (`load_gguf_model`).

    Returns:
        What was checked, for the progress line.

    Raises:
        GGUFVerificationError: the file does not reload, or its logits / tokenizer differ.

    Example:
        >>> ids = check_input_ids(tokenizer)                                                  # doctest: +SKIP
        >>> verify_model_gguf("out/model.q8_0.gguf", reference_logits(model, ids), "q8_0", tokenizer)  # doctest: +SKIP
        'reloads with from_pretrained(gguf_file=...): logits cosine 0.999638 (>= 0.999) on 42 tokens, same tokenizer ...'
    """
    path = Path(path)
    rope = None if config is None or rope_scaling(config) is None else config.rope_parameters
    try:
        reloaded = load_gguf_model(path, rope)
    except Exception as err:  # noqa: BLE001 - whatever stops transformers' GGUF loader
        raise GGUFVerificationError(f"{path} does not reload with transformers' GGUF loader ({type(err).__name__}: "
                                    f"{first_line(err)}).") from None
    if tokens is None:
        tokens = check_input_ids(tokenizer) if tokenizer is not None else torch.arange(1, expected.shape[1] + 1)[None]
    got = reference_logits(reloaded, tokens)
    del reloaded
    if got.shape != expected.shape:
        raise GGUFVerificationError(f"{path}: the model read back gives logits of shape {tuple(got.shape)}, the "
                                    f"merged model {tuple(expected.shape)}.")
    cosine = logits_cosine(got, expected)
    if not bool(torch.isfinite(got).all()) or not cosine >= MIN_COSINE[outtype]:
        raise GGUFVerificationError(f"{path}: the model read back computes different logits than the merged model "
                                    f"(cosine {cosine:.6f}, required >= {MIN_COSINE[outtype]} for {outtype}); its "
                                    "tensors or metadata do not match the model.")
    checked = (f"reloads with from_pretrained(gguf_file=...): logits cosine {cosine:.6f} (>= {MIN_COSINE[outtype]}) "
               f"on {expected.shape[1]} tokens")
    if tokenizer is not None:
        checked += ", " + _check_tokenizer(path, tokenizer)
    return checked


def save_merged_gguf(module: torch.nn.Module, path: str | os.PathLike, outtype: str = "f16",
                     overwrite: bool = True) -> str:
    """Write the merged transformers model inside `module` (e.g. a LightningModule after the merge) as a
    verified GGUF with an Ollama `Modelfile` next to it: the file lands under a temporary name, is read
    back with transformers' GGUF loader and compared with the model in memory (float32 logits on
    `check_input_ids`), and only then renamed to `path`. The tokenizer is `module.tokenizer`, else the one
    of the model's `name_or_path`.

    Returns:
        What was checked (the progress line).

    Raises:
        LoRAError: no transformers model or tokenizer in `module`; `UnsupportedArchitectureError`;
            `GGUFVerificationError` (nothing is left at `path`).

    Example:
        >>> save_merged_gguf(pl_module, "runs/model.q8_0.gguf", "q8_0")   # doctest: +SKIP
        'reloads with from_pretrained(gguf_file=...): logits cosine 0.999931 (>= 0.999) on 20 tokens, ...'
    """
    check_outtype(outtype)
    _, network = find_network(module)
    if not hasattr(network, "config"):
        raise LoRAError(f"merged_gguf={str(path)!r} needs a transformers causal LM inside {type(module).__name__}; "
                        "none was found.")
    check_writable(network.config)
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None and getattr(network, "name_or_path", None):
        try:
            tokenizer = load_tokenizer(network.name_or_path)
        except (OSError, ValueError):
            tokenizer = None
    if tokenizer is None:
        raise LoRAError(f"merged_gguf={str(path)!r} needs the model's tokenizer (a GGUF carries it); set "
                        f"`self.tokenizer` on {type(module).__name__} (as lightning_lora.tasks.CausalLM does).")
    make_serializable(network)
    target = Path(path).expanduser().absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; pass overwrite=True to replace it.")
    tokens = check_input_ids(tokenizer)
    expected = reference_logits(network, tokens)
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}.gguf")
    try:
        write_model_gguf(network, tokenizer, scratch, outtype, overwrite=True)
        checked = verify_model_gguf(scratch, expected, outtype, tokenizer, tokens=tokens, config=network.config)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    write_modelfile(target, tokenizer, overwrite=True)
    return checked


# ====================================================================== Ollama Modelfile
#: (marker in the Jinja chat template, Ollama Go template, stop tokens)
_OLLAMA_TEMPLATES: list[tuple[str, str, list[str]]] = [
    ("<|im_start|>",
     "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
     ["<|im_start|>", "<|im_end|>"]),
    ("<|start_header_id|>",
     ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
      "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
     ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("<start_of_turn>",  # Gemma has no system turn: its template puts a system message into a user turn
     ("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
      "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"),
     ["<start_of_turn>", "<end_of_turn>"]),
    ("[INST]",
     ("{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]{{ else if eq .Role "
      "\"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}"),
     ["[INST]", "[/INST]"]),
]


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """Ollama's Go template and stop tokens for a Jinja chat template of a known format (ChatML,
    Llama 3, Gemma, Mistral [INST]); `(None, [])` for another format (Ollama then uses the template it
    detects from the GGUF's `tokenizer.chat_template`).

    Example:
        >>> ollama_template("{{ '<|im_start|>' + m['role'] }}")[1]
        ['<|im_start|>', '<|im_end|>']
    """
    for marker, template, stops in _OLLAMA_TEMPLATES:
        if chat_template and marker in chat_template:
            return template, list(stops)
    return None, []


def _system_prompt(chat_template: str | None) -> str | None:
    """A default system prompt the Jinja template inserts (SmolLM2's), so Ollama's matches it."""
    if not chat_template:
        return None
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}+]+?)<\|im_end\|>", chat_template)
    return found.group(1) if found else None


def write_modelfile(gguf_path: str | os.PathLike, tokenizer: Any = None, chat_template: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write an Ollama `Modelfile` next to `gguf_path` (atomically): `FROM ./<file>`, the chat template
    in Ollama's syntax and `PARAMETER stop` lines (the end-of-turn markers and the tokenizer's eos), so
    `ollama create NAME -f Modelfile` works in that directory as it stands.

    Returns:
        The path of the Modelfile.

    Example:
        >>> write_modelfile("out/model.q8_0.gguf", tokenizer)   # doctest: +SKIP
        PosixPath('/abs/out/Modelfile')
    """
    gguf_path = Path(gguf_path).expanduser().absolute()
    template_text = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template_text, Mapping):
        template_text = template_text.get("default") or next(iter(template_text.values()), None)
    template, stops = ollama_template(template_text)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines = ["# Ollama Modelfile written by lightning-lora; in this directory run: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_path.name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
        system = _system_prompt(template_text)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# chat template: Ollama reads it from the GGUF's tokenizer.chat_template")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    out = _AtomicFile.open(gguf_path.parent / "Modelfile", overwrite)
    try:
        out.tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out.commit()
    finally:
        out.discard()


# ====================================================================== LoRA adapter GGUF
def _peft_pairs(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """`(module name, A, B)` for every adapted module of a PEFT state dict (prefix `base_model.model.`)."""
    prefix = "base_model.model."
    for key in sorted(state_dict):
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = state_dict.get(f"{module}.lora_B.weight")
            if b is None:
                raise AdapterFormatError(f"the adapter has {key} but no {module}.lora_B.weight.")
            yield module.removeprefix(prefix), state_dict[key], b


def base_gguf_tensors(source: torch.nn.Module | str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`{gguf name: transformers-order shape}` of a base model's GGUF: read from a `.gguf` file (its
    tensors' shapes reversed from GGUF's order), or computed from a model (meta device is enough).

    Example:
        >>> base_gguf_tensors(smollm2_gguf_file)["blk.0.attn_k.weight"]   # doctest: +SKIP
        (192, 576)
    """
    if isinstance(source, torch.nn.Module):
        return {plan.gguf_name: plan.shape for plan in tensor_plan(source)}
    reader = require_gguf().GGUFReader(str(source))
    return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def write_adapter_gguf(adapter_dir: str | os.PathLike, path: str | os.PathLike, base: torch.nn.Module,
                       outtype: str = "f32", *, base_gguf: str | os.PathLike | None = None,
                       overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory as llama.cpp's LoRA-adapter GGUF, atomically.

    Each adapted linear layer becomes `<base tensor>.lora_a` (A, `r x in`) and `<base tensor>.lora_b`
    (B, `out x r`) named after the base model's GGUF tensor (`blk.0.attn_q.weight.lora_a`); llama.cpp's
    row permutation of Llama's q/k applies to B. llama.cpp scales each pair by `alpha / r`
    (`adapter.lora.alpha`, r from the tensor's shape); a layer whose scale differs (rsLoRA,
    `rank_pattern`/`alpha_pattern`) has the ratio folded into its B.

    Args:
        adapter_dir: a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
        path: the `.gguf` file to write.
        base: the base model (meta device is enough): its architecture, head counts and tensor names.
        outtype: `f32`, `f16` or `bf16` for A and B.
        base_gguf: an existing GGUF of the base; every pair is checked against its tensor names and shapes.
        overwrite: replace an existing file.

    Raises:
        UnsupportedAdapterError: DoRA, `modules_to_save`, or an adapter on a layer that is not a base GGUF tensor.

    Example:
        >>> write_adapter_gguf("out/adapter", "out/adapter.gguf", meta_model("smollm2-135m-instruct"))  # doctest: +SKIP
        PosixPath('/abs/out/adapter.gguf')
    """
    gguf = require_gguf()
    if outtype not in ("f32", "f16", "bf16"):
        raise LoRAError(f"outtype={outtype!r} is not supported for a LoRA adapter; expected f32, f16 or bf16.")
    arch = gguf_architecture(base.config)
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("use_dora"):
        raise UnsupportedAdapterError(f"{adapter_dir} is a DoRA adapter; llama.cpp's LoRA GGUF holds plain LoRA. "
                                      "Merge it instead: lightning-lora merge --format gguf.")
    if cfg.get("modules_to_save"):
        raise UnsupportedAdapterError(f"{adapter_dir} saves whole modules ({', '.join(cfg['modules_to_save'])}), which "
                                      "llama.cpp's LoRA GGUF cannot carry; merge it instead: lightning-lora merge "
                                      "--format gguf.")
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"), device="cpu")
    plans = {plan.hf_name: plan for plan in tensor_plan(base)}
    reference = base_gguf_tensors(base_gguf) if base_gguf is not None else None
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    extra = [k for k in state if ".lora_A." not in k and ".lora_B." not in k]
    if extra:
        raise UnsupportedAdapterError(f"{adapter_dir} holds tensors other than linear lora_A/lora_B pairs "
                                      f"({', '.join(extra[:3])}: embedding adapters or saved modules); llama.cpp's "
                                      "LoRA GGUF carries lora_a/lora_b pairs of linear layers only. Merge it instead: "
                                      "lightning-lora merge --format gguf.")
    out = _AtomicFile.open(path, overwrite)
    try:
        writer = gguf.GGUFWriter(None, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(str(adapter_dir)).name)
        writer.add_file_type(OUTTYPES[outtype])
        count = 0
        for module, a, b in _peft_pairs(state):
            plan = plans.get(f"{module}.weight")
            if plan is None:
                raise UnsupportedAdapterError(f"{adapter_dir}: {module} has an adapter but {module}.weight is not a "
                                              f"tensor of the base model's GGUF ({arch}); llama.cpp adapts the base "
                                              "GGUF's linear tensors (attention and MLP projections) only.")
            if len(plan.shape) != 2 or a.ndim != 2 or (b.shape[0], a.shape[1]) != plan.shape:
                raise AdapterFormatError(f"{adapter_dir}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, the "
                                         f"base tensor {plan.gguf_name} is {plan.shape}; the adapter was trained on "
                                         "another base model.")
            if reference is not None and reference.get(plan.gguf_name) != plan.shape:
                raise AdapterFormatError(f"{base_gguf}: has {plan.gguf_name} of shape {reference.get(plan.gguf_name)}, "
                                         f"the adapter needs {plan.shape}; pass the GGUF of the adapter's base model.")
            rank = a.shape[0]
            layer_r = _pattern_value(ranks, module, r)
            scale = _pattern_value(alphas, module, alpha) / (math.sqrt(layer_r) if cfg.get("use_rslora") else layer_r)
            b_np = b.detach().float().numpy() * np.float32(scale / (alpha / rank))
            if plan.permute_heads is not None:
                b_np = _permute_qk(b_np, *plan.permute_heads)
            for suffix, values in (("lora_a", a.detach().float().numpy()), ("lora_b", b_np)):
                data, raw_dtype = _encode(values, outtype, gguf)
                writer.add_tensor(f"{plan.gguf_name}.{suffix}", data, raw_dtype=raw_dtype)
            count += 1
        if count == 0:
            raise AdapterFormatError(f"{adapter_dir} holds no lora_A/lora_B pair; nothing to write.")
        _write(writer, out.tmp)
        return out.commit()
    finally:
        out.discard()


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key that matches the end of `module`."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return type(default)(value)
    return default


def read_adapter_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`(metadata, {tensor name: float32 array in numpy/transformers order})` of a LoRA-adapter GGUF.

    Example:
        >>> meta, tensors = read_adapter_gguf("out/adapter.gguf")   # doctest: +SKIP
        >>> meta["adapter.type"]                                    # doctest: +SKIP
        'lora'
    """
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = np.array(values, dtype=np.float32, copy=True).reshape(
            tuple(int(n) for n in reversed(tensor.shape.tolist())))
    return meta, tensors


def check_adapter_gguf(path: str | os.PathLike, adapter_dir: str | os.PathLike, base: torch.nn.Module,
                       base_gguf: str | os.PathLike | None = None) -> str:
    """Check a LoRA-adapter GGUF against the PEFT adapter it was written from and the base model's GGUF
    tensors: its metadata, one `lora_a`/`lora_b` pair per adapted layer named after a base tensor with
    matching shapes (`lora_a`: `r x in`, `lora_b`: `out x r`), and for every layer the delta llama.cpp
    applies (`alpha / r * B A`, rows un-permuted as transformers does) equal to PEFT's.

    Returns:
        What was checked, for the progress line.

    Raises:
        GGUFVerificationError: the file differs (the message says how).

    Example:
        >>> check_adapter_gguf("out/adapter.gguf", "out/adapter", meta_model("smollm2-135m-instruct"))  # doctest: +SKIP
        'a lora_a/lora_b pair for each of the 60 adapted layers, named and shaped as the base GGUF's tensors'
    """
    meta, tensors = read_adapter_gguf(path)
    expected_meta = {"general.type": "adapter", "adapter.type": "lora",
                     "general.architecture": gguf_architecture(base.config)}
    for key, value in expected_meta.items():
        if meta.get(key) != value:
            raise GGUFVerificationError(f"{path}: {key} is {meta.get(key)!r}, expected {value!r}.")
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    reference = base_gguf_tensors(base_gguf if base_gguf is not None else base)
    plans = {plan.gguf_name: plan for plan in tensor_plan(base)}
    cfg = read_adapter_config(adapter_dir)
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"), device="cpu")
    r, cfg_alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    expected = {}
    for module, a, b in _peft_pairs(state):
        rank = _pattern_value(cfg.get("rank_pattern") or {}, module, r)
        scale = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg_alpha) / (
            math.sqrt(rank) if cfg.get("use_rslora") else rank)
        expected[f"{module}.weight"] = scale * (b.double() @ a.double())
    names = {name.rsplit(".", 1)[0] for name in tensors}
    if len(tensors) != 2 * len(names) or len(names) != len(expected):
        raise GGUFVerificationError(f"{path}: {len(tensors)} tensors for {len(names)} layers; expected one lora_a/lora_b "
                                    f"pair for each of the adapter's {len(expected)} layers.")
    for name in sorted(names):
        if name not in reference:
            raise GGUFVerificationError(f"{path}: {name} is not a tensor of the base model's GGUF.")
        a, b = tensors.get(f"{name}.lora_a"), tensors.get(f"{name}.lora_b")
        out_features, in_features = reference[name]
        if a is None or b is None or a.shape[1] != in_features or b.shape[0] != out_features \
                or a.shape[0] != b.shape[1]:
            raise GGUFVerificationError(f"{path}: {name}.lora_a/.lora_b have shapes "
                                        f"{None if a is None else a.shape} / {None if b is None else b.shape}, the base "
                                        f"tensor {reference[name]}.")
        plan = plans[name]
        if plan.permute_heads is not None:
            b = _unpermute_qk(b, *plan.permute_heads)
        delta = (alpha / a.shape[0]) * (torch.from_numpy(b).double() @ torch.from_numpy(a).double())
        want = expected.get(plan.hf_name)
        tol = 1e-5 if meta.get("general.file_type") == 0 else 1e-2
        if want is None or not torch.allclose(delta, want, rtol=tol, atol=tol * float(want.abs().max() + 1e-12)):
            raise GGUFVerificationError(f"{path}: the update llama.cpp applies for {name} differs from the adapter's "
                                        f"{plan.hf_name.removesuffix('.weight')}.")
    return (f"a lora_a/lora_b pair for each of the {len(names)} adapted layers, named and shaped as the base GGUF's "
            "tensors, each giving the adapter's update")


__all__ = [
    "CHECK_MESSAGES",
    "MIN_COSINE",
    "OUTTYPES",
    "SUPPORTED_ARCHITECTURES",
    "GGUFVerificationError",
    "TensorPlan",
    "UnsupportedArchitectureError",
    "base_gguf_tensors",
    "check_adapter_gguf",
    "check_input_ids",
    "check_outtype",
    "check_writable",
    "gguf_architecture",
    "llama3_rope_freqs",
    "load_gguf_model",
    "logits_cosine",
    "ollama_template",
    "read_adapter_gguf",
    "readback_problem",
    "reference_logits",
    "require_gguf",
    "rope_scaling",
    "save_merged_gguf",
    "tensor_plan",
    "verify_model_gguf",
    "write_adapter_gguf",
    "write_model_gguf",
    "write_modelfile",
]

