"""Adapter checkpoints of a sharded model: the saved keys as sharded DTensors or gathered full tensors
(the base is never gathered), the PEFT adapter and the merged model written from rank 0, and adapter-only
distributed checkpoints loaded into a sharded model or consolidated into one `.ckpt` file. Torch only.

Example:
    >>> from torch import nn
    >>> from lightning_lora import LoRAConfig, inject_lora
    >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
    >>> sorted(gather_adapters(m))
    ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.checkpoint import SHARDED_METADATA, check_checkpoint_config, read_sharded_checkpoint
from lightning_lora.errors import LoRAError
from lightning_lora.fsdp._dist import clean_name, full_tensor, is_fsdp1, local_tensor, rank
from lightning_lora.fsdp.fsdp1 import fsdp1_adapter_state_dict
from lightning_lora.hub import save_pretrained
from lightning_lora.peft_format.save import _write_peft_dir, to_peft
from lightning_lora.surgery import find_network, get_lora_config, is_lora_key, lora_layers, saved_keys


def adapter_state_dict(module: nn.Module, *, full: bool = True, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The saved keys of `module` (adapters, trained biases / `modules_to_save`, carried embeddings),
    as its state-dict keys.

    Args:
        module: an injected module, sharded or not.
        full: all-gather each sharded tensor (a collective: call on every rank) and move it to CPU;
            with False the sharded DTensors are returned as they are (for a distributed checkpoint).
        rank0_only: with `full`, ranks other than 0 get an empty dict (they still take part in the gathers).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> sorted(adapter_state_dict(m))
        ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']
    """
    if full and is_fsdp1(module):  # FSDP1: gather the adapter units alone (a plain state_dict gathers everything)
        return fsdp1_adapter_state_dict(module, rank0_only=rank0_only)
    state = {clean_name(k): v for k, v in module.state_dict().items()}
    keep = rank() == 0 or not rank0_only
    out: dict[str, torch.Tensor] = {}
    for key in saved_keys(module):
        if key not in state:
            continue
        value = state[key]
        if not full:
            out[key] = value
            continue
        value = full_tensor(value).detach()
        if keep:
            out[key] = value.to("cpu", copy=True)
    return out


def gather_adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's copy of the full adapter tensors (CPU), gathered from the shards; the base is not gathered.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> [tuple(v.shape) for v in gather_adapters(m).values()]
        [(2, 4), (4, 2)]
    """
    return adapter_state_dict(module, full=True, rank0_only=False)


def write_adapter(module: nn.Module, directory: str | os.PathLike,
                  adapter_state: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Gather the adapters of a sharded `module` and write them as a PEFT adapter on rank 0 (every rank
    must call it). Returns the directory on rank 0, None elsewhere.

    Args:
        module: the sharded module (FSDP2), or any injected module.
        directory: output directory (written atomically, replaced if it exists).
        adapter_state: the full adapter tensors when already gathered (FSDP1: `fsdp1_adapter_state_dict`).

    Example:
        >>> write_adapter(pl_module, "out/adapter")   # doctest: +SKIP
        PosixPath('out/adapter')
    """
    state = adapter_state_dict(module, full=True) if adapter_state is None else adapter_state
    if rank() != 0:
        return None
    tensors, cfg = to_peft(module, adapter_state=state)
    return _write_peft_dir(directory, tensors, cfg, overwrite=True)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_merged(module: nn.Module, directory: str | os.PathLike, headroom: float = 1.25) -> str:
    """Write the merged model of a sharded `module` from rank 0 when it fits in rank 0's memory.

    Every rank must call it. The base is gathered one tensor at a time into rank 0's CPU memory (the
    other ranks keep nothing), each adapted weight gets `scaling * B @ A` (float32, written in the
    weight's dtype), and rank 0 writes the transformers model with `save_pretrained`. When
    `headroom * model bytes` exceeds rank 0's available memory nothing is gathered.

    Returns:
        `"written"` or the reason it was not (`"too large: ..."`, `"not a transformers model"`).

    Example:
        >>> write_merged(pl_module, "out/merged")   # doctest: +SKIP
        'written'
    """
    _, network = find_network(module)
    if not hasattr(network, "save_pretrained") or not hasattr(network, "config"):
        return "not a transformers model"
    need = sum(p.numel() * p.element_size() for p in network.parameters())
    decision = torch.zeros(1)
    if rank() == 0:
        avail = _available_memory()
        decision[0] = 1.0 if avail is None or need * headroom <= avail else 0.0
        free = "unknown" if avail is None else f"{avail / 2**30:.1f} GiB"
    if torch.distributed.is_initialized():  # on the parameters' device: NCCL takes only CUDA tensors
        device = next((local_tensor(p).device for p in network.parameters()), torch.device("cpu"))
        decision = decision.to(device)
        torch.distributed.broadcast(decision, src=0)
        decision = decision.cpu()
    if decision[0] < 0.5:
        return f"too large: the merged model needs {need / 2**30:.1f} GiB on rank 0" + (
            f", {free} available" if rank() == 0 else "")
    layers = {name: layer for name, layer in lora_layers(network)}
    state = network.state_dict()
    merged: dict[str, torch.Tensor] = {}
    keep = rank() == 0
    for key, value in state.items():
        if is_lora_key(key):
            continue
        owner, _, pname = key.rpartition(".")
        tensor = full_tensor(value).detach()
        layer = layers.get(owner)
        if layer is not None and pname == "weight":
            a, b = full_tensor(layer.lora_A.weight).detach(), full_tensor(layer.lora_B.weight).detach()
            if keep:
                delta = type(layer).delta_from(a, b, layer.scaling)
                tensor = (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)
        if keep:
            merged[key] = tensor.to("cpu", copy=True)
    if not keep:
        return "written"
    with torch.device("meta"):
        plain = type(network)._from_config(network.config, dtype=next(iter(merged.values())).dtype) \
            if hasattr(type(network), "_from_config") else type(network)(network.config)
    plain.load_state_dict(merged, strict=False, assign=True)
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    if missing:  # tied weights share storage: re-tie rather than leave meta tensors
        plain.tie_weights()
    plain.name_or_path = getattr(network, "name_or_path", "")
    save_pretrained(plain, directory)
    return "written"


def load_sharded_adapters(path: str | os.PathLike, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = (),
                          weights_only: bool | None = None) -> dict[str, Any]:
    """Load an adapter-only distributed checkpoint directory into a sharded `module` (and `optimizers`),
    on every rank; returns the checkpoint's metadata (everything but tensors), as Lightning expects.

    Raises:
        LoRAError: the checkpoint has no LoRA section, another LoRA config, or lacks adapter keys.

    Example:
        >>> meta = load_sharded_adapters("ckpts/last.ckpt", pl_module, trainer.optimizers)   # doctest: +SKIP
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    metadata = torch.load(path / SHARDED_METADATA, weights_only=weights_only)
    check_checkpoint_config(metadata, get_lora_config(module), str(path))
    state = {"state_dict": adapter_state_dict(module, full=False)}
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in state["state_dict"] if f"state_dict.{k}" not in stored]
    if missing:
        raise LoRAError(f"{path} does not hold the adapters this model expects: missing adapter keys "
                        f"({len(missing)}): {', '.join(missing[:6])}. Was it written by a run with the same LoRA "
                        "config?")
    dcp.load(state, checkpoint_id=str(path))
    module.load_state_dict(state["state_dict"], strict=False)
    for idx, optimizer in enumerate(optimizers):
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        key = f"optimizer_{idx}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optim_state, checkpoint_id=str(path))
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return metadata


def consolidate_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn an adapter-only distributed checkpoint directory into one adapter-only `.ckpt` file (in one
    process, no process group), which `lightning-lora export` and `read_checkpoint` take.

    Example:
        >>> consolidate_checkpoint("ckpts/last.ckpt", "last-adapter.ckpt")   # doctest: +SKIP
        PosixPath('last-adapter.ckpt')
    """
    ckpt = read_sharded_checkpoint(path)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


__all__ = ["adapter_state_dict", "consolidate_checkpoint", "gather_adapters", "load_sharded_adapters",
           "write_adapter", "write_merged"]
