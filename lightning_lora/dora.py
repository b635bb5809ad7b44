"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): the tensor math.

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

`lightning_lora.layers.LoRALayer` calls these functions for `use_dora=True` layers (Linear and
transformers' `Conv1D`). Nothing here knows about modules or configs.

Example:
    >>> import torch
    >>> w, a, b = torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, 2)
    >>> torch.allclose(weight_norm(w, a, b, 2.0), w.norm(dim=1))   # B = 0: the row norms of W
    True
"""

from __future__ import annotations

import torch


def _wide(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any tensor is float64: the dtype DoRA's norms and merges are computed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                transposed: bool = False) -> torch.Tensor:
    """`||W + scaling * B A||` per output feature, in float32 (float64 for float64 inputs), without gradient.

    Args:
        weight: the base weight, (out, in), or (in, out) with `transposed` (GPT-2's `Conv1D`).
        a, b: the adapter factors, (r, in) and (out, r).
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
        combined = b.detach().to(device=weight.device, dtype=dtype) @ a.detach().to(device=weight.device, dtype=dtype)
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
    formula `result + (scale - 1) * base_part + scale * adapter` would keep two.

    Example:
        >>> r = torch.ones(1, 2); s = torch.tensor([2.0, 1.0])
        >>> output(r, r, torch.zeros(1, 2), None, s, dropped=False).tolist()
        [[2.0, 1.0]]
    """
    z = base_part + adapter.to(base_part.dtype)
    if dropped:
        out = torch.addcmul(result - base_part, z, scale)
    elif bias is not None:
        out = torch.addcmul(bias, z, scale)
    else:
        out = z * scale
    return out.to(result.dtype)


@torch.no_grad()
def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                  transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`((m / ||W + delta||) * (W + delta), ||W + delta||)`: the merged weight in `weight`'s dtype and
    layout, and the norm that `unmerged_weight` needs (it cannot be recovered from the merged weight,
    whose row norms are |m|).

    Args:
        weight: the base weight ((out, in), or (in, out) with `transposed`).
        delta: `scaling * B A` in float32, in the weight's layout.
        magnitude: m (out,).
        transposed: `weight` is stored as (in, out).

    Example:
        >>> w, n = merged_weight(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), torch.tensor([10.0]))
        >>> w.tolist(), n.tolist()
        ([[6.0, 8.0]], [5.0])
    """
    dtype = _wide(weight, delta)
    combined = weight.to(dtype) + delta.to(device=weight.device, dtype=dtype)
    rows = combined.T if transposed else combined
    norm = torch.linalg.vector_norm(rows, dim=1)
    factor = magnitude.to(device=weight.device, dtype=dtype) / norm
    new = (rows * factor[:, None])
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
    factor = magnitude.to(device=weight.device, dtype=dtype) / norm.to(device=weight.device, dtype=dtype)
    w = weight.to(dtype)
    rows = (w.T if transposed else w) / factor[:, None]
    return ((rows.T if transposed else rows) - delta.to(device=weight.device, dtype=dtype)).to(weight.dtype)


__all__ = ["merged_weight", "output", "unmerged_weight", "weight_norm"]
