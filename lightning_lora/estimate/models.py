"""Model resolution for the estimate: a name, alias, model directory or config -> a `meta`-device model.

No weight is downloaded or allocated: the shipped `model_configs/*.json`, the user's `config.json`,
or a hub id's `config.json` (fetched alone with `hf_hub_download` into the Hugging Face cache on first
use; `org/name@revision`, `HF_TOKEN` and `HF_HUB_OFFLINE=1` respected) is read with transformers'
`AutoConfig`, and the model is built on the `meta` device, so every parameter has its real shape and
dtype but no storage.

Example:
    >>> from lightning_lora.estimate.models import build_meta_model, load_model_config
    >>> name, config = load_model_config("meta-llama/Meta-Llama-3-70B")
    >>> name, config.num_hidden_layers, build_meta_model(config).lm_head.weight.device.type
    ('llama-3-70b', 80, 'meta')
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from lightning_lora.errors import LoRAError, ModelNotFoundError
from lightning_lora.hub import BUNDLED_MODELS, hub_config_file, is_hub_id, resolve_model, split_revision

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
#: Hugging Face ids accepted for the shipped configs (lower case).
ALIASES = {
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "mistralai/mistral-7b-v0.3": "mistral-7b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
}


class UnknownModelError(LoRAError):
    """A `--model` that is neither a shipped name, a model directory, a config.json file nor a hub id.

    Example:
        >>> issubclass(UnknownModelError, ValueError)
        True
    """


def known_models() -> list[str]:
    """Names `--model` accepts without the Hub: the shipped configs and the bundled SmolLM2-Instruct.

    Example:
        >>> "llama-3-8b" in known_models() and "llama-3-70b" in known_models()
        True
    """
    return sorted({p.stem for p in CONFIG_DIR.glob("*.json")} | set(BUNDLED_MODELS))


def _read_config(path: Path, text: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise UnknownModelError(f"{text!r} is not a transformers config.json ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from None


def load_model_config(model: Any) -> tuple[str, Any]:
    """`(display name, transformers config)` for a shipped name, a directory, a config.json or a config.

    Names are case-insensitive: the shipped configs (`llama-3-8b`, `llama-3-70b`, `llama-3.2-1b`,
    `mistral-7b` = Mistral-7B-v0.3, `qwen2.5-7b`, `smollm2-135m`), their Hugging Face ids, and the
    bundled `smollm2-135m-instruct` (its converted directory from `hub.resolve_model`; config only).
    Any other hub id (`org/name`, `org/name@revision`) reads its `config.json` with `hub.hub_config_file`
    (cached, or downloaded alone: never the weights).

    Raises:
        UnknownModelError: a path that does not exist or is not a config, or a name of no known form.
        ModelNotFoundError: a hub id whose config.json cannot be had (offline and not cached, gated, unknown).

    Example:
        >>> name, cfg = load_model_config("Llama-3-8B")
        >>> name, cfg.hidden_size, cfg.num_key_value_heads
        ('llama-3-8b', 4096, 8)
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return getattr(model, "name_or_path", "") or model.model_type, copy.deepcopy(model)
    if isinstance(model, dict):
        data = dict(model)
        try:
            return data.get("_name_or_path") or data.get("model_type", "model"), AutoConfig.for_model(**data)
        except (ValueError, KeyError) as err:
            raise UnknownModelError(f"the config dict is not a transformers config ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200] if str(err) else ''}); it needs a "
                                    "'model_type' such as 'llama'.") from None
    text = str(model)
    key = ALIASES.get(text.lower(), text.lower())
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{text!r} is a directory without a config.json; pass a transformers model "
                                    "directory or the path of its config.json.")
        return path.name, _read_config(path, text)
    if path.is_file():
        return path.parent.name if path.name == "config.json" else path.stem, _read_config(path, text)
    shipped = CONFIG_DIR / f"{key}.json"
    if shipped.is_file():
        return key, AutoConfig.from_pretrained(str(shipped))
    if key in BUNDLED_MODELS:
        try:
            return key, AutoConfig.from_pretrained(resolve_model(key))
        except ModelNotFoundError:  # same shapes as the base model's shipped config
            return key, AutoConfig.from_pretrained(str(CONFIG_DIR / "smollm2-135m.json"))
    looks_like_path = text.endswith(".json") or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path:
        raise UnknownModelError(f"{text!r} does not exist; pass a model directory, a config.json path, or one of "
                                f"the known names: {', '.join(known_models())}.")
    if is_hub_id(text) and "/" in text:
        repo, revision = split_revision(text)
        return text, _read_config(Path(hub_config_file(repo, revision)), text)
    raise UnknownModelError(f"unknown model {text!r}; known names: {', '.join(known_models())} "
                            "(or pass a hub id such as meta-llama/Llama-3.2-1B, a model directory or a config.json "
                            "path).")


def build_meta_model(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_config(config)` on the `meta` device: shapes only, no memory.

    Raises:
        UnknownModelError: the config is not one of a causal language model.

    Example:
        >>> _, cfg = load_model_config("smollm2-135m")
        >>> build_meta_model(cfg).lm_head.weight.device.type
        'meta'
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    except ValueError as err:  # e.g. "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise UnknownModelError(f"cannot build a causal language model from this config "
                                f"({getattr(config, 'model_type', '?')}): {str(err).splitlines()[0][:200]}; "
                                "the estimate needs a decoder-only (Llama-style) model.") from None


__all__ = ["ALIASES", "CONFIG_DIR", "UnknownModelError", "build_meta_model", "known_models", "load_model_config"]
