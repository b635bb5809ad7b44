"""LoRA on parameters named by path (`LoRAConfig.target_parameters`): the weights a module reads itself instead of
through a child layer, e.g. the fused 3-D expert stacks of MoE models (PEFT's `ParamWrapper`).

A targeted parameter of shape (out, in), or (E, out, in) / (E, in, out) for E experts, gets one low-rank delta per
expert in PEFT's layout: `lora_A.weight` (r*E, in) holds expert e's A in rows e*r:(e+1)*r, `lora_B.weight`
(out, r*E) its B in columns e, E+e, 2E+e, ... (`B.reshape(out, r, E)[:, :, e]`). A stack is (E, in, out) when its
module says `is_transposed=True` (transformers' GPT-OSS experts), else (E, out, in) (Qwen3-MoE, Mixtral, ...).

The module that owns the parameters is replaced by a `LoRAParameterHost`, the adapter-layer pattern for a module
of any class: it registers the owner's own Parameter, buffer and child objects under their names (state-dict keys
unchanged) plus one `LoRAParameter` per targeted parameter under `lora.<name>`, and runs the owner's class's
`forward` on itself with `W + delta` bound in place of each adapted parameter for the call. The owner's class is
never changed; `unload` / `merge_and_unload` put the owner object back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(4, 8, 6))          # (E, out, in)
    ...     def forward(self, x):                                 # x: (E, tokens, in)
    ...         return torch.bmm(x, self.w.transpose(1, 2))
    >>> host = LoRAParameterHost(Experts())
    >>> host.add("w", LoRAParameter(host, "w", r=2, alpha=4))
    >>> x = torch.randn(4, 3, 6)
    >>> torch.equal(host(x), host.owner(x)), sorted(host.state_dict())
    (True, ['lora.w.lora_A.weight', 'lora.w.lora_B.weight', 'w'])
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.errors import LoRAError
from lightning_lora.layers.base import LoRALayer

#: the attribute of a `LoRAParameterHost` that holds its `LoRAParameter` layers (keys `<owner>.lora.<param>.lora_A...`)
ADAPTERS_ATTR = "lora"
#: what `nn.Module.__init__` puts into an instance's `__dict__` (never copied between owner and host)
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def parameter_layout(owner: nn.Module, param: torch.Tensor) -> tuple[int, int, int, bool]:
    """`(experts, in_features, out_features, transposed)` of a 2-D (out, in) or 3-D parameter, as PEFT reads it: a
    3-D stack is (E, in, out) when `owner.is_transposed` is true (`transposed`), else (E, out, in).

    Example:
        >>> parameter_layout(nn.Linear(4, 3), nn.Linear(4, 3).weight)
        (1, 4, 3, False)
    """
    shape = tuple(param.shape)
    if len(shape) == 2:
        return 1, int(shape[1]), int(shape[0]), False
    if len(shape) != 3:
        raise LoRAError(f"a parameter of shape {shape} cannot take a LoRA adapter; target_parameters takes 2-D or 3-D "
                        "weights.")
    if getattr(owner, "is_transposed", False):
        return int(shape[0]), int(shape[1]), int(shape[2]), True
    return int(shape[0]), int(shape[2]), int(shape[1]), False


def adapter_path(owner_path: str, name: str) -> str:
    """The path of the adapter layer of parameter `name` of the module at `owner_path`.

    Example:
        >>> adapter_path("model.layers.0.mlp.experts", "down_proj")
        'model.layers.0.mlp.experts.lora.down_proj'
    """
    return f"{owner_path}.{ADAPTERS_ATTR}.{name}" if owner_path else f"{ADAPTERS_ATTR}.{name}"


def parameter_path(layer_path: str) -> str:
    """The path of the parameter an adapter layer at `layer_path` adapts (`adapter_path`'s inverse).

    Example:
        >>> parameter_path("model.layers.0.mlp.experts.lora.down_proj")
        'model.layers.0.mlp.experts.down_proj'
    """
    owner, _, name = layer_path.rpartition(f"{ADAPTERS_ATTR}.")
    return owner + name


def peft_parameter_paths(targets: list[tuple[str, str]]) -> dict[str, str]:
    """Our adapter layer path -> PEFT's module path for it, for `(owner path, parameter name)` pairs in the
    owner's registration order. PEFT nests one `ParamWrapper` per parameter, the first registered innermost, so the
    parameter at index i of k targeted ones of a module sits under `base_layer.` k - 1 - i times.

    Example:
        >>> peft_parameter_paths([("mlp.experts", "gate_up_proj"), ("mlp.experts", "down_proj")])
        {'mlp.experts.lora.gate_up_proj': 'mlp.experts.base_layer', 'mlp.experts.lora.down_proj': 'mlp.experts'}
    """
    by_owner: dict[str, list[str]] = {}
    for owner, name in targets:
        by_owner.setdefault(owner, []).append(name)
    return {adapter_path(owner, name): owner + ".base_layer" * (len(names) - 1 - i)
            for owner, names in by_owner.items() for i, name in enumerate(names)}


class _WeightOf(nn.Module):
    """What `LoRALayer.__init__` reads of a base module, for one parameter: its weight (not registered) and mode."""

    def __init__(self, param: torch.Tensor, training: bool) -> None:
        super().__init__()
        self.__dict__["weight"] = param
        self.training = training


class LoRAParameter(LoRALayer):
    """The adapter of one parameter of a `LoRAParameterHost`: `lora_A` (r*E, in), `lora_B` (out, r*E), and for a call
    the effective weight `W + scaling * delta` (`forward(W)`), one rank-r delta per expert in PEFT's layout.

    `weight` is the host's parameter (not registered here, so its key stays the owner's). Dropout, DoRA and the
    base-changing inits are refused (the input of a raw parameter is not visible; PEFT refuses them too).

    Example:
        >>> host = LoRAParameterHost(nn.Linear(6, 4))
        >>> layer = LoRAParameter(host, "weight", r=2, alpha=4)
        >>> tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape), layer.num_experts
        ((2, 6), (4, 2), 1)
    """

    several_adapters = False  # one adapter per layer: its forward is its own

    peft_layer_type: ClassVar[str] = "param"
    fsdp_refusal: ClassVar[str | None] = (
        "target_parameters is not supported under FSDP (ModelParallelStrategy / FSDPStrategy) yet: the adapter builds "
        "W + delta from the whole parameter in each forward. Train it on one device or with DDP, or drop "
        "target_parameters for the sharded run")
    fan_in_fan_out: ClassVar[bool] = False
    num_experts: int = 1

    def __init__(self, host: LoRAParameterHost, name: str, r: int, alpha: float, dropout: float = 0.0,
                 **kwargs: Any) -> None:
        param = host._parameters.get(name)
        if param is None:
            raise LoRAError(f"{host.base_cls.__name__} has no parameter {name!r}; target_parameters names parameters "
                            "by their path.")
        if dropout:
            raise LoRAError(f"dropout={dropout} cannot apply to target_parameters (PEFT neither): the input of a raw "
                            "parameter is not visible; set dropout=0.")
        if type(param) is not nn.Parameter or not param.is_floating_point():
            raise LoRAError(f"{host.base_cls.__name__}.{name} is stored as {type(param).__name__} "
                            f"({param.dtype}), not a dense floating weight (a quantized base?); target_parameters "
                            "needs W + delta: keep its module out of quantize_base (quantize_base_modules='adapted').")
        experts, in_features, out_features, transposed = parameter_layout(host, param)
        self.num_experts = experts  # read by adapter_modules, before nn.Module.__init__ (a plain int attribute)
        super().__init__(_WeightOf(param, host.training), in_features, out_features, r, alpha, **kwargs)
        self.base_cls = host.base_cls
        self.parameter_name = name
        self.in_features, self.out_features, self.transposed = in_features, out_features, transposed
        self.__dict__["_host"] = host  # not a submodule: the host holds this layer

    # ------------------------------------------------------------------ what the layer type is
    @classmethod
    def adapter_shapes(cls, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """`(r*E, in)` and `(out, r*E)` for a `LoRAParameter` (or a base with `in_features`, `out_features`).

        Example:
            >>> host = LoRAParameterHost(nn.Linear(6, 4))
            >>> LoRAParameter.adapter_shapes(LoRAParameter(host, "weight", r=2, alpha=4), 3)
            ((3, 6), (4, 3))
        """
        experts = getattr(base, "num_experts", 1)
        return (r * experts, int(base.in_features)), (int(base.out_features), r * experts)

    def adapter_modules(self, in_features: int, out_features: int, r: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        """PEFT's `nn.Linear(in, r*E)` and `nn.Linear(r*E, out)`, bias-free."""
        return super().adapter_modules(in_features, out_features, r * self.num_experts, device, dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The adapted parameter (the host's own object)."""
        return self._host.base_parameters()[self.parameter_name]

    def module_path(self, name: str) -> str:
        """The host's path: `to_base_module()` answers for it."""
        return name[: -len(f".{ADAPTERS_ATTR}.{self.parameter_name}")]

    def peft_module_path(self, name: str) -> str:
        """PEFT's path of this adapter: the owner's, under `base_layer.` once per parameter of the owner targeted
        after this one (`peft_parameter_paths`)."""
        owner = self.module_path(name)
        return peft_parameter_paths([(owner, n) for n in self._host.adapted_names()])[name]

    # ------------------------------------------------------------------ compute
    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(lhs, rhs)` with delta = scaling * lhs @ rhs in the weight's layout (batched over experts for 3-D)."""
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        if self.weight.dim() == 2:
            return b, a
        e = self.num_experts
        a = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The weight the host's forward uses: `weight + scaling * delta` (the factors in the weight's dtype, one
        `addmm` / `baddbmm`), or `weight` itself when merged or disabled."""
        if self.merged or not self.lora_enabled or self._active == ():  # `()`: set_adapter chose others
            return weight
        lhs, rhs = self._factors(weight.dtype)
        if weight.dim() == 2:
            return torch.addmm(weight, lhs, rhs, alpha=self.scaling)
        return torch.baddbmm(weight, lhs, rhs, alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """`scaling * delta` in float32, in the weight's layout (what merge adds).

        Example:
            >>> host = LoRAParameterHost(nn.Linear(6, 4))
            >>> LoRAParameter(host, "weight", r=2, alpha=4).delta_weight().shape
            torch.Size([4, 6])
        """
        lhs, rhs = self._factors(torch.float32)
        return (lhs @ rhs) * self.scaling

    @torch.no_grad()
    def delta_norm(self) -> float:
        """`||scaling delta||_F` over all experts (`sum_e ||B_e A_e||_F^2`, from r x r products per expert)."""
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        e = self.num_experts
        a = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        squares = (b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))
        return self.scaling * torch.sqrt(torch.clamp(squares.sum(), min=0.0)).item()

    def to_base_module(self) -> nn.Module:
        """Leave the host: the host itself while it holds other adapters, else the owner module put back."""
        return self._host.release(self.parameter_name)

    def extra_repr(self) -> str:
        return (f"{self.parameter_name}, experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
                f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}, merged={self.merged}")


class LoRAParameterHost(nn.Module):
    """Stands in for a module whose parameters carry `LoRAParameter` adapters (`target_parameters`).

    It registers the owner's own Parameter, buffer and child objects under their names and takes its plain
    attributes, holds the adapters in `lora` (a `ModuleDict` by parameter name), and runs the owner's class's
    `forward` on itself with each adapted parameter replaced by its effective weight for the call. Methods and
    class attributes of the owner's class resolve on the host too (`_apply_gate`, properties).

    Example:
        >>> host = LoRAParameterHost(nn.Linear(6, 4))
        >>> host.add("weight", LoRAParameter(host, "weight", r=2, alpha=4))
        >>> host(torch.zeros(1, 6)).shape, host.in_features, type(host.release("weight")).__name__
        (torch.Size([1, 4]), 6, 'Linear')
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        if ADAPTERS_ATTR in owner.__dict__ or ADAPTERS_ATTR in owner._modules or hasattr(type(owner), ADAPTERS_ATTR):
            raise LoRAError(f"{type(owner).__name__} has an attribute named {ADAPTERS_ATTR!r}, where target_parameters "
                            "would keep its adapters; target its parameters another way.")
        self.__dict__["_owner"] = owner  # not a submodule: put back by `release`
        self.base_cls = type(owner)
        for key, value in owner.__dict__.items():
            if key not in _MODULE_INTERNALS and key != "training":
                self.__dict__[key] = value
        for key, param in owner._parameters.items():
            self.register_parameter(key, param)
        for key, buf in owner._buffers.items():
            self.register_buffer(key, buf, persistent=key not in owner._non_persistent_buffers_set)
        for key, child in owner._modules.items():
            self.add_module(key, child)
        self.add_module(ADAPTERS_ATTR, nn.ModuleDict())
        self.training = owner.training

    @property
    def owner(self) -> nn.Module:
        """The module this host stands in for (its parameters are the host's)."""
        return self._owner

    def add(self, name: str, layer: LoRAParameter) -> None:
        """Register the adapter of parameter `name`."""
        getattr(self, ADAPTERS_ATTR)[name] = layer

    def adapted_names(self) -> list[str]:
        """The adapted parameters, in the owner's registration order."""
        adapters = getattr(self, ADAPTERS_ATTR)
        return [n for n in self.base_parameters() if n in adapters]

    def base_parameters(self) -> dict[str, Any]:
        """The owner's parameters by name (also while a call has adapted ones replaced)."""
        return self.__dict__.get("_unbound_parameters") or self._parameters

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base_cls = self.__dict__.get("base_cls")
            for klass in base_cls.__mro__ if base_cls is not None else ():
                if klass is nn.Module:
                    break
                if name in klass.__dict__:
                    attr = klass.__dict__[name]
                    return attr.__get__(self, base_cls) if hasattr(attr, "__get__") else attr
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        table = self._parameters
        adapters = getattr(self, ADAPTERS_ATTR)
        bound = {}
        for name, layer in adapters.items():  # called as modules: their hooks run (AdapterProbe)
            effective = layer(table[name])
            if effective is not table[name]:
                bound[name] = effective
        if not bound:
            return self.base_cls.forward(self, *args, **kwargs)
        self.__dict__["_unbound_parameters"] = table
        self.__dict__["_parameters"] = {k: v for k, v in table.items() if k not in bound}
        self.__dict__.update(bound)
        try:
            return self.base_cls.forward(self, *args, **kwargs)
        finally:
            for name in bound:
                self.__dict__.pop(name, None)
            self.__dict__["_parameters"] = table
            del self.__dict__["_unbound_parameters"]

    def release(self, name: str) -> nn.Module:
        """Remove the adapter of `name`; returns the host while it holds others, else the owner with the host's
        current parameters, buffers, children and mode (the host's parameters may have been replaced by `model.to()`)."""
        adapters = getattr(self, ADAPTERS_ATTR)
        if name in adapters:
            del adapters[name]
        if len(adapters):
            return self
        owner = self._owner
        for table, own in ((self._parameters, owner._parameters), (self._buffers, owner._buffers),
                           (self._modules, owner._modules)):
            for key in own:
                if key in table:
                    own[key] = table[key]
        owner.training = self.training
        return owner

    def extra_repr(self) -> str:
        return f"base={self.base_cls.__name__}, adapted={self.adapted_names()}"


__all__ = ["ADAPTERS_ATTR", "LoRAParameter", "LoRAParameterHost", "adapter_path", "parameter_layout",
           "parameter_path", "peft_parameter_paths"]
