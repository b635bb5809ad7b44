"""The merged model as one GGUF file (`write_model_gguf`), read back and compared (`verify_model_gguf`), and the callback's `save_merged_gguf`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_lora.errors import (
    GGUFVerificationError,
    LoRAError,
    OutputExistsError,
    UnsupportedArchitectureError,
    first_line,
)
from lightning_lora.gguf_export._common import (
    MIN_COSINE,
    OUTTYPES,
    TOKENIZER_CHECK_TEXT,
    _AtomicFile,
    check_outtype,
    gguf_architecture,
    require_gguf,
)
from lightning_lora.gguf_export.metadata import (
    _add_hparams,
    _add_tokenizer,
    _copy_tokenizer,
)
from lightning_lora.gguf_export.modelfile import write_modelfile
from lightning_lora.gguf_export.tensors import (
    _rope_problem,
    llama3_rope_freqs,
    rope_scaling,
    tensor_plan,
)
from lightning_lora.hub import load_tokenizer, make_serializable
from lightning_lora.layers import LoRALayer
from lightning_lora.surgery import find_network


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


