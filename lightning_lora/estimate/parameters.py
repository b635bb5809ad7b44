"""Parameters per rank as the memory model sees them: weights, gradients, optimizer state, 4-bit and DoRA extras.

`_inventory` lists every parameter of a (meta-device) model once, with its FSDP unit and its place in the
gradient timeline; `_quantized_weights` picks the linear weights stored in 4 bits (QLoRA) and
`_dora_magnitudes` adds DoRA's magnitude vectors, `_frozen_adapters` the frozen copies of the adapter carried next
to the trained one (several adapters per model); `_grads`, `_optimizer_bytes`, `_step_temp` and
`_fsdp_in_flight` sum what a rank holds (`sharding.Layout`).

Example:
    >>> "adamw" in OPTIMIZERS and "fused" in OPTIMIZER_IMPLS
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_lora.errors import LoRAError
from lightning_lora.estimate.quantize import QuantLayout, nf4_quantizable
from lightning_lora.estimate.sharding import Layout, in_flight, shard_bytes
from lightning_lora.layers import LoRALayer
from lightning_lora.surgery import lora_layers
from lightning_lora.variants.dora import DoRA

OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adamw8bit")
OPTIMIZER_IMPLS = ("foreach", "for-loop", "fused")


@dataclass
class _Param:
    """One parameter as the memory model sees it (tied parameters once)."""

    numel: int
    elem: int  # bytes per element (of its dtype)
    trainable: bool
    rows: int  # size of dim 0 (FSDP shards along it)
    unit: str  # FSDP unit: "embed", "head", "layer.<i>" or "root"
    place: str  # for the gradient timeline: "first_layer", "head", "embed" or "layer"
    quant: QuantLayout | None = None

    def stored(self, layout: Layout) -> int:
        """Bytes this rank stores."""
        if self.quant is not None:
            return self.quant.per_rank(layout.world_size)
        return shard_bytes(self.numel, self.rows, self.elem, layout.world_size)

    @property
    def unsharded(self) -> int:
        return self.quant.total if self.quant is not None else self.numel * self.elem


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for j, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[j + 1].isdigit():
            return int(parts[j + 1])
    return None


def _place(name: str, is_embed: bool, is_head: bool, tied: bool) -> tuple[str, str]:
    """`(FSDP unit, gradient-timeline place)` of a parameter."""
    idx = _layer_index(name)
    if idx is not None:
        return f"layer.{idx}", "first_layer" if idx == 0 else "layer"
    if is_head:  # a tied embedding/head weight lives in the root unit (FSDP needs tied weights in one unit)
        return ("root" if tied else "head"), "head"
    if is_embed:
        return "embed", "embed"
    return "root", "head"  # final norm


def _inventory(model: torch.nn.Module) -> tuple[dict[int, _Param], int]:
    """Every parameter (by id) as a `_Param`, and the bytes of the buffers (replicated)."""
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_ids = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    params: dict[int, _Param] = {}
    for name, p in model.named_parameters():
        is_head, is_embed = id(p) in head_ids, id(p) in embed_ids
        unit, place = _place(name, is_embed, is_head, tied=is_head and is_embed)
        params[id(p)] = _Param(numel=p.numel(), elem=p.element_size(), trainable=p.requires_grad,
                               rows=int(p.shape[0]) if p.dim() else 1, unit=unit, place=place)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


@dataclass
class _Grads:
    total: int = 0
    head: int = 0  # lm_head and final norm (tied: the shared embedding)
    first_layer: int = 0
    embed: int = 0  # an untied input embedding (its gradient comes last)


def _grads(params: Sequence[_Param], layout: Layout) -> _Grads:
    out = _Grads()
    for p in params:
        if not p.trainable:
            continue
        size = p.stored(layout)
        out.total += size
        if p.place == "first_layer":
            out.first_layer += size
        elif p.place == "head":
            out.head += size
        elif p.place == "embed":
            out.embed += size
    return out


def _optimizer_bytes(optimizer: str, params: Sequence[_Param], layout: Layout) -> int:
    total = 0
    for p in params:
        size = p.stored(layout)
        if optimizer == "adamw":
            total += 2 * size
        elif optimizer == "sgd-momentum":
            total += size
        elif optimizer == "adamw8bit":  # bitsandbytes: 8-bit states (+ fp32 absmax per 256) from 4096 elements
            numel = size // p.elem
            total += 2 * numel + 2 * 4 * -(-numel // 256) if numel >= 4096 else 8 * numel
    return total


def _step_temp(optimizer: str, impl: str, params: Sequence[_Param], layout: Layout) -> int:
    if optimizer != "adamw" or impl == "fused" or not params:
        return 0
    if impl == "foreach":  # _foreach_sqrt(exp_avg_sqs): one list the size of a moment
        return sum(p.stored(layout) for p in params)
    return 2 * max(p.stored(layout) for p in params)  # sqrt() and the division, per tensor



def _quantized_weights(model: torch.nn.Module, method: str, modules: str) -> tuple[dict[int, str], list[str]]:
    """`{id(weight): method}` of the linear weights stored in 4 bits, and the names that cannot be.

    `adapted`: the base weight of every adapted `nn.Linear`; `all-linear`: also every other
    `nn.Linear` except the output head. Adapter matrices, embeddings and GPT-2 `Conv1D` weights stay
    in their dtype.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen: dict[int, str] = {}
    skipped: list[str] = []
    adapters = tuple(f"{name}." for name, _ in lora_layers(model))
    for name, module in model.named_modules():
        if adapters and name.startswith(adapters):
            continue  # lora_A / lora_B: trainable, never quantised
        adapted = isinstance(module, LoRALayer) and issubclass(module.base_cls, torch.nn.Linear)
        if isinstance(module, LoRALayer) and not adapted:
            continue  # adapted embeddings / Conv1D keep their weight
        if not (adapted or isinstance(module, torch.nn.Linear)):
            continue
        is_head = module is out_emb or name.rsplit(".", 1)[-1] == "lm_head"
        if not adapted and (modules == "adapted" or is_head):
            continue  # all-linear: every linear layer except the output head (as PEFT and bitsandbytes)
        if method == "nf4" and not nf4_quantizable(module.weight.numel()):
            skipped.append(name)
            continue
        chosen[id(module.weight)] = method
    return chosen, skipped


def _dora_magnitudes(model: torch.nn.Module) -> list[_Param]:
    """DoRA's magnitude vector of every adapted linear layer: one parameter per output feature, in the
    adapter dtype, trainable.

    Counted from the adapted layers' shapes, so it does not need `LoRAConfig(use_dora=True)`; a layer
    that already carries its magnitude parameter (a `...magnitude...` parameter) is not counted twice.
    """
    extra: list[_Param] = []
    dora = DoRA()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, layer in lora_layers(model):
        if not dora.supports(type(layer)):
            raise LoRAError(f"use_dora=True: {name} is an {layer.base_cls.__name__}; DoRA is estimated for Linear and "
                            "Conv1D adapters only. Leave it out of target_modules.")
        if any(v.name == dora.name for v in layer.variants):
            continue
        in_f, out_f = type(layer).features(layer)
        numel = dora.extra_parameters(in_f, out_f, layer.r)
        is_head = layer is out_emb or name.rsplit(".", 1)[-1] == "lm_head"
        unit, place = _place(name + ".lora_magnitude_vector", False, is_head, tied=False)
        extra.append(_Param(numel=numel, elem=layer.lora_A.weight.element_size(), trainable=True, rows=out_f,
                            unit=unit, place=place))
    return extra


def _frozen_adapters(model: torch.nn.Module, copies: int, by_id: dict[int, _Param],
                     magnitudes: Sequence[_Param] = ()) -> list[_Param]:
    """`copies` more adapters of the injected adapter's config, carried frozen (several adapters per model: the
    trained one plus `copies` loaded or earlier ones): each adapted layer's `lora_A` / `lora_B` (`by_id`: the
    model's `_inventory`) and DoRA's `magnitudes` once more per copy, in the same dtype, FSDP unit and place, not
    trainable (no gradient, no optimizer state).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = torch.nn.Sequential(); m.add_module("q_proj", torch.nn.Linear(16, 8))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> [(p.numel, p.elem, p.trainable) for p in _frozen_adapters(m, 1, _inventory(m)[0])]  # A 2x16, B 8x2
        [(32, 4, False), (16, 4, False)]
    """
    if copies <= 0:
        return []
    one: list[_Param] = []
    for _, layer in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            module = getattr(layer, part, None)
            if isinstance(module, torch.nn.Module):
                one += [by_id[id(p)] for p in module.parameters(recurse=False) if id(p) in by_id]
    one += list(magnitudes)
    return [_Param(p.numel, p.elem, False, p.rows, p.unit, p.place) for _ in range(copies) for p in one]


# ---------------------------------------------------------------------------------- the breakdown
def _fsdp_in_flight(params: Sequence[_Param], n_layers: int) -> int:
    unsharded: dict[str, int] = {}
    grads: dict[str, int] = {}
    for p in params:
        unsharded[p.unit] = unsharded.get(p.unit, 0) + p.unsharded
        if p.trainable:
            grads[p.unit] = grads.get(p.unit, 0) + p.numel * p.elem
    order = ["embed", *(f"layer.{i}" for i in range(n_layers)), "head"]
    return in_flight(order, unsharded, unsharded.pop("root", 0), grads)



def _effective_weights(model: torch.nn.Module, checkpointing: bool) -> int:
    """Bytes of the `W + delta` tensors of `target_parameters` adapters: each adapted parameter (an expert stack:
    E x in x out) is rebuilt in its dtype in every forward and kept for the input's gradient, and backward makes
    the gradient of one at a time. With checkpointing only one layer's copies are alive (it is recomputed)."""
    per_layer: dict[int | None, int] = {}
    largest = 0
    for name, layer in lora_layers(model):
        if layer.peft_layer_type != "param":
            continue
        size = layer.weight.numel() * layer.weight.element_size()
        idx = _layer_index(name)
        per_layer[idx] = per_layer.get(idx, 0) + size
        largest = max(largest, size)
    if not per_layer:
        return 0
    kept = max(per_layer.values()) if checkpointing else sum(per_layer.values())
    return kept + largest


__all__ = ["OPTIMIZERS", "OPTIMIZER_IMPLS"]
