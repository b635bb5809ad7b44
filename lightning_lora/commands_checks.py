"""What `lightning-lora export` and `merge` check before an output lands: it is usable as it claims.

An exported PEFT adapter must load onto the base model its `adapter_config.json` names and onto the
checkpoint's own layer shapes, and hold exactly the checkpoint's tensors (`verify_export`); a merged model
must reload with `AutoModelForCausalLM.from_pretrained` and compute the logits of the merged model in
memory (`merged_logits`, `verify_merged`). A failed check is a `CommandError` with one line.

Example:
    >>> from lightning_lora.commands_checks import verify_export
    >>> verify_export("out/adapter", "last.ckpt")   # doctest: +SKIP
    'loads onto the architecture of smollm2-135m-instruct and holds the checkpoint's 180 tensors'
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_lora.command_line import one_line
from lightning_lora.errors import AdapterFormatError, CommandError, LoRAError
from lightning_lora.hub import meta_model, parse_dtype
from lightning_lora.peft_format import load_adapter, read_adapter_config, read_checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: token ids fed to a merged model and to its reloaded copy to compare their logits
CHECK_TOKENS = 8
#: longest message of another library kept in one of ours (our own key lists name 3 keys: `errors.listed`)
MESSAGE_LIMIT = 600


def _first_line(err: BaseException) -> str:
    """`cli.one_line`, cut at `MESSAGE_LIMIT` characters (another library's message can be long)."""
    text = one_line(err)
    return text[:MESSAGE_LIMIT] + ("..." if len(text) > MESSAGE_LIMIT else "")


def _fingerprints(tensors: dict[str, Any]) -> list[tuple[tuple[int, ...], str, str]]:
    """(shape, dtype, sha256 of the bytes) of every tensor, sorted: the content without the key names."""
    out = []
    for tensor in tensors.values():
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append((tuple(tensor.shape), str(tensor.dtype), hashlib.sha256(raw).hexdigest()))
    return sorted(out)


def _skeleton(state_dict: dict[str, Any]) -> Any:
    """A module tree on the meta device with exactly the modules and parameters an adapter-only state
    dict names: a Linear for each adapted module (`<m>.lora_A.weight` / `<m>.lora_B.weight` give its
    in and out features), and the saved parameters of other modules (`modules_to_save`, biases)."""
    root = nn.Module()

    def module_at(name: str, factory: Any) -> nn.Module:
        parent = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if not hasattr(parent, parts[-1]):
            parent.add_module(parts[-1], factory())
        return getattr(parent, parts[-1])

    adapted = sorted(k[: -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight"))
    for name in adapted:
        a, b = state_dict[f"{name}.lora_A.weight"], state_dict.get(f"{name}.lora_B.weight")
        if b is None:
            raise AdapterFormatError(f"The checkpoint has {name}.lora_A.weight but no {name}.lora_B.weight.")
        bias = f"{name}.bias" in state_dict
        module_at(name, lambda a=a, b=b, bias=bias: nn.Linear(a.shape[1], b.shape[0], bias=bias, device="meta"))
    for key, value in state_dict.items():
        owner, _, param = key.rpartition(".")
        if ".lora_" in key or (owner in adapted and param == "bias"):
            continue
        module = module_at(owner, nn.Module) if owner else root
        if param not in dict(module.named_parameters(recurse=False)):
            module.register_parameter(param, nn.Parameter(torch.empty(value.shape, device="meta")))
    return root


def verify_export(directory: str | os.PathLike, ckpt_path: str | os.PathLike, shown_as: str | None = None) -> str:
    """Check that a PEFT adapter directory exported from `ckpt_path` is usable as claimed.

    The directory must load (strictly: every key, every shape) onto the base model its
    `adapter_config.json` names, built on the meta device when its config.json is available (local,
    cached or fetched); it must
    also load onto a module tree built from the checkpoint's own keys and shapes, and hold exactly
    the checkpoint's tensors (same shapes, dtypes and bytes).

    Args:
        directory: the PEFT adapter directory (e.g. the temporary one before its rename).
        ckpt_path: the checkpoint it was exported from.
        shown_as: the name of `directory` in error messages (the final output directory).

    Returns:
        What was checked, for the progress line.

    Raises:
        CommandError: the directory does not load or differs from the checkpoint (the message says how).

    Example:
        >>> verify_export("out/adapter", "last.ckpt")   # doctest: +SKIP
        'loads onto the architecture of smollm2-135m-instruct and holds the checkpoint's 180 tensors'
    """
    directory = Path(directory)
    ckpt = read_checkpoint(ckpt_path)

    def reason(err: BaseException) -> str:
        text = _first_line(err)
        return text if shown_as is None else text.replace(str(directory), shown_as)

    try:
        cfg = read_adapter_config(directory)
        base = cfg.get("base_model_name_or_path") or None
        network = None if base is None else meta_model(str(base), cfg.get("task_type") or ckpt.task_type)
        if network is not None:
            try:
                load_adapter(network, directory)
            except LoRAError as err:
                raise CommandError(f"the exported adapter does not load onto {base}, the base model its "
                                   f"adapter_config.json names: {reason(err)} Pass --base-model naming the "
                                   "model the adapter was trained on.") from None
        load_adapter(_skeleton(ckpt.state_dict), directory)
        written = load_file(str(directory / ADAPTER_WEIGHTS), device="cpu")
    except CommandError:
        raise
    except LoRAError as err:
        raise CommandError(f"the exported adapter does not hold the checkpoint's adapters: {reason(err)}") from None
    if _fingerprints(written) != _fingerprints(ckpt.state_dict):
        raise CommandError(f"the exported adapter's {len(written)} tensors differ from the checkpoint's "
                           f"{len(ckpt.state_dict)} (shapes, dtypes or values).")
    onto = f"the architecture of {base}" if network is not None else (
        "the checkpoint's layer shapes" + ("" if base is None else f" ({base}'s config.json is not available here)"))
    return f"loads onto {onto} and holds the checkpoint's {len(written)} tensors"


def _check_tokens(model: Any) -> Any:
    """Token ids 1, 2, ... (at most `CHECK_TOKENS`, all inside the vocabulary), shape (1, n)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    n = max(1, min(CHECK_TOKENS, vocab - 1))
    return torch.arange(1, n + 1, device=next(model.parameters()).device).unsqueeze(0)


def merged_logits(model: Any) -> Any:
    """The float32 logits of a causal LM on `CHECK_TOKENS` fixed token ids (1, 2, ...).

    Example:
        >>> merged_logits(model).shape   # doctest: +SKIP
        torch.Size([1, 8, 49152])
    """
    with torch.no_grad():
        return model(_check_tokens(model)).logits.float().cpu()


def verify_merged(directory: str | os.PathLike, expected: Any, dtype: str, tokenizer: bool = False) -> str:
    """Check that a merged model directory reloads with `AutoModelForCausalLM.from_pretrained` (no LoRA
    code) and computes `expected` (the merged model's `merged_logits` before saving); with
    `tokenizer`, that its tokenizer reloads too.

    Returns:
        What was checked, for the progress line.

    Raises:
        CommandError: the directory does not reload, or its logits differ (the message says by how much).

    Example:
        >>> verify_merged("out/merged", merged_logits(model), "fp32")   # doctest: +SKIP
        'reloads with AutoModelForCausalLM.from_pretrained and gives the same logits on 8 tokens'
    """
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=parse_dtype(dtype),
                                                        local_files_only=True).eval()
        if tokenizer:
            AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...: whatever stops the reload
        raise CommandError(f"the merged model written does not reload with from_pretrained ({type(err).__name__}: "
                           f"{_first_line(err)}).") from None
    got = merged_logits(reloaded)
    del reloaded
    if got.shape != expected.shape:
        raise CommandError(f"the merged model reloaded from disk gives logits of shape {tuple(got.shape)}, the merged "
                           f"model in memory {tuple(expected.shape)}.")
    tol = (1e-4 if dtype == "fp32" else 1e-2) * (1.0 + float(expected.abs().max()))
    diff = float((got - expected).abs().max())
    if not diff <= tol:
        raise CommandError(f"the merged model reloaded from disk computes different logits than the merged model in "
                           f"memory (max difference {diff:.3g} on {expected.shape[1]} tokens, allowed {tol:.3g}); "
                           "its saved weights or config do not match the merge.")
    return f"reloads with AutoModelForCausalLM.from_pretrained and gives the same logits on {expected.shape[1]} tokens"

__all__ = ["merged_logits", "verify_export", "verify_merged"]
