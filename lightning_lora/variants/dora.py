"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the tensor math and the variant.

DoRA splits the adapted weight into a direction and a magnitude: with `V = W + scaling * B A`
(out x in) and a trainable magnitude `m` (one value per output feature, PEFT's
`lora_magnitude_vector`, initialised to the row norms of W),

    W' = (m / ||V||_row) * V          h = W' x + bias

where `||V||_row` (the L2 norm of each output feature's row; the paper's column norm, as it stores
W as in x out) is treated as a constant in backward: it is computed under `no_grad`, as the paper's
section 4.3 and PEFT do. So with `s = m / ||V||` (per output feature):

* without dropout: `h = bias + s * (W x + scaling * B A x)`;
* with dropout on the adapter input `xd = dropout(x)` (PEFT's rule): `h = W x + bias + (s - 1) * W xd
  + s * scaling * B A xd`, which equals the line above when no element is dropped.

The functions are the math (tensors in, tensors out); `DoRA` is the variant object a `use_dora=True`
layer resolves (Linear and transformers' `Conv1D`, also on a quantized base: QDoRA reads the
dequantised weight through `LoRALayer.dense_base_weight`; `nn.Conv1d/2d/3d`, whose per-output-channel
tensors the layer shapes with `LoRALayer.channel_view`, the norm over every dimension but the first).
Its magnitude is the layer's Parameter
`lora_magnitude_vector` (PEFT's key on disk).

Example:
    >>> import torch
    >>> w, a, b = torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, 2)
    >>> torch.allclose(weight_norm(w, a, b, 2.0), w.norm(dim=1))   # B = 0: the row norms of W
    True
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.variants.base import ExtraTensor, LoRAVariant, label


def _wide(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any tensor is float64: the dtype DoRA's norms and merges are computed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                transposed: bool = False) -> torch.Tensor:
    """`||W + scaling * B A||` per output feature, in float32 (float64 for float64 inputs), without gradient.

    Args:
        weight: the base weight, (out, in), or (in, out) with `transposed` (GPT-2's `Conv1D`), or a conv
            kernel (out, in / groups, *kernel) (the norm over every dimension but the first, as PEFT's conv DoRA).
        a, b: the adapter factors, (r, in) and (out, r), or a conv's (r, in, *kernel) and (out, r, 1, ...).
        scaling: the adapter scaling.
        transposed: `weight` is stored as (in, out).

    Returns:
        A float32 vector of length out. One (out x in) float32 temporary is allocated (the matrix is never
        kept: the norm is detached).

    Example:
        >>> weight_norm(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), torch.zeros(1, 1), 1.0).tolist()
        [5.0]
    """
    dtype = _wide(weight, a, b)
    with torch.no_grad():
        b, a = b.detach().to(device=weight.device, dtype=dtype), a.detach().to(device=weight.device, dtype=dtype)
        if weight.dim() > 2:  # a conv kernel: B (out, r, 1, ...), A (r, in, *kernel)
            combined = (b.flatten(1) @ a.flatten(1)).view(weight.shape)
            combined.mul_(scaling).add_(weight.detach())
            return torch.linalg.vector_norm(combined, dim=tuple(range(1, combined.dim())))
        combined = b @ a
        combined.mul_(scaling).add_(weight.detach().T if transposed else weight.detach())
        return torch.linalg.vector_norm(combined, dim=1)


def output(result: torch.Tensor, base_part: torch.Tensor, adapter: torch.Tensor, bias: torch.Tensor | None,
           scale: torch.Tensor, dropped: bool) -> torch.Tensor:
    """The DoRA layer's output from its parts, in `result`'s dtype.

    Args:
        result: the base layer's output `W x + bias` (..., out).
        base_part: `W x` without bias (no dropout), or `W dropout(x)` (dropout).
        adapter: `scaling * B A x` (or of `dropout(x)`), any float dtype.
        bias: the base layer's bias (or None); only used without dropout.
        scale: `m / ||W + scaling B A||` (out,), carrying the magnitude's gradient.
        dropped: whether `base_part` and `adapter` saw a dropped-out input.

    Autograd keeps one (..., out) tensor in `result`'s dtype (`base_part + adapter`) and `scale`; the
    formula `result + (scale - 1) * base_part + scale * adapter` would keep two. At step 0 (adapter zero,
    scale one) the output is `result` bit for bit, also with a bias on a bf16 base.

    Example:
        >>> r = torch.ones(1, 2); s = torch.tensor([2.0, 1.0])
        >>> output(r, r, torch.zeros(1, 2), None, s, dropped=False).tolist()
        [[2.0, 1.0]]
    """
    z = base_part + adapter.to(base_part.dtype)
    if bias is None and not dropped:
        return (z * scale).to(result.dtype)
    # `result + (scale * z - base_part)` is `bias + scale * z` (or, with dropout, the base output plus the
    # rescaled dropped branch), written so that a layer whose adapter is zero and whose magnitude is the norm
    # (step 0: scale 1) returns `result` bit for bit in every dtype: `scale * z - base_part` is then exactly 0
    return (result + (z * scale - base_part)).to(result.dtype)


@torch.no_grad()
def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                  transposed: bool = False, unmerged: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`((m / ||W + delta||) * (W + delta), ||W + delta||)`: the merged weight in `weight`'s dtype and
    layout, and the norm that `unmerged_weight` needs (it cannot be recovered from the merged weight,
    whose row norms are |m|).

    Args:
        weight: the base weight ((out, in), or (in, out) with `transposed`, or a conv kernel (out, ...)).
        delta: `scaling * B A` in float32, in the weight's layout.
        magnitude: m, (out,) or a conv layer's (1, out, 1, ...).
        transposed: `weight` is stored as (in, out).
        unmerged: the base weight before other adapters were merged into `weight`: the norm is
            `||unmerged + delta||` and the factor rescales `weight + delta` (PEFT's DoRA among several active
            adapters, whose forward rescales the output of those before it); None: `weight`.

    Example:
        >>> w, n = merged_weight(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), torch.tensor([10.0]))
        >>> w.tolist(), n.tolist()
        ([[6.0, 8.0]], [5.0])
    """
    dtype = _wide(weight, delta)
    combined = weight.to(dtype) + delta.to(device=weight.device, dtype=dtype)
    rows = combined.T if transposed else combined
    ref = rows
    if unmerged is not None:
        ref = unmerged.to(dtype) + delta.to(device=weight.device, dtype=dtype)
        ref = ref.T if transposed else ref
    norm = torch.linalg.vector_norm(ref, dim=1 if ref.dim() == 2 else tuple(range(1, ref.dim())))
    factor = magnitude.reshape(-1).to(device=weight.device, dtype=dtype) / norm
    new = (rows * factor.view(-1, *(1,) * (rows.dim() - 1)))
    return (new.T if transposed else new).to(weight.dtype), norm


@torch.no_grad()
def unmerged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                    transposed: bool = False) -> torch.Tensor:
    """Undo `merged_weight`: `W' / (m / norm) - delta`, in `weight`'s dtype and layout.

    Example:
        >>> unmerged_weight(torch.tensor([[6.0, 8.0]]), torch.zeros(1, 2), torch.tensor([10.0]),
        ...                 torch.tensor([5.0])).tolist()
        [[3.0, 4.0]]
    """
    dtype = _wide(weight, delta)
    factor = magnitude.reshape(-1).to(device=weight.device, dtype=dtype) / norm.to(device=weight.device, dtype=dtype)
    w = weight.to(dtype)
    rows = (w.T if transposed else w) / factor.view(-1, *(1,) * (w.dim() - 1))
    return ((rows.T if transposed else rows) - delta.to(device=weight.device, dtype=dtype)).to(weight.dtype)


class DoRA(LoRAVariant):
    """The DoRA variant (`LoRAConfig(use_dora=True)`): a trainable magnitude per output feature, its own
    forward (`output`, the weight norm detached) and merge (`merged_weight` / `unmerged_weight`).

    Per layer it keeps `lora_magnitude_vector` (the Parameter, initialised to `||W + scaling B A||`),
    `_dora_norm_cache` (the norm reused without autograd) and `_dora_merge_norm` (the norm at merge time,
    which `unmerge` needs).

    Example:
        >>> v = DoRA.from_config(use_dora=True)
        >>> v.option(), [t.name for t in v.extra_tensors(16, 8, 4)], v.extra_parameters(16, 8, 4)
        ('use_dora=True', ['lora_magnitude_vector'], 8)
    """

    name: ClassVar[str] = "dora"
    title: ClassVar[str] = "DoRA"
    config_fields: ClassVar[tuple[str, ...]] = ("use_dora",)
    example: ClassVar[dict[str, Any]] = {"use_dora": True}
    owns_forward: ClassVar[bool] = True
    owns_merge: ClassVar[bool] = True
    layer_types: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})

    @classmethod
    def from_config(cls, **fields: Any) -> DoRA | None:
        return cls() if fields.get("use_dora") else None

    def option(self) -> str:
        return "use_dora=True"

    def unsupported_error(self, base: nn.Module | type) -> LoRAConfigError:
        return LoRAConfigError(f"use_dora=True cannot adapt an {label(base)} ({base}): lightning-lora implements DoRA "
                               "for Linear, Conv1D and nn.Conv1d/2d/3d layers. Leave the embedding out of target_modules "
                               "(or in exclude_modules), or set use_dora=False.")

    def extra_tensors(self, in_features: int, out_features: int, r: int) -> tuple[ExtraTensor, ...]:
        return (ExtraTensor("lora_magnitude_vector", (out_features,), "lora_magnitude_vector", True),)

    def init(self, layer: Any, dtype: torch.dtype) -> None:
        layer._dora_merge_norm = None
        layer._dora_norm_cache = None
        dense, transposed = layer.dense_base_weight()
        # one value per output feature, shaped by the layer type (a conv's (1, out, 1, ...), as PEFT stores it)
        layer.lora_magnitude_vector = nn.Parameter(layer.channel_view(
            weight_norm(dense, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, transposed).to(dtype)))

    # ------------------------------------------------------------------ compute
    def forward(self, layer: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's output (`output`) from `result = base(x)`, as PEFT computes it: the weight norm detached,
        dropout (in training) on the input of both the adapter and the `W x` part that the magnitude rescales."""
        a = layer.lora_A.weight
        scale = layer.lora_magnitude_vector / layer.channel_view(self.norm(layer).to(a.device))
        xa = x if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
        drop = layer.lora_dropout
        dropped = not isinstance(drop, nn.Identity) and drop.training
        if dropped:
            xa = drop(xa)
        adapter = layer.lora_B(layer.lora_A(xa)) * layer.scaling
        bias = getattr(layer, "bias", None)
        bias = bias if bias is None else layer.channel_view(bias)
        if dropped:
            base_part = layer.dense_base_matmul(xa.to(result.dtype))
        else:
            base_part = result if bias is None else result - bias
        return output(result, base_part, adapter, bias, scale, dropped)

    def norm(self, layer: Any) -> torch.Tensor:
        """`||W + scaling B A||` per output feature of `layer` (detached, `weight_norm`).

        Without autograd (validation, generation) the norm is kept and reused while W, A and B are the
        same tensors at the same version (any in-place change, `copy_`, `load_state_dict`, an optimizer
        step, a device move gives a new one); a forward with autograd on always recomputes it and drops
        the kept one. Token-by-token generation then costs what plain LoRA costs instead of about
        three times as much. Values written through `.data` (`p.data.copy_(...)`) bypass version counting:
        after such an edit, call `layer.forget_cached()` (or `lightning_lora.surgery.forget_dora_norms(model)`).
        """
        w, a, b = layer.weight, layer.lora_A.weight, layer.lora_B.weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            layer._dora_norm_cache = None
            return weight_norm(*_norm_args(layer))
        # a tensor subclass (an NF4 weight) is known by its identity instead of its storage
        w_ptr = w.data_ptr() if type(w.data) is torch.Tensor else id(w)
        key = (w._version, a._version, b._version, w_ptr, a.data_ptr(), b.data_ptr(), w.device, w.dtype,
               a.dtype, layer.scaling)
        cached = layer._dora_norm_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        value = weight_norm(*_norm_args(layer))
        layer._dora_norm_cache = (key, value)
        return value

    def forget_cache(self, layer: Any) -> None:
        layer._dora_norm_cache = None

    # ------------------------------------------------------------------ merge
    def merged_weight(self, layer: Any, weight: torch.Tensor, delta: torch.Tensor,
                      unmerged: torch.Tensor | None = None) -> torch.Tensor:
        new, layer._dora_merge_norm = merged_weight(weight, delta, layer.lora_magnitude_vector, layer.fan_in_fan_out,
                                                    unmerged)
        return new

    def unmerged_weight(self, layer: Any, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if layer._dora_merge_norm is None:
            raise LoRAError("This DoRA layer was merged elsewhere (the weight norm at merge time is unknown), so "
                            "the merge cannot be undone; load the adapter into a fresh base model instead.")
        new = unmerged_weight(weight, delta, layer.lora_magnitude_vector, layer._dora_merge_norm,
                              layer.fan_in_fan_out)
        layer._dora_merge_norm = None
        return new

    def discard_merge(self, layer: Any) -> None:
        layer._dora_merge_norm = None

    def merge_record(self, layer: Any) -> dict[str, torch.Tensor]:
        norm = layer._dora_merge_norm
        return {} if norm is None else {"dora_norm": norm}

    def load_merge_record(self, layer: Any, record: dict[str, torch.Tensor]) -> None:
        if "dora_norm" in record:
            layer._dora_merge_norm = record["dora_norm"]

    def extra_repr(self) -> str:
        return ", use_dora=True"


def _norm_args(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
    dense, transposed = layer.dense_base_weight()
    return dense, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, transposed


__all__ = ["DoRA", "merged_weight", "output", "unmerged_weight", "weight_norm"]
