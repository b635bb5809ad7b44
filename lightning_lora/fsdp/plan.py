"""The sharding plan: how an injected model is cut into FSDP2 (`fully_shard`) units, and what is refused.

One unit per decoder layer (transformers' `_no_split_modules`, or `FSDPOptions.layers`), one for the input
embedding and one for the output head when they are not tied, and the network as the root. FSDP2 requires
one dtype among a unit's *trainable* parameters: fp32 adapters share their layer's unit with a frozen bf16
base when the installed PyTorch all-gathers mixed dtypes, else they get a unit of their own
(`FSDPOptions.adapter_units`). Torch only: the Lightning side (`lightning_lora.strategies`) calls
`shard_lora_model` with the callback's injection.

Example:
    >>> from torch import nn
    >>> [p for p, _ in decoder_layers(nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])))]
    ['0.0', '0.1']
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.fsdp._dist import dtensor_class, fsdp2_api, is_sharded, mixed_dtype_all_gather
from lightning_lora.replacements import replace_attribute
from lightning_lora.surgery import embedding_of, find_network, has_lora, inject_lora, lora_layers

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


#: the injection `shard_lora_model` uses for a model without adapters and without `config=` (`injecting_with`)
_INJECT: ContextVar[Callable[[nn.Module], None] | None] = ContextVar("lightning_lora_fsdp_inject", default=None)


@contextlib.contextmanager
def injecting_with(inject: Callable[[nn.Module], None]) -> Iterator[None]:
    """Inside the block, `shard_lora_model(model)` on a model without adapters and without `config=` injects
    with `inject(model)`. The `LoRA` callback runs the module's `configure_model` inside it, with its own
    config, so that `shard_lora_model(self)` there needs no config.

    Example:
        >>> calls = []
        >>> with injecting_with(calls.append):
        ...     _INJECT.get() is not None
        True
        >>> _INJECT.get() is None
        True
    """
    token = _INJECT.set(inject)
    try:
        yield
    finally:
        _INJECT.reset(token)


def _is_lightning_module(module: nn.Module) -> bool:
    """Whether `module` is a Lightning `LightningModule`, asked without importing Lightning (torch-only package)."""
    return any(c.__name__ == "LightningModule" and c.__module__.startswith(("lightning.", "pytorch_lightning."))
               for c in type(module).__mro__)


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
    fsdp_cls, fully_shard = fsdp2_api()
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
    if not _is_lightning_module(module):
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
            Trainer's `LoRA` callback (which runs `configure_model` inside `injecting_with`).
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
        inject = _INJECT.get()
        if config is not None:
            inject_lora(module, config)
        elif inject is not None:
            inject(module)
        else:
            raise LoRAError("shard_lora_model: the module has no LoRA adapters and its Trainer has no LoRA callback; "
                            "add LoRA(...) to the Trainer's callbacks, or pass config=LoRAConfig(...).")
    refuse_dora(module)
    refuse_unshardable_layers(module)
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
        replace_attribute(root, "_is_fsdp_managed_module", True, owner=__name__, missing_hook=(
            "transformers' generate() takes no sign of FSDP but this flag (every rank then keeps stepping)"))
    DTensor = dtensor_class()
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


def refuse_unshardable_layers(module: nn.Module) -> None:
    """Adapter layer types that say they cannot be sharded (`LoRALayer.fsdp_refusal`: conv adapters) are refused.

    Raises:
        LoRAError: naming the first such layer, its type and the ways out.

    Example:
        >>> refuse_unshardable_layers(nn.Linear(2, 2))     # no adapter layer: nothing to refuse
    """
    found = next(((name, layer) for name, layer in lora_layers(module) if type(layer).fsdp_refusal), None)
    if found is not None:
        name, layer = found
        raise LoRAError(f"{name} ({layer.base_cls.__name__}): {type(layer).fsdp_refusal}.")
    several = next((name for name, layer in lora_layers(module) if len(layer.adapter_names()) > 1), None)
    if several is not None:
        raise LoRAError(f"{several} holds several adapters ({module.get_submodule(several).adapter_names()}); FSDP "
                        "shards one adapter per layer: delete_adapter the others, or train on one GPU / with DDP.")


__all__ = ["ADAPTER_UNITS", "FSDPOptions", "Unit", "broadcast_adapters", "decoder_layers", "injecting_with",
           "refuse_dora", "refuse_presharded", "refuse_unshardable_layers", "shard_lora_model"]
