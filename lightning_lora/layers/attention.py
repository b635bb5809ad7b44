"""The adapter layer around `nn.MultiheadAttention` (`LoRAMultiheadAttention`), as PEFT's `lora.MultiheadAttention`,
and the forward pre-hook that keeps `nn.TransformerEncoderLayer`'s fused kernel from bypassing adapters.

An attention module is adapted as a whole: one adapter on the packed in-projection (A: (r, E), B: (3E, r), its
delta added to `in_proj_weight`) and one on `out_proj`, a `LoRALinear` child that holds A: (r, E), B: (E, r) and
answers merge, but is never called (the attention reads `out_proj.weight` directly). Every call computes the
effective weights `W + scaling * B @ A` (autograd reaches A and B through them) and runs
`nn.MultiheadAttention.forward` on them, with its own dispatch (fused inference kernel included), so an injected
model computes exactly what the base model computes while B is zero. Nothing is swapped: the forward reads the
effective weights from a view of the layer (`_EffectiveAttention`).

Keys: the base's own (`in_proj_weight`, `out_proj.weight`, ...) plus `lora_A.weight`, `lora_B.weight`,
`out_proj.lora_A.weight`, `out_proj.lora_B.weight`; PEFT's files hold the last two as
`base_layer.out_proj.lora_A.weight` / `lora_B.weight` (`peft_tensor_names`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(16, 2, batch_first=True)
    >>> layer = LoRAMultiheadAttention(mha, r=4, alpha=8)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.equal(layer(x, x, x)[0], mha(x, x, x)[0])
    True
    >>> sorted(k for k in layer.state_dict() if "lora" in k)
    ['lora_A.weight', 'lora_B.weight', 'out_proj.lora_A.weight', 'out_proj.lora_B.weight']
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.layers.base import LoRALayer
from lightning_lora.layers.linear import LoRALinear

#: modules that compute with a fused kernel reading their children's weights directly unless a forward (pre-)hook
#: sits on one of their submodules (`nn.TransformerEncoderLayer` in eval mode without autograd)
FUSED_KERNEL_PARENTS: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer,)


def leave_fused_kernel(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence makes a `FUSED_KERNEL_PARENTS` module take its
    module-by-module path, so the adapter layers inside it run (`nn.TransformerEncoderLayer` checks for hooks on
    its submodules before its fused kernel)."""
    return None


def keep_adapters_running(layer: LoRALayer, ancestors: list[nn.Module]) -> None:
    """Register `leave_fused_kernel` on `layer` when one of its `ancestors` has a fused kernel that would read the
    adapted weights directly (`FUSED_KERNEL_PARENTS`); called by `inject_lora` for every adapter layer.

    Example:
        >>> enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> layer = LoRALinear(enc.linear1, r=2, alpha=2)
        >>> keep_adapters_running(layer, [enc]); len(layer._forward_pre_hooks)
        1
    """
    if any(isinstance(m, FUSED_KERNEL_PARENTS) for m in ancestors) and \
            leave_fused_kernel not in layer._forward_pre_hooks.values():
        layer.register_forward_pre_hook(leave_fused_kernel)


class _Projection:
    """What `nn.MultiheadAttention.forward` reads as `self.out_proj`: a weight and a bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias


class _EffectiveAttention:
    """The layer as `nn.MultiheadAttention.forward` sees it for one call: its attributes, with the effective
    in-projection and out-projection weights."""

    def __init__(self, layer: LoRAMultiheadAttention, in_proj_weight: torch.Tensor, out_weight: torch.Tensor) -> None:
        self._layer = layer
        self.in_proj_weight = in_proj_weight
        self.out_proj = _Projection(out_weight, layer.out_proj.bias)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


class LoRAMultiheadAttention(LoRALayer):
    """LoRA around `nn.MultiheadAttention` (packed `in_proj_weight` only, as PEFT): the in-projection's adapter on
    the layer itself (A: (r, E), B: (3E, r)) and the out-projection's on its `out_proj` child (a `LoRALinear`).

    Refused (as in PEFT, or where PEFT's result would not be what was asked for): separate q/k/v weights
    (`kdim`/`vdim` != `embed_dim`), DoRA, PiSSA/OLoRA (their variants do not list "mha"), `dropout > 0` (the
    in-projection's adapter has no input of its own to drop: PEFT ignores it).

    Example:
        >>> layer = LoRAMultiheadAttention(nn.MultiheadAttention(16, 2), r=4, alpha=8)
        >>> tuple(layer.lora_B.weight.shape), type(layer.out_proj).__name__
        ((48, 4), 'LoRALinear')
    """

    several_adapters = False  # one adapter per layer: its forward is its own

    _base_attrs = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                   "head_dim", "add_zero_attn", "bias_k", "bias_v")
    peft_layer_type: ClassVar[str] = "mha"
    fsdp_refusal: ClassVar[str | None] = (
        "MultiheadAttention adapters are not supported under FSDP (ModelParallelStrategy / FSDPStrategy) yet: the "
        "forward reads in_proj_weight, out_proj.weight and both adapters' weights directly to build the effective "
        "weights, without calling the submodules whose hooks FSDP gathers them in. Train on one device or with DDP, "
        "or leave it out of target_modules (exclude_modules) for the sharded run")
    #: `nn.MultiheadAttention.forward` asks its `self` for this method (the fused inference kernel's mask)
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(self, base: nn.MultiheadAttention, r: int, alpha: float, **kwargs: Any) -> None:
        refusal = type(self).base_refusal(base)
        if refusal is not None:
            raise LoRAError(f"{base} cannot take a LoRA adapter: {refusal}.")
        if kwargs.get("dropout"):
            raise LoRAConfigError(f"dropout={kwargs['dropout']} has no effect on a MultiheadAttention adapter (the "
                                  "in-projection's delta is added to the weight, so no adapter input exists to drop; "
                                  "PEFT ignores it); set dropout=0, or exclude the attention modules "
                                  "(exclude_modules).")
        super().__init__(base, *type(self).features(base), r, alpha, **kwargs)
        self.out_proj = LoRALinear(base.out_proj, r, alpha, **kwargs)
        #: whether `in_proj_weight` required grad before injection (what torch's kernel choice saw; see `forward`)
        self.base_requires_grad = bool(base.in_proj_weight.requires_grad)

    @classmethod
    def base_refusal(cls, base: nn.Module) -> str | None:
        """Separate q/k/v weights (`kdim`/`vdim` != `embed_dim`) are refused, as in PEFT.

        Example:
            >>> LoRAMultiheadAttention.base_refusal(nn.MultiheadAttention(16, 2, kdim=8, vdim=8))[:40]
            'it has separate q/k/v weights (kdim=8, v'
        """
        if not base._qkv_same_embed_dim or base.in_proj_weight is None:
            return (f"it has separate q/k/v weights (kdim={base.kdim}, vdim={base.vdim}, embed_dim={base.embed_dim}); "
                    "only a packed in_proj_weight (kdim = vdim = embed_dim) can take an adapter, as in PEFT")
        return None

    # ------------------------------------------------------------------ what the layer type is
    @classmethod
    def base_weight(cls, base: nn.Module) -> torch.Tensor:
        return base.in_proj_weight

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        """`(E, 3E)`: the in-projection's input and output features."""
        return int(base.embed_dim), 3 * int(base.embed_dim)

    @classmethod
    def peft_tensor_names(cls) -> dict[str, str]:
        """The in-projection's A and B as Linear's; the out-projection's, and its bias, inside PEFT's `base_layer`.

        Example:
            >>> LoRAMultiheadAttention.peft_tensor_names()["out_proj.lora_A.weight"]
            'base_layer.out_proj.lora_A.weight'
        """
        names = dict(super().peft_tensor_names())
        names.update({f"out_proj.{k}": f"base_layer.out_proj.{v}" for k, v in LoRALinear.peft_tensor_names().items()})
        names["out_proj.bias"] = "base_layer.out_proj.base_layer.bias"
        return names

    @property
    def weight(self) -> torch.Tensor:
        """The weight the in-projection's adapter is merged into (`in_proj_weight`)."""
        return self.in_proj_weight

    # ------------------------------------------------------------------ compute
    def _effective(self, weight: torch.Tensor, layer: LoRALayer) -> torch.Tensor:
        """`W + scaling * B @ A` (PEFT's order: the product in the adapters' dtype, then scaled, then added in the
        weight's dtype), or `W` itself for a merged or disabled adapter."""
        if layer.merged or not layer.lora_enabled or layer._active == ():  # `()`: set_adapter chose others
            return weight
        delta = (layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling
        return weight + delta.to(weight.dtype)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`nn.MultiheadAttention.forward` (same arguments) on the effective weights.

        torch picks its kernels by whether the in-projection weight requires grad (even without autograd: whether
        the fused inference kernel runs, whether a matmul folds its batch dimensions), so the last bits of the
        result depend on that flag. The attention gets a weight that requires grad when the base's did before
        injection (`base_requires_grad`; under `torch.inference_mode` a normal tensor, whose views keep the flag),
        so an injected model, or one with its adapters disabled, computes exactly what the base model computed.
        """
        if torch.is_inference_mode_enabled():  # an inference tensor's views never require grad: a normal tensor
            with torch.inference_mode(False), torch.no_grad():
                in_w = self._in_proj_for_kernels()
        else:
            in_w = self._in_proj_for_kernels()
        out_w = self._effective(self.out_proj.weight, self.out_proj)
        return nn.MultiheadAttention.forward(_EffectiveAttention(self, in_w, out_w), query,  # type: ignore[arg-type]
                                             *args, **kwargs)

    def _in_proj_for_kernels(self) -> torch.Tensor:
        """The effective in-projection weight, requiring grad when the base's did before injection (see `forward`)."""
        in_w = self._effective(self.in_proj_weight, self)
        if self.base_requires_grad and not in_w.requires_grad:
            in_w = in_w.detach().requires_grad_()
        return in_w

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold both adapters into `in_proj_weight` and `out_proj.weight`."""
        super().merge()
        self.out_proj.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` for both adapters."""
        super().unmerge()
        self.out_proj.unmerge()

    def to_base_module(self) -> nn.Module:
        """A plain `nn.MultiheadAttention` holding this layer's parameters, its `out_proj` a plain Linear again."""
        base = super().to_base_module()
        out = self.out_proj
        base.out_proj = out.to_base_module() if isinstance(out, LoRALayer) else out
        return base


__all__ = ["FUSED_KERNEL_PARENTS", "LoRAMultiheadAttention", "keep_adapters_running", "leave_fused_kernel"]
