"""LoRA on sharded models: FSDP2 (`fully_shard`, Lightning's `ModelParallelStrategy`) and FSDP1
(`FullyShardedDataParallel`, Lightning's `FSDPStrategy`).

The `LoRA` callback uses this module by itself when the Trainer's strategy is one of those two; the
functions are public for users who shard in their own `configure_model`.

What it does, and why:

* **Inject, then shard.** Adapters must exist before `fully_shard` runs: FSDP2 manages the modules it
  sees at that moment, and a module swapped in later is never gathered. Under `ModelParallelStrategy`
  the callback injects right after `configure_model` and then calls `shard_lora_model` (unless your
  `configure_model` already called it). A network that your `configure_model` sharded with plain
  `fully_shard` before the adapters existed is refused with a `LoRAError` that says what to call instead.
* **Units of uniform dtype.** One `fully_shard` unit per decoder layer (transformers'
  `_no_split_modules`, or `FSDPOptions.layers`), one for the input embedding and one for the output
  head when they are not tied (as torchtune does), and the network as the root. FSDP2 requires one
  dtype among a unit's *trainable* parameters; frozen parameters may differ. So fp32 adapters share
  their layer's unit with the frozen bf16 base when the installed PyTorch all-gathers mixed dtypes
  (2.13 does: one all-gather per layer, the fused adapter kernels keep running), and otherwise the
  layer's adapters get a unit of their own (`FSDPOptions.adapter_units`), whose hooks make the
  adapter layers take the plain module path. A unit whose trainable parameters still mix dtypes
  (e.g. `bias="all"` on a bf16 base with fp32 adapters) is a `LoRAError`.
* **Frozen means free.** Frozen base shards get no gradient and no optimizer state (FSDP2 reduces
  only what has a gradient); the optimizer holds the adapter DTensors only.
* **Adapter-only checkpoints.** `adapter_only_checkpoints(strategy)` makes the strategy's state-dict
  path return only the adapter keys (sharded DTensors for a distributed checkpoint, full tensors on
  rank 0 for `save_distributed_checkpoint=False`) and load a distributed checkpoint that holds only
  adapters. No base weight is gathered or written.
* **Fit end.** `gather_adapters` all-gathers the adapters (never the base); rank 0 writes the PEFT
  adapter. The merged model is written only when the full model fits in rank 0's memory
  (`write_merged`); otherwise, and for the model in memory, the merge is left to
  `lightning-lora merge` from the adapter.

Example (a module that shards itself; with the callback alone nothing of this is needed):
    >>> import lightning as L
    >>> from lightning.pytorch.strategies import ModelParallelStrategy
    >>> from lightning_lora import LoRA
    >>> from lightning_lora.fsdp import shard_lora_model
    >>> class Module(L.LightningModule):
    ...     def configure_model(self):
    ...         self.model = build_network()
    ...         shard_lora_model(self)      # injects with the Trainer's LoRA callback, then shards
    >>> trainer = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=8, tensor_parallel_size=1),
    ...                     callbacks=[LoRA(r=16, target_modules="all-linear")])    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_lora.checkpoint import (
    SHARDED_METADATA,
    check_checkpoint_config,
    is_sharded_checkpoint,
)
from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.layers import LoRALayer
from lightning_lora.surgery import (
    _without_wrappers,
    embedding_of,
    find_network,
    get_lora_config,
    has_lora,
    is_lora_key,
    lora_layers,
    parameter_summary,
    saved_keys,
    weight_norms,
)

#: `FSDPOptions.adapter_units` choices
ADAPTER_UNITS = ("auto", "layer", "separate")


@dataclass
class FSDPOptions:
    """How `shard_lora_model` (and the callback, `LoRA(fsdp={...})`) shards an injected model.

    Attributes:
        layers: class names of the modules that get one unit each (e.g. `["LlamaDecoderLayer"]`);
            default: transformers' `_no_split_modules` of the network, else the entries of its longest
            `nn.ModuleList`.
        adapter_units: `"layer"`: adapters share their layer's unit (needs a PyTorch whose FSDP2
            all-gathers mixed dtypes when adapters and base differ); `"separate"`: each layer's
            adapters get a unit of their own; `"auto"` (default): `"layer"` when that works, else
            `"separate"`.
        reshard_after_forward: passed to `fully_shard` for every unit but the root (None: PyTorch's
            default, True).
        shard_embeddings: the input embedding and the output head get units of their own when they are
            not tied (as torchtune and the `estimate` memory model assume).
        auto: the callback shards by itself under `ModelParallelStrategy`; with False your
            `configure_model` must call `shard_lora_model`.

    Example:
        >>> FSDPOptions.coerce({"adapter_units": "separate"}).adapter_units
        'separate'
    """

    layers: list[str] | None = None
    adapter_units: str = "auto"
    reshard_after_forward: bool | None = None
    shard_embeddings: bool = True
    auto: bool = True

    def __post_init__(self) -> None:
        if self.adapter_units not in ADAPTER_UNITS:
            raise LoRAConfigError(f"fsdp adapter_units={self.adapter_units!r} is invalid; expected one of "
                                  f"{', '.join(ADAPTER_UNITS)}.")
        if isinstance(self.layers, str):
            self.layers = [self.layers]

    @classmethod
    def coerce(cls, value: FSDPOptions | dict[str, Any] | bool | None) -> FSDPOptions:
        """Options from what `LoRA(fsdp=...)` accepts: None/True (defaults), False (`auto=False`), a dict.

        Raises:
            LoRAConfigError: an unknown key or an invalid value.

        Example:
            >>> FSDPOptions.coerce(False).auto
            False
        """
        if isinstance(value, cls):
            return value
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(auto=False)
        if not isinstance(value, dict):
            raise LoRAConfigError(f"fsdp={value!r} is invalid; expected a dict of FSDP options, e.g. "
                                  "{'adapter_units': 'separate'}, or True/False.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise LoRAConfigError(f"fsdp={value!r}: unknown option(s) {unknown}; expected some of "
                                  f"{', '.join(sorted(known))}.")
        return cls(**value)


@dataclass
class Unit:
    """One `fully_shard` group that `shard_lora_model` made.

    Attributes:
        kind: `"adapters"`, `"layer"`, `"embedding"`, `"head"` or `"root"`.
        modules: paths (relative to the sharded module) of the modules in the group.
        dtypes: dtypes of the group's parameters, trainable ones first as `"float32*"` (marked with `*`).
        numel: parameter elements in the group.
    """

    kind: str
    modules: list[str]
    dtypes: list[str] = field(default_factory=list)
    numel: int = 0


# ============================================================================ detection
def _fsdp2() -> tuple[type, Callable[..., Any]]:
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover (torch < 2.6)
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def _dtensor_cls() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` (or a submodule) is sharded by FSDP2 (`fully_shard`) or wrapped by FSDP1.

    Example:
        >>> is_sharded(nn.Linear(2, 2))
        False
    """
    if not torch.distributed.is_available():
        return False
    fsdp2, _ = _fsdp2()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, (fsdp2, FullyShardedDataParallel)) for m in module.modules())


def strategy_kind(strategy: Any) -> str | None:
    """`"fsdp2"` for Lightning's `ModelParallelStrategy`, `"fsdp1"` for `FSDPStrategy`, else None.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> strategy_kind(DDPStrategy()) is None
        True
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    return None


def mixed_dtype_all_gather() -> bool:
    """Whether the installed FSDP2 all-gathers parameters of different dtypes in one unit (PyTorch
    falls back to a byte buffer; 2.13 does). When not, `adapter_units="auto"` gives adapters their own
    units wherever their dtype differs from the base's.

    Example:
        >>> isinstance(mixed_dtype_all_gather(), bool)
        True
    """
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives

        return "uint8" in inspect.getsource(_fsdp_collectives._get_all_gather_input_metadatas)
    except Exception:  # noqa: BLE001 (an older or reorganized PyTorch: take the safe layout)
        return False


def clean_name(name: str) -> str:
    """A parameter name without the segments that FSDP1, activation-checkpointing and compile wrappers add.

    Example:
        >>> clean_name("model.layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A._fsdp_wrapped_module.weight")
        'model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    return _without_wrappers(name)


# ============================================================================ units
def _outermost_modules(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, module in found:
        if not any(name.startswith(o + ".") for o, _ in out):
            out.append((name, module))
    return out


def decoder_layers(network: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """`(path, module)` of the repeated blocks of `network` that get one unit each.

    With `names`, the modules of those class names; else transformers' `_no_split_modules`; else the
    entries of the longest `nn.ModuleList`.

    Raises:
        LoRAError: `names` matched no module.

    Example:
        >>> net = nn.Sequential(nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
        >>> [p for p, _ in decoder_layers(net)]
        ['0.0', '0.1', '0.2']
    """
    modules = list(network.named_modules())
    wanted = set(names or ())
    if not wanted:
        for _, m in modules:
            wanted.update(getattr(m, "_no_split_modules", None) or ())
    if wanted:
        found = [(n, m) for n, m in modules if n and type(m).__name__ in wanted]
        if not found and names:
            classes = sorted({type(m).__name__ for _, m in modules if len(list(m.children())) > 0})
            raise LoRAError(f"fsdp layers={list(names)!r} matched no module of {type(network).__name__}; its "
                            f"container classes are: {', '.join(classes)}.")
        if found:
            return _outermost_modules(found)
    lists = [(n, m) for n, m in modules if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    path, longest = max(lists, key=lambda item: len(item[1]))
    return [(f"{path}.{i}" if path else str(i), m) for i, m in enumerate(longest)]


def _unmanaged(module: nn.Module, fsdp_cls: type) -> list[tuple[str, nn.Parameter]]:
    """Parameters of `module` not inside a submodule that already is a unit (names relative to `module`)."""
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()

    def walk(prefix: str, m: nn.Module) -> None:
        for name, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + name, p))
        for name, child in m._modules.items():
            if child is not None and not isinstance(child, fsdp_cls):
                walk(f"{prefix}{name}.", child)

    walk("", module)
    return out


def _dtype_names(params: list[tuple[str, nn.Parameter]]) -> list[str]:
    trainable = sorted({str(p.dtype).replace("torch.", "") + "*" for _, p in params if p.requires_grad})
    frozen = sorted({str(p.dtype).replace("torch.", "") for _, p in params if not p.requires_grad})
    return trainable + frozen


def _adapter_modules(module: nn.Module, fsdp_cls: type) -> list[tuple[str, nn.Module]]:
    out = []
    for name, layer in lora_layers(module):
        for part in ("lora_A", "lora_B"):
            sub = getattr(layer, part)
            if not isinstance(sub, fsdp_cls):
                out.append((f"{name}.{part}" if name else part, sub))
    return out


def _shard_unit(kind: str, path: str, module: nn.Module, options: FSDPOptions, kwargs: dict[str, Any],
                units: list[Unit]) -> None:
    fsdp_cls, fully_shard = _fsdp2()
    own = _unmanaged(module, fsdp_cls)
    adapters = _adapter_modules(module, fsdp_cls)
    mixed = len({p.dtype for _, p in own}) > 1
    trainable = {p.dtype for _, p in own if p.requires_grad}
    separate = adapters and (options.adapter_units == "separate" or (options.adapter_units == "auto" and (
        len(trainable) > 1 or (mixed and not mixed_dtype_all_gather()))))
    if separate:
        mods = [m for _, m in adapters]
        params = [(n, p) for n, m in adapters for n, p in m.named_parameters()]
        fully_shard(mods, **kwargs)
        units.append(Unit("adapters", [f"{path}.{n}" if path else n for n, _ in adapters], _dtype_names(params),
                          sum(p.numel() for _, p in params)))
        own = _unmanaged(module, fsdp_cls)
        trainable = {p.dtype for _, p in own if p.requires_grad}
    if len(trainable) > 1:
        names = [f"{n} ({str(p.dtype).replace('torch.', '')})" for n, p in own if p.requires_grad][:6]
        raise LoRAError(f"FSDP unit {path or type(module).__name__!r} would hold trainable parameters of several "
                        f"dtypes ({', '.join(names)}); FSDP requires one dtype among a unit's trainable parameters. "
                        "Train biases / modules_to_save in the adapter dtype (adapter_dtype=None keeps the base "
                        "dtype), or drop bias/modules_to_save.")
    fully_shard(module, **kwargs)
    units.append(Unit(kind, [path], _dtype_names(own), sum(p.numel() for _, p in own)))


def _roots(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that become FSDP roots: the networks holding adapters. A LightningModule is never a
    root (Lightning calls `training_step`, not the module, so a root's hooks would not run on it)."""
    import lightning.pytorch as pl

    if not isinstance(module, pl.LightningModule):
        return [("", module)]
    prefix, network = find_network(module)
    if prefix:
        return [(prefix, network)]
    return [(n, c) for n, c in module.named_children()
            if has_lora(c) and not isinstance(c, (nn.ModuleList, nn.ModuleDict))]


def _data_parallel_mesh(module: nn.Module, mesh: Any) -> Any:
    if mesh is not None:
        return mesh
    lightning_mesh = getattr(module, "_device_mesh", None)
    if lightning_mesh is not None:  # ModelParallelStrategy's 2-D mesh
        names = lightning_mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and lightning_mesh["tensor_parallel"].size() > 1:
            size = lightning_mesh["tensor_parallel"].size()
            raise LoRAError(
                f"ModelParallelStrategy has tensor_parallel_size={size} (its default 'auto' is the number of GPUs), "
                "but the LoRA callback shards with FSDP only, over the data-parallel dimension: every rank would "
                "hold a full replica and see the same data. Use ModelParallelStrategy(data_parallel_size=<GPUs>, "
                "tensor_parallel_size=1), or apply tensor parallelism yourself in configure_model and call "
                "shard_lora_model(self, self.device_mesh['data_parallel']) after it.")
        return lightning_mesh["data_parallel"] if "data_parallel" in names else lightning_mesh
    from torch.distributed.device_mesh import init_device_mesh

    if not torch.distributed.is_initialized():
        raise LoRAError("shard_lora_model needs an initialized process group (run under a distributed launcher or "
                        "Lightning's ModelParallelStrategy) or a mesh=.")
    device = next((p.device.type for p in module.parameters()), "cpu")
    device = "cuda" if device == "cuda" or torch.cuda.is_available() else device
    return init_device_mesh(device, (torch.distributed.get_world_size(),))


def _inject_from_trainer(module: nn.Module) -> None:
    trainer = getattr(module, "_trainer", None)
    callbacks = getattr(trainer, "callbacks", []) if trainer is not None else []
    from lightning_lora.callback import LoRA

    found = [cb for cb in callbacks if isinstance(cb, LoRA)]
    if not found:
        raise LoRAError("shard_lora_model: the module has no LoRA adapters and its Trainer has no LoRA callback; "
                        "add LoRA(...) to the Trainer's callbacks, or pass config=LoRAConfig(...).")
    found[0]._inject(module)


def shard_lora_model(module: nn.Module, mesh: Any = None, options: FSDPOptions | dict[str, Any] | None = None,
                     *, config: Any = None, **fully_shard_kwargs: Any) -> list[Unit]:
    """Shard a model with FSDP2 (`fully_shard`) so that adapters and base shard in units of uniform
    trainable dtype; inject the adapters first if the model has none.

    Call it in `configure_model` instead of your own `fully_shard` calls (after tensor parallelism, if
    any), or let the `LoRA` callback call it under `ModelParallelStrategy`. Units: each decoder layer
    (its adapters in the same unit, or their own: `FSDPOptions.adapter_units`), the input embedding and
    the output head when untied, then the network as root.

    Args:
        module: a LightningModule (its network with adapters is sharded) or a network.
        mesh: a 1-D `DeviceMesh` to shard over; default the data-parallel dimension of the
            LightningModule's `device_mesh`, else all ranks.
        options: `FSDPOptions` (or a dict of them).
        config: a `LoRAConfig` to inject with when the model has no adapters; default: the config of the
            Trainer's `LoRA` callback.
        **fully_shard_kwargs: passed to every `fully_shard` call (`mp_policy`, `offload_policy`, ...).

    Returns:
        The units, innermost first.

    Raises:
        LoRAError: the model is already sharded, has no adapters and no config to inject with, a unit
            would mix trainable dtypes, or a trainable parameter stays outside every unit.

    Example:
        >>> units = shard_lora_model(self)                                 # doctest: +SKIP
        >>> [u.kind for u in units][:3]                                    # doctest: +SKIP
        ['layer', 'layer', 'embedding']
    """
    options = FSDPOptions.coerce(options)
    if is_sharded(module):
        raise LoRAError("shard_lora_model: the model is already sharded; call it once, instead of fully_shard.")
    if not has_lora(module):
        if config is not None:
            from lightning_lora.surgery import inject_lora

            inject_lora(module, config)
        else:
            _inject_from_trainer(module)
    refuse_dora(module)
    meta = [n for n, p in module.named_parameters() if p.is_meta]
    if meta:
        raise LoRAError(f"shard_lora_model: {len(meta)} parameters are on the meta device ({meta[0]}, ...); build the "
                        "network with its weights (e.g. from_pretrained) in configure_model. Lightning would "
                        "re-initialize meta parameters after sharding, adapters included (lora_B must start at zero).")
    kwargs = {"mesh": _data_parallel_mesh(module, mesh), **fully_shard_kwargs}
    broadcast_adapters(module, kwargs["mesh"])
    layer_kwargs = dict(kwargs)
    if options.reshard_after_forward is not None:
        layer_kwargs["reshard_after_forward"] = options.reshard_after_forward
    units: list[Unit] = []
    roots = _roots(module)
    for root_path, root in roots:
        def full(p: str, root_path: str = root_path) -> str:
            return f"{root_path}.{p}" if root_path and p else (root_path or p)

        for path, layer in decoder_layers(root, options.layers):
            _shard_unit("layer", full(path), layer, options, layer_kwargs, units)
        if options.shard_embeddings:
            for kind, emb in (("embedding", _embedding(root, "input")), ("head", _embedding(root, "output"))):
                if emb is not None and not _tied(root):
                    _shard_unit(kind, full(_path_of(root, emb)), emb, options, layer_kwargs, units)
        _shard_unit("root", root_path, root, options, kwargs, units)
        root._is_fsdp_managed_module = True  # transformers' generate() then keeps every rank stepping (synced_gpus)
    DTensor = _dtensor_cls()
    outside = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if outside:
        raise LoRAError(f"Trainable parameters outside every FSDP unit: {outside[:4]}; FSDP would not synchronize "
                        "their gradients. Keep trained modules inside the network that holds the adapters.")
    return units


@torch.no_grad()
def broadcast_adapters(module: nn.Module, mesh: Any) -> None:
    """Give every rank of `mesh` rank 0's adapter initialization before sharding (one broadcast per dtype).

    `fully_shard` keeps each rank's own chunk of each tensor, so the ranks must hold the same full
    tensors; the base weights are the same everywhere (loaded from one file), but randomly initialized
    adapters are only when every rank was seeded alike.

    Example:
        >>> broadcast_adapters(model, mesh)   # doctest: +SKIP
    """
    if not torch.distributed.is_initialized():
        return
    group = mesh.get_group()
    src = torch.distributed.get_global_rank(group, 0)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else \
        torch.device(mesh.device_type)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for _, layer in lora_layers(module):
        for part in (layer.lora_A, layer.lora_B):
            by_dtype.setdefault(part.weight.dtype, []).append(part.weight)
    for tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(device)
        torch.distributed.broadcast(flat, src=src, group=group)
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(chunk.view_as(t))


def _embedding(network: nn.Module, which: str) -> nn.Module | None:
    found = embedding_of(network, which)
    return found if found is not network else None


def _tied(network: nn.Module) -> bool:
    inp, out = _embedding(network, "input"), _embedding(network, "output")
    if inp is None or out is None:
        return False
    return any(p is q for p in inp.parameters() for q in out.parameters())


def _path_of(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def refuse_presharded(module: nn.Module) -> None:
    """Raise when a network was sharded (FSDP2 or FSDP1) before adapters could be injected into it.

    Example:
        >>> refuse_presharded(nn.Linear(2, 2))   # not sharded: nothing happens
    """
    if is_sharded(module) and not has_lora(module):
        raise LoRAError(
            "configure_model sharded the network (fully_shard / FSDP) before the LoRA callback could add adapters; "
            "FSDP would never gather adapters added afterwards. Drop your fully_shard calls (under "
            "ModelParallelStrategy the LoRA callback shards the model itself), or call "
            "lightning_lora.fsdp.shard_lora_model(self) in configure_model in their place: it injects, then shards.")


# ============================================================================ gathering and state dicts
def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


def _full(value: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every rank must call it, in the same order)."""
    DTensor = _dtensor_cls()
    return value.full_tensor() if isinstance(value, DTensor) else value


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
    if full and _is_fsdp1(module):  # FSDP1: gather the adapter units alone (a plain state_dict gathers everything)
        return fsdp1_adapter_state_dict(module, rank0_only=rank0_only)
    state = {clean_name(k): v for k, v in module.state_dict().items()}
    keep = _rank() == 0 or not rank0_only
    out: dict[str, torch.Tensor] = {}
    for key in saved_keys(module):
        if key not in state:
            continue
        value = state[key]
        if not full:
            out[key] = value
            continue
        value = _full(value).detach()
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
    from lightning_lora.peft_format.save import _write_peft_dir, to_peft

    state = adapter_state_dict(module, full=True) if adapter_state is None else adapter_state
    if _rank() != 0:
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
    if _rank() == 0:
        avail = _available_memory()
        decision[0] = 1.0 if avail is None or need * headroom <= avail else 0.0
        free = "unknown" if avail is None else f"{avail / 2**30:.1f} GiB"
    if torch.distributed.is_initialized():  # on the parameters' device: NCCL takes only CUDA tensors
        device = next((_local(p).device for p in network.parameters()), torch.device("cpu"))
        decision = decision.to(device)
        torch.distributed.broadcast(decision, src=0)
        decision = decision.cpu()
    if decision[0] < 0.5:
        return f"too large: the merged model needs {need / 2**30:.1f} GiB on rank 0" + (
            f", {free} available" if _rank() == 0 else "")
    layers = {name: layer for name, layer in lora_layers(network)}
    state = network.state_dict()
    merged: dict[str, torch.Tensor] = {}
    keep = _rank() == 0
    for key, value in state.items():
        if is_lora_key(key):
            continue
        owner, _, pname = key.rpartition(".")
        tensor = _full(value).detach()
        layer = layers.get(owner)
        if layer is not None and pname == "weight":
            a, b = _full(layer.lora_A.weight).detach(), _full(layer.lora_B.weight).detach()
            if keep:
                delta = _delta_like(layer, a, b)
                tensor = (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)
        if keep:
            merged[key] = tensor.to("cpu", copy=True)
    if not keep:
        return "written"
    from lightning_lora.hub import save_pretrained

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


def _delta_like(layer: LoRALayer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`scaling * B @ A` in float32 in the layout of the layer's base weight (as `LoRALayer.delta_weight`)."""
    delta = (b.float() @ a.float()) * layer.scaling
    probe = type(layer).delta_weight
    if probe is LoRALayer.delta_weight:
        return delta
    return delta.T  # Conv1D (in, out) and Embedding (A, B swapped) store the transpose


# ============================================================================ the strategies' checkpoint path
def adapter_only_checkpoints(strategy: Any, pl_module: nn.Module) -> Callable[[], None]:
    """Make an FSDP strategy (`ModelParallelStrategy`, `FSDPStrategy`) save and load only the adapters:
    the one place this module replaces methods (the strategies' state-dict path has no hook). Returns a
    function that undoes it.

    * `lightning_module_state_dict`: the saved keys only. For a distributed checkpoint (a directory that
      every rank writes with `torch.distributed.checkpoint`) the adapter shards as they are; for a
      single-file checkpoint (`save_distributed_checkpoint=False`, `state_dict_type="full"`) the full
      adapter tensors on rank 0, which alone writes the file. The base is never gathered, copied or written.
    * `load_checkpoint` of a distributed checkpoint: the adapter tensors and the optimizer state (which
      holds only adapters) are read after the checkpoint's LoRA config is checked against this run's. A
      single-file checkpoint goes through Lightning's own path (base keys absent, adapter keys checked by
      the callback's `load_state_dict` pre-hook).

    Example:
        >>> undo = adapter_only_checkpoints(trainer.strategy, pl_module)   # doctest: +SKIP
    """
    kind = strategy_kind(strategy)
    original_state_dict = strategy.lightning_module_state_dict
    original_load = strategy.load_checkpoint

    def lightning_module_state_dict() -> dict[str, Any]:
        if not has_lora(pl_module):
            return original_state_dict()
        if kind == "fsdp1":
            restore_frozen_views(strategy.model)  # the FSDP root wraps the LightningModule
        if kind == "fsdp2":
            return adapter_state_dict(pl_module, full=not getattr(strategy, "_save_distributed_checkpoint", True))
        if getattr(strategy, "_state_dict_type", "full") == "full":
            return fsdp1_adapter_state_dict(pl_module)
        return original_state_dict()  # FSDP1 sharded: shard views, no gather; the callback keeps the adapters

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(strategy.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path) or not has_lora(pl_module):
            return original_load(checkpoint_path, weights_only=weights_only)
        if kind == "fsdp2":
            return load_sharded_adapters(path, pl_module, strategy.optimizers, weights_only=weights_only)
        return _load_sharded_adapters_fsdp1(path, strategy, pl_module, weights_only)

    strategy.lightning_module_state_dict = lightning_module_state_dict
    strategy.load_checkpoint = load_checkpoint

    def undo() -> None:
        for name in ("lightning_module_state_dict", "load_checkpoint"):
            strategy.__dict__.pop(name, None)

    return undo


def _load_sharded_adapters_fsdp1(path: Path, strategy: Any, pl_module: nn.Module,
                                 weights_only: bool | None) -> dict[str, Any]:
    """Lightning's `FSDPStrategy.load_checkpoint` for a distributed checkpoint, restricted to the saved keys."""
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    metadata = torch.load(path / SHARDED_METADATA, weights_only=weights_only)
    check_checkpoint_config(metadata, get_lora_config(pl_module), str(path))
    restore_frozen_views(strategy.model)
    keys = set(saved_keys(pl_module))
    model = strategy.model
    with _get_sharded_state_dict_context(model):
        module_state = {"model": {k: v for k, v in model.state_dict().items() if clean_name(k) in keys}}
        dcp.load(module_state, checkpoint_id=str(path))
        model.load_state_dict(module_state["model"], strict=False)
        if pl_module.trainer.state.fn == "fit" and strategy.optimizers:
            reader = dcp.FileSystemReader(str(path))
            for idx, optim in enumerate(strategy.optimizers):
                key = f"optimizer_{idx}"
                optim_state = load_sharded_optimizer_state_dict(model_state_dict=module_state["model"],
                                                                optimizer_key=key, storage_reader=reader)
                optim.load_state_dict(FSDP.optim_state_dict_to_load(optim_state_dict=optim_state[key], model=model,
                                                                    optim=optim))
    return metadata


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
    from lightning_lora.checkpoint import read_sharded_checkpoint

    ckpt = read_sharded_checkpoint(path)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


# ============================================================================ statistics on shards
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sum_over_ranks(values: list[torch.Tensor], module: nn.Module) -> torch.Tensor:
    """Stack float64 scalars and all-reduce them (one collective) on the device of `module`'s parameters."""
    total = torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)
    if torch.distributed.is_initialized():
        device = next((_local(p).device for p in module.parameters()), torch.device("cpu"))
        total = total.to(device)
        torch.distributed.all_reduce(total)
    return total.cpu()


def _is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def sharded_weight_norms(module: nn.Module) -> dict[str, float]:
    """`surgery.weight_norms` for a sharded module: each rank's squared norms of its shards, summed over
    ranks in one all-reduce (every rank must call it). No weight is gathered.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad(): _ = m.q_proj.weight.fill_(1.0)
        >>> _ = inject_lora(m, LoRAConfig(r=1, target_modules=["q_proj"]))
        >>> sharded_weight_norms(m)
        {'q_proj': 2.0}
    """
    layers = list(lora_layers(module))
    sums = _sum_over_ranks([_local(layer.weight).detach().double().pow(2).sum().cpu() for _, layer in layers], module)
    return {clean_name(name): float(v.sqrt()) for (name, _), v in zip(layers, sums)}


def _full_adapters(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    if _is_fsdp1(module):
        state = fsdp1_adapter_state_dict(module, rank0_only=False)
        return {clean_name(n): (state[f"{clean_name(n)}.lora_A.weight"], state[f"{clean_name(n)}.lora_B.weight"],
                                layer.scaling) for n, layer in lora_layers(module)}
    return {clean_name(n): (_full(layer.lora_A.weight).detach(), _full(layer.lora_B.weight).detach(), layer.scaling)
            for n, layer in lora_layers(module)}


@torch.no_grad()
def sharded_delta_ratio(module: nn.Module, norms: dict[str, float]) -> float:
    """`surgery.delta_ratio` for a sharded module: the adapters are gathered (small), the base weight norms
    come from `sharded_weight_norms` (every rank must call it).

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> sharded_delta_ratio(m, sharded_weight_norms(m))     # B = 0 at the start
        0.0
    """
    ratios = []
    for name, (a, b, scaling) in _full_adapters(module).items():
        a, b = a.float(), b.float()
        delta = scaling * torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0)).item()
        w = norms.get(name, 0.0)
        ratios.append(delta / w if w > 0 else float("inf"))
    return sum(ratios) / len(ratios) if ratios else 0.0


def sharded_grad_norm(module: nn.Module) -> float:
    """`surgery.adapter_grad_norm` for a sharded module: local squared norms of the gradient shards, summed
    over ranks (one all-reduce; every rank must call it).

    Example:
        >>> sharded_grad_norm(nn.Linear(2, 2))
        0.0
    """
    from lightning_lora.surgery import lora_parameters

    if not has_lora(module):
        return 0.0
    grads = [_local(p.grad).detach().double().pow(2).sum().cpu() for p in lora_parameters(module)
             if p.grad is not None]
    return float(_sum_over_ranks([torch.stack(grads).sum()] if grads else [torch.zeros((), dtype=torch.float64)],
                                 module)[0].sqrt())


# ============================================================================ FSDP1 (FSDPStrategy)
def fsdp1_auto_wrap_policy(module: nn.Module, layer_classes: Sequence[type] | None = None,
                           adapter_precision: Any = "auto") -> Any:
    """An FSDP1 auto-wrap policy for an injected `module`: every adapter matrix (`lora_A`, `lora_B`) is
    a unit of its own (so flat parameters never mix the adapter dtype with the base's, nor trainable
    with frozen parameters), the decoder layers (`layer_classes`, default as `decoder_layers`) are units,
    and the rest stays in the root.

    Adapter units keep their dtype in compute: with `adapter_precision="auto"` they get a
    `MixedPrecision` in the adapters' own dtype, overriding the strategy's (`bf16-true` would otherwise
    cast fp32 adapters to bf16 for compute); pass None to leave the strategy's.

    Example:
        >>> from lightning_lora import LoRAConfig, inject_lora
        >>> m = nn.Sequential(); m.add_module("q_proj", nn.Linear(4, 4))
        >>> _ = inject_lora(m, LoRAConfig(r=2, target_modules=["q_proj"]))
        >>> policy = fsdp1_auto_wrap_policy(m)
        >>> type(policy).__name__
        'CustomPolicy'
    """
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    adapters: dict[int, torch.dtype] = {}
    for _, layer in lora_layers(module):
        for part in (layer.lora_A, layer.lora_B):
            adapters[id(part)] = part.weight.dtype
    if layer_classes is None:
        layer_classes = tuple({type(m) for _, m in decoder_layers(find_network(module)[1])})
    classes = tuple(layer_classes)

    def wrap(m: nn.Module) -> bool | dict[str, Any]:
        dtype = adapters.get(id(m))
        if dtype is not None:
            if adapter_precision == "auto":
                return {"mixed_precision": MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)}
            return True
        return bool(classes) and isinstance(m, classes)

    return CustomPolicy(wrap)


def refuse_dora(module: nn.Module) -> None:
    """DoRA is not sharded: its weight norm reads the whole base weight and both adapter factors at once,
    and its merge rescales whole rows.

    Raises:
        LoRAError: `module` holds `use_dora=True` layers (the message names one and the ways out).

    Example:
        >>> refuse_dora(nn.Linear(2, 2))     # no DoRA layer: nothing to refuse
    """
    dora = next((name for name, layer in lora_layers(module) if layer.use_dora), None)
    if dora is not None:
        raise LoRAError(f"use_dora=True is not supported under FSDP (ModelParallelStrategy / FSDPStrategy) yet: "
                        f"DoRA's weight norm needs the whole weight of {dora} and its adapters at once. Train DoRA "
                        "on one device or with DDP, or drop use_dora for the sharded run.")


def prepare_fsdp1(strategy: Any, pl_module: nn.Module) -> None:
    """Give Lightning's `FSDPStrategy` the LoRA auto-wrap policy (`fsdp1_auto_wrap_policy`) before it wraps
    the injected module, or refuse a combination that cannot work.

    Raises:
        LoRAError: naming `ModelParallelStrategy`, when the strategy's own `auto_wrap_policy` is not a set of
            layer classes that could be combined with the adapter units, when the module is already wrapped,
            or when `use_orig_params=False` would put trainable and frozen parameters in one flat parameter.

    Example:
        >>> prepare_fsdp1(trainer.strategy, pl_module)   # doctest: +SKIP
    """
    refuse_presharded(pl_module)
    refuse_dora(pl_module)
    if is_sharded(pl_module):
        raise LoRAError("The module was wrapped with FSDP in configure_model; with FSDPStrategy let the strategy "
                        "wrap it (the LoRA callback gives it an auto-wrap policy with adapter units), or use "
                        "ModelParallelStrategy (FSDP2), where lightning_lora.fsdp.shard_lora_model shards it.")
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs = strategy.kwargs
    user = kwargs.get("auto_wrap_policy")
    classes: Sequence[type] | None = None
    if isinstance(user, ModuleWrapPolicy):
        classes = tuple(user._module_classes)
    elif user is not None:
        raise LoRAError(
            f"FSDPStrategy(auto_wrap_policy={user!r}) cannot be combined with LoRA's adapter units: FSDP1 flattens "
            "each unit into one tensor of one dtype, so fp32 adapters must sit in units of their own. Pass the "
            "layer classes as a set (auto_wrap_policy={LlamaDecoderLayer}), or use ModelParallelStrategy "
            "(FSDP2), which the LoRA callback shards by itself.")
    policy = fsdp1_auto_wrap_policy(pl_module, classes)
    if not kwargs.get("use_orig_params", True):
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad and not is_lora_key(n)]
        if trainable:
            raise LoRAError(f"FSDPStrategy(use_orig_params=False) with trainable base parameters ({trainable[:3]}): "
                            "a flat parameter cannot mix trainable and frozen tensors. Set use_orig_params=True, "
                            "drop bias/modules_to_save, or use ModelParallelStrategy (FSDP2).")
    kwargs["auto_wrap_policy"] = policy


def restore_frozen_views(module: nn.Module) -> None:
    """Re-register the parameters of FSDP1 units that hold only frozen parameters and do not shard (`NO_SHARD`,
    what FSDP1 runs on one device). PyTorch swaps such a unit's parameters for plain tensors in forward and,
    as no gradient reaches the unit, never swaps them back; its state dict and the optimizer's parameter
    numbering then miss them. Trainable or sharded units are left alone (FSDP1 restores those itself).

    Example:
        >>> restore_frozen_views(nn.Linear(2, 2))   # no FSDP1 unit: nothing to do
    """
    if not _is_fsdp1(module):
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    for unit in module.modules():
        handle = getattr(unit, "_handle", None) if isinstance(unit, FSDP) else None
        if (handle is not None and unit._use_orig_params and unit.sharding_strategy == ShardingStrategy.NO_SHARD
                and not handle.flat_param.requires_grad):
            handle._use_sharded_views()


def fsdp1_adapter_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full adapter tensors of an FSDP1-wrapped model whose adapters are units of their own (see
    `fsdp1_auto_wrap_policy`): each adapter unit is gathered alone (`summon_full_params`), the base never.

    Example:
        >>> fsdp1_adapter_state_dict(trainer.model)   # doctest: +SKIP
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, torch.Tensor] = {}
    keep = _rank() == 0 or not rank0_only
    for name, module in model.named_modules():
        if not isinstance(module, FSDP):
            continue
        key = clean_name(name)
        if not key.endswith((".lora_A", ".lora_B")):
            continue
        with FSDP.summon_full_params(module, writeback=False, recurse=False):
            weight = module.module.weight.detach()
            if keep:
                out[clean_name(f"{key}.weight")] = weight.to("cpu", copy=True)
    return out


# ====================================================================== the LoRA callback's FSDP steps
def inject_and_shard(strategy: Any, pl_module: nn.Module, kind: str, inject: Callable[[], None],
                     options: FSDPOptions) -> tuple[Any, dict[str, float]] | None:
    """Right after `configure_model` under an FSDP strategy: `inject()`, then shard (FSDP2, `kind="fsdp2"`)
    or hand the strategy an auto-wrap policy with adapter units (FSDP1, `kind="fsdp1"`).

    Returns:
        FSDP1: the parameter summary and weight norms of the full model, measured before FSDP1 flattens
        its parameters; FSDP2: None (they are measured on the DTensors).

    Raises:
        LoRAError: the network was sharded in `configure_model`, or `options.auto` is off and
            `configure_model` did not call `shard_lora_model`; see also `prepare_fsdp1`.

    Example:
        >>> inject_and_shard(trainer.strategy, pl_module, "fsdp2", inject, FSDPOptions())   # doctest: +SKIP
    """
    from lightning.pytorch.utilities import rank_zero_info

    refuse_presharded(pl_module)
    inject()
    if kind == "fsdp1":
        before = (parameter_summary(pl_module), weight_norms(pl_module))
        prepare_fsdp1(strategy, pl_module)
        return before
    if not is_sharded(pl_module):
        if not options.auto:
            raise LoRAError("LoRA(fsdp={'auto': False}) but configure_model did not shard the model; call "
                            "lightning_lora.fsdp.shard_lora_model(self) at the end of configure_model.")
        units = shard_lora_model(pl_module, options=options)
        kinds = {k: sum(u.kind == k for u in units) for k in ("layer", "adapters", "embedding", "head", "root")}
        rank_zero_info("LoRA: sharded with FSDP2 (fully_shard) in " + ", ".join(
            f"{n} {k} unit{'s' if n != 1 else ''}" for k, n in kinds.items() if n))
    return None


def fit_end_sharded(strategy: Any, pl_module: nn.Module, adapter_dir: str | os.PathLike | None,
                    merged_dir: str | os.PathLike | None, merge_on_fit_end: bool) -> None:
    """Fit end of a sharded model (every rank calls the collectives): the adapters are gathered (never
    the base) and written by rank 0 to `adapter_dir` (PEFT format); no merge in memory; the merged model
    goes to `merged_dir` only under FSDP2 and when it fits on rank 0 (`write_merged`), else a warning
    names the offline `lightning-lora merge` command.

    Example:
        >>> fit_end_sharded(trainer.strategy, pl_module, "out/adapter", None, True)   # doctest: +SKIP
    """
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    fsdp1 = strategy_kind(strategy) == "fsdp1"
    if adapter_dir is not None:
        write_adapter(pl_module, adapter_dir, fsdp1_adapter_state_dict(pl_module) if fsdp1 else None)
        rank_zero_info(f"LoRA: adapter written to {adapter_dir} (PEFT format, gathered from the shards)")
    offline = (f"lightning-lora merge --base <base model> --adapter {adapter_dir or '<adapter dir>'} "
               f"--out {merged_dir or '<merged dir>'}")
    done = None
    if merged_dir is not None:
        done = "not supported under FSDPStrategy" if fsdp1 else write_merged(pl_module, merged_dir)
        if done == "written":
            rank_zero_info(f"LoRA: merged model written to {merged_dir} (gathered on rank 0)")
        else:
            rank_zero_warn(f"LoRA: the merged model was not written to {merged_dir} ({done}); merge offline "
                           f"from the adapter: {offline}")
    if merge_on_fit_end:
        where = f"the merged model is in {merged_dir}" if done == "written" else f"merge offline: {offline}"
        rank_zero_info(f"LoRA: the model is sharded (FSDP), so its adapters stay unmerged in memory (outputs are "
                       f"the same); {where}")


__all__ = ["ADAPTER_UNITS", "FSDPOptions", "Unit", "adapter_only_checkpoints", "adapter_state_dict",
           "broadcast_adapters", "clean_name", "consolidate_checkpoint", "decoder_layers", "fit_end_sharded",
           "fsdp1_adapter_state_dict", "fsdp1_auto_wrap_policy", "gather_adapters", "inject_and_shard", "is_sharded",
           "load_sharded_adapters", "mixed_dtype_all_gather", "prepare_fsdp1", "refuse_dora", "refuse_presharded", "restore_frozen_views", "shard_lora_model",
           "sharded_delta_ratio", "sharded_grad_norm", "sharded_weight_norms", "strategy_kind", "write_adapter",
           "write_merged"]
