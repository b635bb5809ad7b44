"""GGUF metadata: the hyper-parameters and the tokenizer (vocabulary, merges, special tokens, chat template)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from lightning_lora.errors import (
    LoRAError,
)
from lightning_lora.gguf_export._common import (
    require_gguf,
)
from lightning_lora.gguf_export.tensors import (
    _config_value,
    rope_scaling,
)


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


