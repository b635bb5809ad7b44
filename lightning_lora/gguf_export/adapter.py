"""llama.cpp's LoRA-adapter GGUF from a PEFT adapter (`write_adapter_gguf`), checked against the base GGUF (`check_adapter_gguf`)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lightning_lora.errors import (
    AdapterFormatError,
    GGUFVerificationError,
    LoRAError,
    UnsupportedAdapterError,
)
from lightning_lora.gguf_export._common import (
    OUTTYPES,
    gguf_architecture,
    require_gguf,
)
from lightning_lora.gguf_export.model import (
    _AtomicFile,
    _encode,
    _write,
)
from lightning_lora.gguf_export.tensors import (
    _permute_qk,
    _unpermute_qk,
    tensor_plan,
)
from lightning_lora.peft_format import read_adapter_config


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
