"""The base of the adapter layers: `LoRALayer`, its forward paths (`AdapterPath`) and dtype policy.

Each adapter layer *is* the base layer plus two small matrices. It registers the base layer's own
parameters under their own names (`weight`, `bias`), so an injected model's state dict is the base
model's plus `<module>.lora_A.weight` and `<module>.lora_B.weight` (PEFT's names), and it computes

    h = base(x) + scaling * B(A(dropout(x)))

with the products in the base's dtype on a bf16 base with fp32 adapters (`adapter_compute_dtype="auto"`:
A and B cast for the call, as bf16 autocast does), else in the adapters' dtype (the input cast to it,
the output back). B starts at zero, so an injected model computes exactly what the base model computes.

`LoRALayer` holds what every layer type shares and no variant branches: the variants its config selects
(`lightning_lora.variants`: DoRA, PiSSA/OLoRA) are resolved once in the constructor (`layer.variants`)
and asked for their forward, merge, tensors and repr. A layer type (`layers.linear`, `layers.embedding`)
answers for itself at class level: `peft_layer_type`, `fan_in_fan_out`, `features`, `adapter_shapes`,
`delta_from` and `peft_tensor_names`.

The package's example (`lightning_lora.layers`) shows a layer computing its base at step 0.
"""

from __future__ import annotations

import enum
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora._kernels import (
    MASK_LEVELS,
    AdapterCall,
    FusedLoRA,
    compute_dtype_for,
    dropout_threshold,
    fused_lora,
    mask_source,
)
from lightning_lora.errors import LoRAError
from lightning_lora.layers.slots import AdapterMerge, SeveralAdapters, set_up_adapter
from lightning_lora.variants import LoRAVariant, variant_tensor_names
from lightning_lora.variants.pissa import load_init_adapters


def _share_state(src: nn.Module, dst: nn.Module, attrs: tuple[str, ...], skip: tuple[str, ...] = ()) -> None:
    """Register `src`'s own Parameter and buffer objects (not copies, except those named in `skip`) and
    plain attributes on `dst`."""
    for key in attrs:
        setattr(dst, key, getattr(src, key))
    for key, param in src._parameters.items():
        if key not in skip:
            dst.register_parameter(key, param)
    for key, buf in src._buffers.items():
        if key not in skip:
            dst.register_buffer(key, buf, persistent=key not in src._non_persistent_buffers_set)


class AdapterPath(enum.Enum):
    """How a `LoRALayer` computes its adapter for one call (`LoRALayer._fused_path` decides).

    The first three are `FusedLoRA` (with autograd) or `fused_lora` (without), in the compute dtype of
    `adapter_compute_dtype`, with the base layer's input gradient fused into the adapter's when the
    base is a plain dense Linear/Conv1D:

    - `DROPOUT`: dropout in training: the mask is drawn again in backward from the recorded generator
      state (neither mask nor dropped copy kept; Philox `native_dropout` on CUDA, lane masks on CPU);
    - `CAST`: no dropout, the adapters in another dtype than the input (bf16 base, fp32 adapters): keeps
      the bf16 input rather than an fp32 copy per adapter;
    - `ADDMM`: no dropout, one dtype: `base + scaling * (x A^T) B^T` as one `addmm`;
    - `FUNCTIONAL`: plain differentiable ops in the compute dtype (`F.dropout`, casts, two `F.linear`):
      inside `torch.compile` (which fuses them itself), on devices other than CPU/CUDA, and for a `p`
      too small for lane masks;
    - `MODULES`: the plain `lora_B(lora_A(lora_dropout(x)))` in the adapter dtype (hooks on those
      modules, autocast, a subclassed dropout).
    - `DORA`: a layer whose variant computes the whole output (`LoRAVariant.owns_forward`: DoRA, plain
      autograd in the adapter dtype): never one of the above.
    """

    DROPOUT = "dropout"
    CAST = "cast"
    ADDMM = "addmm"
    FUNCTIONAL = "functional"
    MODULES = "modules"
    DORA = "dora"


#: the paths computed by `FusedLoRA` / `fused_lora`
FUSED_PATHS = frozenset({AdapterPath.DROPOUT, AdapterPath.CAST, AdapterPath.ADDMM})


class LoRALayer(SeveralAdapters, AdapterMerge, nn.Module):
    """Base class of the adapter layers. Holds the base layer's parameters and A, B.

    A layer type (a subclass, registered with `register_adapter_type`) says how the base computes
    (`base_forward`), how the adapter computes (`adapter_forward`) and, at class level, what it is:
    `peft_layer_type` (PEFT's kind: "linear", "embedding"), `fan_in_fan_out` (base weight stored
    (in, out)), `features(base)`, `adapter_shapes(base, r)`, `delta_from(A, B, scaling)` (what merge
    adds, in the base weight's layout) and `peft_tensor_names()` (our key suffix -> PEFT's).
    Variant-specific keywords (`use_dora`, `init`, future `LoRAConfig` variant fields) go to
    `lightning_lora.variants.resolve_variants`.
    """

    base_cls: type[nn.Module]
    #: the base module's plain attributes that its forward needs (e.g. `in_features`)
    _base_attrs: tuple[str, ...] = ()
    #: PEFT's kind of this layer type ("linear": Linear and Conv1D; "embedding"); variants list the kinds they implement
    peft_layer_type: ClassVar[str] = "linear"
    #: whether the base weight is stored as (in, out) (GPT-2's `Conv1D`) rather than (out, in)
    fan_in_fan_out: ClassVar[bool] = False
    #: adapter tensors registered on the layer itself (not on lora_A / lora_B) by any variant, never part of the base
    ADAPTER_TENSORS: ClassVar[tuple[str, ...]] = variant_tensor_names()
    ADAPTER_TENSORS_SUFFIXES: ClassVar[tuple[str, ...]] = tuple(f".{n}" for n in ADAPTER_TENSORS)
    #: the variants of this layer (`resolve_variants`), in `lightning_lora.variants.VARIANTS` order
    variants: tuple[LoRAVariant, ...] = ()
    #: DoRA's weight norm at merge time (kept by the DoRA variant; `merge_record` hands it out)
    _dora_merge_norm: torch.Tensor | None = None
    #: whether the constructor takes `model_dtype=` (the floating dtype of the model around the layer):
    #: layers whose stored weight's dtype is not the dtype they compute in (quantized bases) need it
    #: for `adapter_dtype=None`
    takes_model_dtype = False

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_dtype: torch.dtype | None = torch.float32,
        use_dora: bool = False,
        **variant_fields: Any,
    ) -> None:
        super().__init__()
        self.base_cls = type(base)
        # the very same Parameter/buffer objects: no copy, keys unchanged
        _share_state(base, self, self._base_attrs)
        set_up_adapter(self, self, base, in_features, out_features, r=r, alpha=alpha, dropout=dropout,
                       use_rslora=use_rslora, init=init, adapter_dtype=adapter_dtype, use_dora=use_dora,
                       **variant_fields)
        self.lora_enabled = True
        # Take the base layer's mode for the new submodules too (lora_dropout!): an adapter injected
        # into a model in eval mode must not apply dropout.
        self.train(base.training)

    # ------------------------------------------------------------------ what the layer type is
    @classmethod
    def base_weight(cls, base: nn.Module) -> torch.Tensor:
        """The base tensor the adapters take their device and dtype from and merge writes into (`base.weight`).

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.base_weight(nn.Linear(4, 2)).shape
            torch.Size([2, 4])
        """
        return base.weight

    @classmethod
    def base_refusal(cls, base: nn.Module) -> str | None:
        """Why this layer type cannot adapt `base` although its type is registered (e.g. an attention module with
        separate q/k/v weights), or None when it can.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.base_refusal(nn.Linear(4, 2)) is None
            True
        """
        return None

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        """`(in_features, out_features)` of a base module of this type.

        Example:
            >>> from lightning_lora.layers import LoRAConv1D
            >>> from transformers.pytorch_utils import Conv1D
            >>> LoRAConv1D.features(Conv1D(24, 8))     # nf=24 outputs, nx=8 inputs
            (8, 24)
        """
        return int(base.in_features), int(base.out_features)

    @classmethod
    def adapter_shapes(cls, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `lora_A.weight` and `lora_B.weight` at rank `r`: `(r, in)` and `(out, r)`.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.adapter_shapes(nn.Linear(16, 8), 4)
            ((4, 16), (8, 4))
        """
        in_features, out_features = cls.features(base)
        return (r, in_features), (out_features, r)

    @classmethod
    def delta_from(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """`scaling * B @ A` in float32, in the layout of the base weight: what `merge` adds.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.delta_from(torch.ones(1, 3), torch.ones(2, 1), 0.5).tolist()
            [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
        """
        return (b.float() @ a.float()) * scaling

    @classmethod
    def check_target(cls, name: str, base: nn.Module, r: int, **options: Any) -> None:
        """Raise a `LoRAError` naming `name` when this layer type cannot adapt `base` at rank `r` with these
        options (the layer's keyword arguments; checked by `inject_lora` for every target); nothing by default.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.check_target("q_proj", nn.Linear(4, 4), 2, use_dora=True)
        """

    def check_merge(self, name: str) -> None:
        """Raise a `LoRAError` naming `name` when this layer's adapter cannot be merged (checked for every layer
        before any is merged); nothing by default."""

    @classmethod
    def channel_view(cls, vector: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector (DoRA's magnitude and weight norm, the bias) shaped to broadcast against
        the layer's output: unchanged for `(..., out)` outputs; a conv layer answers `(1, out, 1, ...)`.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.channel_view(torch.ones(3)).shape
            torch.Size([3])
        """
        return vector

    #: why adapters of this type cannot be sharded with FSDP (refused at setup), or None
    fsdp_refusal: ClassVar[str | None] = None

    @classmethod
    def peft_tensor_names(cls) -> dict[str, str]:
        """Our key suffix of A and B (relative to the layer) -> PEFT's in its adapter files.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear.peft_tensor_names()
            {'lora_A.weight': 'lora_A.weight', 'lora_B.weight': 'lora_B.weight'}
        """
        return {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight"}

    def module_path(self, name: str) -> str:
        """The path (in the model, for a layer at `name`) that `to_base_module()` replaces: the layer's own; a
        parameter adapter (`layers.parameter`) answers its host's.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear(nn.Linear(2, 2), r=1, alpha=1).module_path("q_proj")
            'q_proj'
        """
        return name

    def peft_module_path(self, name: str) -> str:
        """The module path PEFT's files use for the adapter of a layer at `name` (our own path but for parameter
        adapters, which PEFT nests under `base_layer.`).

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear(nn.Linear(2, 2), r=1, alpha=1).peft_module_path("q_proj")
            'q_proj'
        """
        return name

    def adapter_modules(self, in_features: int, out_features: int, r: int, device: torch.device,
                        dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        """The modules `lora_A` and `lora_B` hold A and B in (bias-free `nn.Linear`: weights (r, in) and
        (out, r)); a layer type whose adapters are other modules (convolutions) overrides this.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> a, b = LoRALinear(nn.Linear(4, 3), r=2, alpha=2).adapter_modules(4, 3, 2, torch.device("cpu"),
            ...                                                                  torch.float32)
            >>> tuple(a.weight.shape), tuple(b.weight.shape)
            ((2, 4), (3, 2))
        """
        return (nn.Linear(in_features, r, bias=False, device=device, dtype=dtype),
                nn.Linear(r, out_features, bias=False, device=device, dtype=dtype))

    # ------------------------------------------------------------------ dtype policy
    def _apply(self, fn: Any, recurse: bool = True) -> LoRALayer:
        """Module-wide conversions (`model.to(torch.bfloat16)`, `.half()`, Lightning's `bf16-true`)
        reach the base parameters but leave A and B in their dtype when `adapter_dtype` is set;
        device moves reach everything. So fp32 adapters stay fp32 on a bf16 base, and adapter
        weights restored from a checkpoint are never rounded through bf16."""
        if not self.keep_adapter_dtype or not recurse:
            return super()._apply(fn, recurse)

        def device_only(t: torch.Tensor) -> torch.Tensor:
            probe = fn(t.new_zeros(()))
            return fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)

        for name, module in self._modules.items():
            if module is not None:
                module._apply(device_only if name in ("lora_A", "lora_B") else fn)
        own = [t for t in (getattr(self, n, None) for n in self.ADAPTER_TENSORS) if t is not None]
        if not own:
            return super()._apply(fn, recurse=False)
        keep = {id(t) for t in own} | {id(t.grad) for t in own if t.grad is not None}
        return super()._apply(lambda t: device_only(t) if id(t) in keep else fn(t), recurse=False)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A random (`kaiming`: kaiming-uniform as PEFT; `gaussian`: N(0, 1/r) as the paper), B zero."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            raise LoRAError(f"init={init!r} is invalid; expected 'kaiming' or 'gaussian' here (PiSSA/OLoRA are "
                            "computed once, when the layer is built).")
        nn.init.zeros_(self.lora_B.weight)

    def weight_oi(self) -> torch.Tensor:
        """The base weight in (out, in) layout (a view for `Conv1D`)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def dense_base_weight(self) -> tuple[torch.Tensor, bool]:
        """The dense base weight variants read (DoRA's norm), and whether it is stored (in, out); a
        quantized base's layer returns its dequantised weight (QDoRA)."""
        return self.weight, self.fan_in_fan_out

    def dense_base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`W x` without bias, in `x`'s dtype (DoRA's dropout branch)."""
        w = self.weight_oi()
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))

    def load_init_adapters(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """PiSSA / OLoRA layers: take A0, B0 recorded by the run that trained them
        (`lightning_lora.variants.pissa.load_init_adapters`)."""
        load_init_adapters(self, a0, b0)

    def restore_base_weight(self) -> None:
        """Put the original base weight back where a variant changed it (PiSSA / OLoRA: `W_res + scaling * B0 A0`,
        within one rounding); a no-op for other layers."""
        for variant in self.variants:
            variant.restore_base(self)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for variant in self.variants:
            variant.load_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ------------------------------------------------------------------ compute
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the base layer computes (its own class's forward, on our registered parameters)."""
        return self.base_cls.forward(self, x)  # type: ignore[arg-type]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`scaling * B(A(dropout(x)))` through the `lora_A`/`lora_B` modules (their hooks run: FSDP units),
        in the compute dtype of `adapter_compute_dtype` (narrower than the adapters: under autocast, so the
        fp32 master weights are cast per call as in `functional_adapter`) or autocast's own."""
        a = self.lora_A.weight
        if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type):
            return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        cd = self.compute_dtype(x)
        if cd != a.dtype and torch.amp.is_autocast_available(x.device.type):
            with torch.autocast(x.device.type, dtype=cd):
                return self.lora_B(self.lora_A(self.lora_dropout(x.to(cd)))) * self.scaling
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling

    #: whether `forward` may compute the adapter with the fused paths (A: (r, in), B: (out, r))
    _fusable = False
    #: dtype policy of the adapter products (`LoRAConfig.adapter_compute_dtype`; `inject_lora` sets it)
    adapter_compute_dtype: str = "auto"
    #: dropout mask source of the fused paths: "auto" (Philox on CUDA, lanes on CPU), "philox" or "lanes"
    dropout_masks: str = "auto"

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the adapter products run in for input `x` (see `lightning_lora._kernels.compute_dtype_for`).

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> layer = LoRALinear(nn.Linear(4, 4).bfloat16(), r=2, alpha=2)    # fp32 adapters
            >>> layer.compute_dtype(torch.ones(1, 4, dtype=torch.bfloat16))
            torch.bfloat16
        """
        return compute_dtype_for(self.adapter_compute_dtype, x.dtype, self.lora_A.weight.dtype)

    def functional_adapter(self, x: torch.Tensor) -> torch.Tensor:
        """`scaling * B A dropout(x)` as plain differentiable ops in the compute dtype (`AdapterPath.FUNCTIONAL`)."""
        cd = self.compute_dtype(x)
        drop = self.lora_dropout
        x = x.to(cd)
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            x = F.dropout(x, drop.p, True)
        return F.linear(F.linear(x, self.lora_A.weight.to(cd)), self.lora_B.weight.to(cd)) * self.scaling

    def _fused_path(self, x: torch.Tensor) -> AdapterPath:
        """Which adapter path `forward` takes for input `x` (see `AdapterPath`).

        The fused paths compute what `functional_adapter` computes (the dropout path with its own masks),
        and are skipped where they could change behaviour: hooks on the adapter modules (FSDP2 units of
        their own), adapter modules wrapped by FSDP1 (read through their wrapper, not as `.weight`),
        autocast and a subclassed dropout take the modules; other devices and `torch.compile` (which fuses
        the plain ops itself) take the functional ops.
        """
        if self._forward_variant is not None:
            return AdapterPath.DORA
        if not self._fusable or not x.is_floating_point() or x.is_nested:  # nested: nn.TransformerEncoder's padding
            return AdapterPath.MODULES
        drop = self.lora_dropout
        if (not isinstance(self.lora_A, nn.Linear) or not isinstance(self.lora_B, nn.Linear)  # FSDP1 units
                or self.lora_A._forward_hooks or self.lora_A._forward_pre_hooks or self.lora_B._forward_hooks
                or self.lora_B._forward_pre_hooks or drop._forward_hooks or drop._forward_pre_hooks
                or (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type))
                or not (isinstance(drop, nn.Identity) or type(drop) is nn.Dropout)):
            return AdapterPath.MODULES
        if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
            return AdapterPath.FUNCTIONAL
        if isinstance(drop, nn.Identity) or not drop.training or drop.p == 0:
            a_dtype = self.lora_A.weight.dtype
            return AdapterPath.ADDMM if x.dtype == a_dtype and self.compute_dtype(x) == a_dtype else AdapterPath.CAST
        if mask_source(x.device, self.dropout_masks) == "lanes" and not 0 < dropout_threshold(drop.p) < MASK_LEVELS:
            return AdapterPath.FUNCTIONAL
        return AdapterPath.DROPOUT

    def _fused_base_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base weight as an (out, in) matrix when `base_forward(x)` is `x @ W^T (+ bias)` with a plain
        dense `W` in `x`'s dtype, so that `FusedLoRA` can compute the base's input gradient with its own;
        else None."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        if not self.lora_enabled:
            result = self.base_forward(x)
            for variant in self.variants:
                result = variant.disabled_forward(self, x, result)
            return result
        if self._active is not None or self._mixed is not None:  # several adapters (`layers.slots`)
            return self._several_forward(x)
        path = self._fused_path(x)
        if path is AdapterPath.DORA:
            return self._forward_variant.forward(self, x, self.base_forward(x))  # type: ignore[union-attr]
        if path in FUSED_PATHS:
            a, b = self.lora_A.weight, self.lora_B.weight
            call = AdapterCall(self.scaling, self.lora_dropout.p if path is AdapterPath.DROPOUT else 0.0,
                               self.compute_dtype(x), self.dropout_masks)
            if not torch.is_grad_enabled():
                return fused_lora(self.base_forward(x), x, a, b, call)
            w = self._fused_base_weight(x) if x.requires_grad else None
            # with w, the base's input gradient is computed inside FusedLoRA: the base sees x.detach()
            result = self.base_forward(x if w is None else x.detach())
            return FusedLoRA.apply(result, x, a, b, w, call)
        result = self.base_forward(x)
        if path is AdapterPath.FUNCTIONAL:
            return result + self.functional_adapter(x).to(result.dtype)
        return result + self.adapter_forward(x).to(result.dtype)

    def forget_cached(self) -> None:
        """Drop what the variants keep between calls (DoRA's weight norm for inference), after an edit
        through `.data`."""
        for variant in self.variants:
            variant.forget_cache(self)
        for slot in self._slots().values():
            slot.forget_cached()

    # ------------------------------------------------------------------ merge
    def weight_norm(self) -> float:
        """`||W||_F` of the base weight in float32 (a quantized base's layer dequantises it)."""
        return self.weight.detach().float().norm().item()

    @torch.no_grad()
    def delta_norm(self) -> float:
        """`||scaling B A||_F` from r x r products (`||B A||_F^2 = sum((B^T B) * (A A^T))`), no out x in matrix.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> LoRALinear(nn.Linear(4, 4), r=2, alpha=2).delta_norm()     # B = 0 at the start
            0.0
        """
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        return self.scaling * torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0)).item()

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in float32, in the layout of the base weight (`delta_from` of the layer type)."""
        return type(self).delta_from(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def discard_merge(self) -> None:
        """Forget what the variants recorded at merge time (a merge undone by putting the old weight back)."""
        for variant in self.variants:
            variant.discard_merge(self)

    def merge_record(self) -> dict[str, torch.Tensor]:
        """What a merge recorded that `unmerge` needs (DoRA: the weight norm), to keep with a reversible merge.

        Example:
            >>> from lightning_lora.layers import LoRALinear
            >>> layer = LoRALinear(nn.Linear(2, 2), r=1, alpha=1, use_dora=True)
            >>> layer.merge(); sorted(layer.merge_record())
            ['dora_norm']
        """
        record = {k: t for variant in self.variants for k, t in variant.merge_record(self).items()}
        for name, slot in self._slots().items():  # several adapters: each one's, under its slot's prefix
            record.update({f"lora_adapters.{name}.{k}": t for v in slot.variants for k, t in v.merge_record(slot).items()})
        return record

    def load_merge_record(self, record: dict[str, torch.Tensor]) -> None:
        """Take back what `merge_record` returned (the layer holds merged weights)."""
        for variant in self.variants:
            variant.load_merge_record(self, {k: t for k, t in record.items() if not k.startswith("lora_adapters.")})
        for name, slot in self._slots().items():
            prefix = f"lora_adapters.{name}."
            for variant in slot.variants:
                variant.load_merge_record(slot, {k[len(prefix):]: t for k, t in record.items() if k.startswith(prefix)})

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (delta in float32, written in the weight's dtype); with
        several adapters, each active one in turn (PEFT's `merge` of the active adapters)."""
        if self.merged:
            return
        w = self.weight
        if self._active is not None:
            unmerged = w.detach().clone()  # DoRA takes its norm from the weight before the others (PEFT)
            for name in self._active:
                slot = self.adapter_slot(name)
                w.copy_(slot.merged_weight(w, slot.delta_weight(), unmerged))
            self._merged_names = self._active
        else:
            w.copy_(self.merged_weight(w, self.delta_weight()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()`: the delta is subtracted in float32 and the result written in the weight's dtype.

        Not bit-exact: merge and unmerge each round once, so every element comes back within
        `eps * (|W| + |W + delta|)` of the original (`eps` = 2**-24 for float32, 2**-8 for bfloat16,
        2**-11 for float16); e.g. at most 3.7e-9 on a 256 x 256 float32 layer at r=8 after training.
        Keep a copy of the weights where exactness matters.
        """
        if not self.merged:
            return
        w = self.weight
        if self._merged_names is not None:
            for name in reversed(self._merged_names):
                slot = self.adapter_slot(name)
                w.copy_(slot.unmerged_weight(w, slot.delta_weight()))
            self._merged_names = None
        else:
            w.copy_(self.unmerged_weight(w, self.delta_weight()))
        self.merged = False

    def to_base_module(self) -> nn.Module:
        """A plain module of the base type holding this layer's (possibly merged) parameters."""
        base = self.base_cls.__new__(self.base_cls)
        nn.Module.__init__(base)
        _share_state(self, base, self._base_attrs, skip=self.ADAPTER_TENSORS)
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        extra = "".join(variant.extra_repr() for variant in self.variants)
        return (f"base={self.base_cls.__name__}, r={self.r}, alpha={self.lora_alpha:g}, "
                f"scaling={self.scaling:g}, merged={self.merged}{extra}")


