"""Adapter layers: `LoRALinear`, `LoRAConv1D` (transformers' GPT-2 style) and `LoRAEmbedding`.

Each adapter layer *is* the base layer plus two small matrices. It registers the base layer's own
parameters under their own names (`weight`, `bias`), so an injected model's state dict is the base
model's plus `<module>.lora_A.weight` and `<module>.lora_B.weight` (PEFT's names), and it computes

    h = base(x) + scaling * B(A(dropout(x)))

with the products in the base's dtype on a bf16 base with fp32 adapters (`adapter_compute_dtype="auto"`:
A and B cast for the call, as bf16 autocast does), else in the adapters' dtype (the input cast to it,
the output back). B starts at zero, so an injected model computes exactly what the base model computes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_lora.layers import LoRALinear
    >>> base = nn.Linear(16, 8)
    >>> layer = LoRALinear(base, r=4, alpha=8.0)
    >>> x = torch.randn(2, 16)
    >>> torch.equal(layer(x), base(x))
    True
    >>> sorted(layer.state_dict())
    ['bias', 'lora_A.weight', 'lora_B.weight', 'weight']
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import dora
from lightning_lora import init as base_init
from lightning_lora._kernels import (
    MASK_LEVELS,
    AdapterCall,
    FusedLoRA,
    compute_dtype_for,
    dropout_threshold,
    fused_lora,
    mask_source,
)
from lightning_lora.errors import LoRAConfigError, LoRAError

try:  # transformers is a dependency, but keep the layers importable without it
    from transformers.pytorch_utils import Conv1D as HFConv1D
except Exception:  # pragma: no cover
    HFConv1D = None  # type: ignore[assignment,misc]


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
    - `DORA`: a `use_dora=True` layer (`LoRALayer.dora_forward`: plain autograd in the adapter dtype):
      never one of the above.
    """

    DROPOUT = "dropout"
    CAST = "cast"
    ADDMM = "addmm"
    FUNCTIONAL = "functional"
    MODULES = "modules"
    DORA = "dora"


#: the paths computed by `FusedLoRA` / `fused_lora`
FUSED_PATHS = frozenset({AdapterPath.DROPOUT, AdapterPath.CAST, AdapterPath.ADDMM})


class LoRALayer(nn.Module):
    """Base class of the adapter layers. Holds the base layer's parameters and A, B.

    Subclasses say how the base computes (`base_forward`), how the adapter computes
    (`adapter_forward`) and how `B @ A` maps onto the base weight's layout (`delta_weight`).
    """

    base_cls: type[nn.Module]
    #: the base module's plain attributes that its forward needs (e.g. `in_features`)
    _base_attrs: tuple[str, ...] = ()
    #: whether the base weight is stored as (in, out) (GPT-2's `Conv1D`) rather than (out, in)
    _weight_transposed = False
    #: adapter tensors registered on the layer itself (not on lora_A / lora_B), never part of the base
    ADAPTER_TENSORS = ("lora_magnitude_vector", "lora_init_A", "lora_init_B")
    ADAPTER_TENSORS_SUFFIXES = tuple(f".{n}" for n in ADAPTER_TENSORS)
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
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LoRAError(f"r={r} is invalid; expected an integer > 0.")
        self.base_cls = type(base)
        # the very same Parameter/buffer objects: no copy, keys unchanged
        _share_state(base, self, self._base_attrs)

        weight = base.weight
        dtype = adapter_dtype if adapter_dtype is not None else weight.dtype
        #: with an explicit adapter dtype, module-wide dtype casts leave A and B alone (see `_apply`)
        self.keep_adapter_dtype = adapter_dtype is not None
        self.r = int(r)
        self.lora_alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_A = nn.Linear(in_features, self.r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.lora_enabled = True
        #: the initialisation (`init`): "pissa", "pissa_niter_N" and "olora" changed the base weight
        self.init = init
        self.use_dora = bool(use_dora)
        self._dora_merge_norm: torch.Tensor | None = None
        self._dora_norm_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        if base_init.is_base_changing(init):
            self._init_from_base(init, dtype)
        else:
            self.reset_lora_parameters(init)
        if self.use_dora:
            #: DoRA's magnitude per output feature (PEFT's key), initialised to ||W + scaling B A||
            dense, transposed = self.dora_base_weight()
            self.lora_magnitude_vector = nn.Parameter(
                dora.weight_norm(dense, self.lora_A.weight, self.lora_B.weight, self.scaling, transposed).to(dtype))
        # Take the base layer's mode for the new submodules too (lora_dropout!): an adapter injected
        # into a model in eval mode must not apply dropout.
        self.train(base.training)

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
        return self.weight.T if self._weight_transposed else self.weight

    def dora_base_weight(self) -> tuple[torch.Tensor, bool]:
        """The dense base weight DoRA's norm and merge read, and whether it is stored (in, out); a
        quantized base's layer returns its dequantised weight (QDoRA)."""
        return self.weight, self._weight_transposed

    def dora_base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`W x` without bias, in `x`'s dtype (DoRA's dropout branch)."""
        w = self.weight_oi()
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))

    @torch.no_grad()
    def _init_from_base(self, init: str, dtype: torch.dtype) -> None:
        """PiSSA / OLoRA (`lightning_lora.init`): A = A0, B = B0 from the base weight, which becomes
        `W - scaling * B0 A0`; A0, B0 are kept as the buffers `lora_init_A` / `lora_init_B`. Inside
        `init.skip_base_init()`, and on the meta device, the buffers start at zero and the weight is left as it is."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if base_init.base_init_skipped() or self.weight.device.type == "meta":  # no values to decompose
            a0, b0 = torch.zeros_like(a), torch.zeros_like(b)
        else:
            a0, b0 = base_init.init_adapters(init, self.weight_oi(), self.r, self.scaling)
            a0, b0 = a0.to(device=a.device, dtype=dtype), b0.to(device=b.device, dtype=dtype)
            self.weight.copy_(base_init.residual(self.weight, a0, b0, self.scaling, self._weight_transposed))
        a.copy_(a0)
        b.copy_(b0)
        self.register_buffer("lora_init_A", a0.clone())
        self.register_buffer("lora_init_B", b0.clone())

    @torch.no_grad()
    def load_init_adapters(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Take A0, B0 recorded by the run that trained this adapter (PiSSA / OLoRA layers only): the
        base weight becomes `W - scaling * B0 A0` for them. The same A0, B0 change nothing (bit for bit);
        others (computed on another device, say) are swapped within one float rounding of the weight.

        Raises:
            LoRAError: a layer without a base-changing init, or a merged one.
        """
        if getattr(self, "lora_init_A", None) is None:
            raise LoRAError(f"This {type(self).__name__} was not built with a PiSSA/OLoRA init (init={self.init!r}); "
                            "it has no initial adapters to load.")
        cur_a, cur_b = self.lora_init_A, self.lora_init_B
        a0 = a0.to(device=cur_a.device, dtype=cur_a.dtype)
        b0 = b0.to(device=cur_b.device, dtype=cur_b.dtype)
        if a0.shape != cur_a.shape or b0.shape != cur_b.shape:
            return  # left to the strict shape checks of the caller
        if torch.equal(a0, cur_a) and torch.equal(b0, cur_b):
            return
        if self.merged:
            raise LoRAError("Cannot load PiSSA/OLoRA initial adapters into a merged layer; unmerge it first.")
        w = self.weight
        w.copy_(base_init.residual(base_init.residual(w, cur_a, -cur_b, self.scaling, self._weight_transposed),
                                   a0, b0, self.scaling, self._weight_transposed))
        cur_a.copy_(a0)
        cur_b.copy_(b0)

    @torch.no_grad()
    def restore_base_weight(self) -> None:
        """For a PiSSA / OLoRA layer: put `W_res + scaling * B0 A0` (the original weight within one
        rounding) back into the base weight and forget A0, B0; a no-op for other layers."""
        if getattr(self, "lora_init_A", None) is None:
            return
        if self.merged:
            self.unmerge()
        self.weight.copy_(base_init.residual(self.weight, self.lora_init_A, -self.lora_init_B, self.scaling,
                                             self._weight_transposed))
        self.lora_init_A.zero_()
        self.lora_init_B.zero_()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        a0, b0 = state_dict.get(prefix + "lora_init_A"), state_dict.get(prefix + "lora_init_B")
        if a0 is not None and b0 is not None and getattr(self, "lora_init_A", None) is not None:
            self.load_init_adapters(a0, b0)
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
        if self.use_dora:
            return AdapterPath.DORA
        if not self._fusable or not x.is_floating_point():
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
            return self._add_init_adapters(x, self.base_forward(x))
        path = self._fused_path(x)
        if path is AdapterPath.DORA:
            return self.dora_forward(x, self.base_forward(x))
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

    def _add_init_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """With the adapters disabled: a PiSSA / OLoRA layer adds `scaling * B0 A0 x` back, so it computes
        its original base function (not the residual); other layers return `result`."""
        a0 = getattr(self, "lora_init_A", None)
        if a0 is None:
            return result
        h = F.linear(x.to(a0.dtype), a0)
        return result + F.linear(h, self.lora_init_B).mul_(self.scaling).to(result.dtype)

    def dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's output (`lightning_lora.dora`) from the base output `result = base(x)`, as PEFT computes
        it: the weight norm detached, dropout (in training) on the input of both the adapter and the
        `W x` part that the magnitude rescales."""
        a = self.lora_A.weight
        scale = self.lora_magnitude_vector / self.dora_weight_norm().to(a.device)
        xa = x if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
        drop = self.lora_dropout
        dropped = not isinstance(drop, nn.Identity) and drop.training
        if dropped:
            xa = drop(xa)
        adapter = self.lora_B(self.lora_A(xa)) * self.scaling
        bias = getattr(self, "bias", None)
        if dropped:
            base_part = self.dora_base_matmul(xa.to(result.dtype))
        else:
            base_part = result if bias is None else result - bias
        return dora.output(result, base_part, adapter, bias, scale, dropped)

    def dora_weight_norm(self) -> torch.Tensor:
        """`||W + scaling B A||` per output feature (detached, `dora.weight_norm`).

        Without autograd (validation, generation) the norm is kept and reused while W, A and B are the
        same tensors at the same version (any in-place change, `copy_`, `load_state_dict`, an optimizer
        step, a device move gives a new one); a forward with autograd on always recomputes it and drops
        the kept one. Token-by-token generation then costs what plain LoRA costs instead of about
        three times as much. Values written through `.data` (`p.data.copy_(...)`) bypass version counting:
        after such an edit, call `forget_dora_norm()` (or `lightning_lora.surgery.forget_dora_norms(model)`).
        """
        w, a, b = self.weight, self.lora_A.weight, self.lora_B.weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._dora_norm_cache = None
            return dora.weight_norm(*self._dora_norm_args())
        # a tensor subclass (an NF4 weight) is known by its identity instead of its storage
        w_ptr = w.data_ptr() if type(w.data) is torch.Tensor else id(w)
        key = (w._version, a._version, b._version, w_ptr, a.data_ptr(), b.data_ptr(), w.device, w.dtype,
               a.dtype, self.scaling)
        cached = self._dora_norm_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        norm = dora.weight_norm(*self._dora_norm_args())
        self._dora_norm_cache = (key, norm)
        return norm

    def forget_dora_norm(self) -> None:
        """Drop the weight norm kept for inference (`dora_weight_norm`), after an edit through `.data`."""
        self._dora_norm_cache = None

    def _dora_norm_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
        dense, transposed = self.dora_base_weight()
        return dense, self.lora_A.weight, self.lora_B.weight, self.scaling, transposed

    # ------------------------------------------------------------------ merge
    def weight_norm(self) -> float:
        """`||W||_F` of the base weight in float32 (a quantized base's layer dequantises it)."""
        return self.weight.detach().float().norm().item()

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in float32, in the layout of the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (delta in float32, written in the weight's dtype)."""
        if self.merged:
            return
        w = self.weight
        if self.use_dora:
            new, self._dora_merge_norm = dora.merged_weight(w, self.delta_weight(), self.lora_magnitude_vector,
                                                            self._weight_transposed)
            w.copy_(new)
        else:
            w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
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
        if self.use_dora:
            if self._dora_merge_norm is None:
                raise LoRAError("This DoRA layer was merged elsewhere (the weight norm at merge time is unknown), so "
                                "the merge cannot be undone; load the adapter into a fresh base model instead.")
            w.copy_(dora.unmerged_weight(w, self.delta_weight(), self.lora_magnitude_vector, self._dora_merge_norm,
                                         self._weight_transposed))
            self._dora_merge_norm = None
        else:
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def to_base_module(self) -> nn.Module:
        """A plain module of the base type holding this layer's (possibly merged) parameters."""
        base = self.base_cls.__new__(self.base_cls)
        nn.Module.__init__(base)
        _share_state(self, base, self._base_attrs, skip=self.ADAPTER_TENSORS)
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        extra = (", use_dora=True" if self.use_dora else "") + (
            f", init={self.init!r}" if base_init.is_base_changing(self.init) else "")
        return (f"base={self.base_cls.__name__}, r={self.r}, alpha={self.lora_alpha:g}, "
                f"scaling={self.scaling:g}, merged={self.merged}{extra}")


class LoRALinear(LoRALayer):
    """LoRA around `nn.Linear`: `W x + b + scaling * B A dropout(x)`.

    Example:
        >>> layer = LoRALinear(nn.Linear(4096, 4096, bias=False), r=8, alpha=16)
        >>> layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
        65536
    """

    _base_attrs = ("in_features", "out_features")
    _fusable = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, **kwargs: Any) -> None:
        super().__init__(base, base.in_features, base.out_features, r, alpha, **kwargs)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _fused_base_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        return _dense_weight(self, x, LoRALinear, transposed=False)


class LoRAConv1D(LoRALayer):
    """LoRA around transformers' `Conv1D` (GPT-2), whose weight is stored as (in, out).

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> layer = LoRAConv1D(Conv1D(24, 8), r=2, alpha=4)   # nf=24 outputs, nx=8 inputs
        >>> tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape)
        ((2, 8), (24, 2))
    """

    _base_attrs = ("nf", "nx")
    _fusable = True
    _weight_transposed = True

    def __init__(self, base: nn.Module, r: int, alpha: float, **kwargs: Any) -> None:
        in_features, out_features = base.weight.shape
        super().__init__(base, in_features, out_features, r, alpha, **kwargs)

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T

    def _fused_base_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        if HFConv1D is None or self.base_cls.forward is not HFConv1D.forward:
            return None
        return _dense_weight(self, x, LoRAConv1D, transposed=True)


def _dense_weight(layer: LoRALayer, x: torch.Tensor, cls: type[LoRALayer], transposed: bool) -> torch.Tensor | None:
    """`layer.weight` as (out, in) if `layer` computes its base exactly as `cls` does (no subclass
    overriding `base_forward`) from a plain dense weight (no tensor subclass, e.g. a quantized one) in
    `x`'s dtype and on its device; else None."""
    w = layer.weight
    if (type(layer).base_forward is not cls.base_forward or type(w) not in (nn.Parameter, torch.Tensor)
            or w.dtype != x.dtype or w.device != x.device or w.layout != torch.strided):
        return None
    return w.t() if transposed else w


class LoRAEmbedding(LoRALayer):
    """LoRA around `nn.Embedding`: `E[x] + scaling * (A^T[x]) B^T` (no dropout on token ids).

    A has shape (r, num_embeddings) and B (embedding_dim, r), stored as `lora_A.weight` and
    `lora_B.weight`; PEFT calls them `lora_embedding_A` and `lora_embedding_B`.

    Example:
        >>> layer = LoRAEmbedding(nn.Embedding(100, 16), r=4, alpha=8)
        >>> layer(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 16])
    """

    _base_attrs = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")

    def __init__(self, base: nn.Embedding, r: int, alpha: float, **kwargs: Any) -> None:
        if kwargs.get("use_dora"):
            raise LoRAConfigError(f"use_dora=True cannot adapt an nn.Embedding ({base}): lightning-lora implements DoRA "
                                  "for Linear and Conv1D layers. Leave the embedding out of target_modules (or in "
                                  "exclude_modules), or set use_dora=False.")
        if base_init.is_base_changing(kwargs.get("init", "kaiming")):
            raise LoRAConfigError(f"init={kwargs['init']!r} cannot initialise an nn.Embedding adapter ({base}): "
                                  "PiSSA/OLoRA are implemented for Linear and Conv1D layers (as in PEFT). Leave the "
                                  "embedding out of target_modules, or use init='kaiming'.")
        kwargs["dropout"] = 0.0
        super().__init__(base, base.num_embeddings, base.embedding_dim, r, alpha, **kwargs)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        after_a = F.embedding(x, self.lora_A.weight.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)
        return self.lora_B(after_a) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A zero and B ~ N(0, 1), for either `init` (PEFT's and loralib's embedding initialisation:
        the update starts at zero either way)."""
        if init not in ("kaiming", "gaussian"):
            raise LoRAError(f"init={init!r} is invalid; expected 'kaiming' or 'gaussian'.")
        nn.init.zeros_(self.lora_A.weight)
        nn.init.normal_(self.lora_B.weight)


#: base module type -> adapter class (most specific type first when looked up along the MRO)
ADAPTER_TYPES: dict[type[nn.Module], type[LoRALayer]] = {}
#: package -> function registering adapter types for its modules, run the first time a module from that
#: package is looked up (so that e.g. bitsandbytes, slow to import, is never imported for nothing)
_LAZY_REGISTRATIONS: dict[str, Callable[[], None]] = {}


def register_adapter_types_lazily(package: str, register: Callable[[], None]) -> None:
    """Run `register()` (which calls `register_adapter_type`) the first time `adapter_class_for` meets a
    module whose class is defined in `package` (e.g. `"bitsandbytes"`).

    Example:
        >>> register_adapter_types_lazily("my_quant_lib", lambda: None)
    """
    _LAZY_REGISTRATIONS[package] = register


def register_adapter_type(base_type: type[nn.Module], adapter_cls: type[LoRALayer]) -> None:
    """Make modules of `base_type` (and its subclasses) valid LoRA targets, adapted by `adapter_cls`.

    Example:
        >>> class MyLinear(nn.Linear): ...
        >>> adapter_class_for(MyLinear(2, 2)).__name__     # a subclass of nn.Linear already works
        'LoRALinear'
    """
    ADAPTER_TYPES[base_type] = adapter_cls


def adapter_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The adapter class for a module (looked up along its type's MRO), or None if the module's type
    cannot take an adapter (or already is an adapter layer). A subclass of a registered type that
    overrides `forward` is not adapted by the base type's class (what it computes is unknown; see
    `refusal_reason`): register an adapter class for it.

    Example:
        >>> adapter_class_for(nn.Linear(2, 2)).__name__, adapter_class_for(nn.ReLU())
        ('LoRALinear', None)
    """
    if isinstance(module, LoRALayer):
        return None
    package = type(module).__module__.split(".", 1)[0]
    if package in _LAZY_REGISTRATIONS:
        _LAZY_REGISTRATIONS.pop(package)()
    for cls in type(module).__mro__:
        if cls in ADAPTER_TYPES:
            return ADAPTER_TYPES[cls] if type(module).forward is cls.forward else None
    return None


#: parents whose forward reads a child's `.weight` directly instead of calling the child, so an
#: adapter on that child would never run (`F.multi_head_attention_forward(..., out_proj.weight, ...)`)
WEIGHT_READING_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def refusal_reason(module: nn.Module, parent: nn.Module | None = None) -> str | None:
    """Why `module` cannot take an adapter that really runs, or None when it can.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2)
        >>> refusal_reason(mha.out_proj, mha)[:58]
        'its parent MultiheadAttention reads out_proj.weight direct'
    """
    if isinstance(module, LoRALayer):
        return "it already is a LoRA adapter layer"
    if parent is not None and isinstance(parent, WEIGHT_READING_PARENTS):
        child = next((n for n, m in parent.named_children() if m is module), "the child")
        return (f"its parent {type(parent).__name__} reads {child}.weight directly (a functional op), so an adapter "
                "would never run and merging would silently change the model")
    registered = next((cls for cls in type(module).__mro__ if cls in ADAPTER_TYPES), None)
    if registered is not None and registered is not type(module) and type(module).forward is not registered.forward:
        return (f"{type(module).__name__} overrides {registered.__name__}.forward, so what it computes is unknown; "
                "register an adapter class for it with lightning_lora.layers.register_adapter_type")
    if adapter_class_for(module) is None:
        return f"its type is not one of the supported types ({supported_types()})"
    return None


def supported_types() -> str:
    """The module types that can take an adapter, for error messages.

    Example:
        >>> supported_types().split(", ")[:3]     # then the quantized layers, once registered
        ['nn.Linear', 'transformers Conv1D', 'nn.Embedding']
    """
    def label(t: type) -> str:
        if t.__module__.startswith("torch.nn"):
            return f"nn.{t.__name__}"
        return f"{t.__module__.split('.')[0]} {t.__name__}"
    return ", ".join(label(t) for t, cls in ADAPTER_TYPES.items() if getattr(cls, "adaptable", True))


def unsupported_target_error(name: str, module: nn.Module, targets: Any, hint: str,
                             parent: nn.Module | None = None) -> LoRAError:
    """The `LoRAError` for a matched module that cannot take an adapter, saying why.

    Example:
        >>> str(unsupported_target_error("act", nn.ReLU(), ["act"], "q_proj"))[:60]
        "target_modules=['act'] matched 'act' of type ReLU, which can"
    """
    reason = refusal_reason(module, parent) or "unknown"
    fix = (f"Name the Linear layers inside it instead, e.g. {hint}." if hint else
           "Exclude it (exclude_modules) or name other modules.")
    return LoRAError(f"target_modules={targets!r} matched {name!r} of type {type(module).__name__}, which cannot "
                     f"take a LoRA adapter ({reason}); supported types: {supported_types()}. {fix}")


register_adapter_type(nn.Linear, LoRALinear)
if HFConv1D is not None:
    register_adapter_type(HFConv1D, LoRAConv1D)
register_adapter_type(nn.Embedding, LoRAEmbedding)


def _register_bitsandbytes() -> None:
    from lightning_lora.quantization import register_bitsandbytes_adapters

    register_bitsandbytes_adapters()


# Quantized bases (lightning_lora.quantization): bitsandbytes' Linear4bit / Linear8bitLt are registered the
# first time such a module is looked up; the NF4 layer when lightning_lora.quantization is imported.
register_adapter_types_lazily("bitsandbytes", _register_bitsandbytes)
