"""The fused adapter computation: one autograd function and the dropout masks it draws.

`FusedLoRA` computes `result + scaling * (dropout(x) @ A^T) @ B^T` keeping only `x` (in its own
dtype), the r-wide `h = A dropout(x)` and an integer seed for backward; the dropout mask is drawn
again from the seed instead of being kept. Nothing here knows about modules, configs or Lightning:
`lightning_lora.layers` decides when a layer takes this path.

Example:
    >>> import torch
    >>> from lightning_lora._kernels import dropout_threshold, dropout_drop_mask
    >>> dropout_threshold(0.05)
    3277
    >>> m = dropout_drop_mask(torch.Size([4, 8]), dropout_threshold(0.5), seed=0, device=torch.device("cpu"))
    >>> m.shape, m.dtype
    (torch.Size([4, 8]), torch.bool)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

#: dropout masks are drawn as 16-bit uniform integers: p is used rounded to a multiple of 1/65536
MASK_LEVELS = 1 << 16


def dropout_threshold(p: float) -> int:
    """How many of the 65536 values of a 16-bit lane mean "drop" for dropout probability `p`.

    The adapter path draws its dropout masks from 16-bit random lanes (four per 64-bit draw; with the
    compare about three times cheaper on CPU than `bernoulli_`), so the drop probability it applies is
    `dropout_threshold(p) / 65536`, which is `p` to within 2**-17 (0.05 -> 0.0500031), and the
    kept values are scaled by the exact inverse of the keep probability, so the expectation is kept.
    """
    return int(round(p * MASK_LEVELS))


def draw_dropout_seed() -> int:
    """A seed for one dropout mask, drawn from the default CPU generator (`torch.manual_seed` repeats it)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def dropout_drop_mask(shape: torch.Size, threshold: int, seed: int, device: torch.device) -> torch.Tensor:
    """The bool mask (True = dropped) that seed `seed` gives: `threshold / 65536` of it True on average.

    The same (shape, threshold, seed, device) give the same mask, so a backward pass can rebuild the
    mask of its forward instead of keeping it.
    """
    n = math.prod(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1, generator=gen)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes < threshold - MASK_LEVELS // 2


def dropped_input(x: torch.Tensor, drop: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` with the dropped entries zeroed (unscaled), never writing into `x` itself."""
    xd = x.to(dtype)
    if drop is None:
        return xd
    return xd.masked_fill_(drop, 0) if xd.dtype != x.dtype else torch.where(drop, 0.0, xd)


def add_adapter_output(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`result + scaling * h B^T`: one `addmm` when the dtypes agree, else computed in B's dtype and cast."""
    if result.dtype != b.dtype:
        return result + F.linear(h, b).mul_(scaling).to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
    return out.view(result.shape)


class FusedLoRA(torch.autograd.Function):
    """`result + scaling * (dropout(x) @ A^T) @ B^T` with a memory-lean backward.

    Shapes: `x` (..., in), `a` (r, in), `b` (out, r), `result` (..., out); `a`/`b` may be in a wider
    dtype than `x` (fp32 adapters on a bf16 base). Returns (..., out) in `result`'s dtype.

    Autograd around `lora_B(lora_A(nn.Dropout(x)))` keeps, per adapted layer, the dropout mask and the
    dropped-out input (the size of `x`, in the adapter dtype: an fp32 copy when the base runs in bf16).
    This function keeps only `x` itself, in its own dtype (one tensor shared by the adapters that read
    the same input: q/k/v, gate/up), the small `h = A dropout(x)` (r columns) and the integer seed of
    its mask; backward draws the mask again from the seed and casts `x` again where the adapter dtype
    differs. The seed comes from the default CPU generator, so `torch.manual_seed` / `seed_everything`
    make runs repeatable, and activation checkpointing (which restores the generator's state before
    recomputing) recomputes the same mask. `threshold=0` means no dropout (used for a bf16 base with
    fp32 adapters, where it saves the bf16 `x` instead of an fp32 copy per adapter).

    `result` (the base layer's output) is added in the same step (`addmm` when dtypes agree); its
    gradient is the incoming gradient unchanged.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                threshold: int, scaling: float) -> torch.Tensor:
        seed = draw_dropout_seed() if threshold else 0
        drop = dropout_drop_mask(x.shape, threshold, seed, x.device) if threshold else None
        keep_scale = MASK_LEVELS / (MASK_LEVELS - threshold)
        h = F.linear(dropped_input(x, drop, a.dtype), a)              # (..., r)
        if threshold:
            h.mul_(keep_scale)
        del drop
        ctx.save_for_backward(x, a, b, h)
        ctx.seed, ctx.threshold, ctx.keep_scale, ctx.scaling = seed, threshold, keep_scale, scaling
        return add_adapter_output(result, h, b, scaling)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, h = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(b.dtype)      # (tokens, out)
        grad_b = (g.T @ h.reshape(-1, h.shape[-1])).mul_(s) if ctx.needs_input_grad[3] else None
        grad_x = grad_a = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gh = (g @ b).mul_(s * ctx.keep_scale)                      # (tokens, r)
            drop = None
            if ctx.threshold:
                drop = dropout_drop_mask(x.shape, ctx.threshold, ctx.seed, x.device)
            if ctx.needs_input_grad[2]:
                flat = (-1, x.shape[-1])
                grad_a = gh.T @ dropped_input(x.reshape(flat), None if drop is None else drop.view(flat), a.dtype)
            if ctx.needs_input_grad[1]:
                # computed in x's shape, not as a view: autograd then sums it with the base path's
                # gradient in place instead of allocating a third tensor of x's size
                grad_x = gh.view(*x.shape[:-1], gh.shape[-1]) @ a
                if drop is not None:
                    grad_x.masked_fill_(drop, 0)
                grad_x = grad_x.to(x.dtype)
        return grad_out if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None
