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

from lightning_lora.gguf_export._common import (
    MIN_COSINE,
    OUTTYPES,
    SUPPORTED_ARCHITECTURES,
    TOKENIZER_CHECK_TEXT,
    check_outtype,
    gguf_architecture,
    require_gguf,
)
from lightning_lora.gguf_export.adapter import (
    base_gguf_tensors,
    check_adapter_gguf,
    read_adapter_gguf,
    write_adapter_gguf,
)
from lightning_lora.gguf_export.model import (
    CHECK_MESSAGES,
    check_input_ids,
    check_writable,
    load_gguf_model,
    logits_cosine,
    readback_problem,
    reference_logits,
    save_merged_gguf,
    verify_model_gguf,
    write_model_gguf,
)
from lightning_lora.gguf_export.modelfile import (
    ollama_template,
    write_modelfile,
)
from lightning_lora.gguf_export.tensors import (
    TensorPlan,
    llama3_rope_freqs,
    rope_scaling,
    tensor_plan,
)

__all__ = ["CHECK_MESSAGES", "MIN_COSINE", "OUTTYPES", "SUPPORTED_ARCHITECTURES", "TOKENIZER_CHECK_TEXT", "TensorPlan", "base_gguf_tensors", "check_adapter_gguf", "check_input_ids", "check_outtype", "check_writable", "gguf_architecture", "llama3_rope_freqs", "load_gguf_model", "logits_cosine", "ollama_template", "read_adapter_gguf", "readback_problem", "reference_logits", "require_gguf", "rope_scaling", "save_merged_gguf", "tensor_plan", "verify_model_gguf", "write_adapter_gguf", "write_model_gguf", "write_modelfile"]
