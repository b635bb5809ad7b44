"""The fused adapter computation: one autograd function, its no-grad twin, and the dropout masks they draw.

`FusedLoRA` computes `result + scaling * (dropout(x) @ A^T) @ B^T` keeping, besides the weights, only `x`
(in its own dtype, shared by the adapters that read the same input) and the r-wide `h = A dropout(x)`.
The dropout mask is neither kept nor drawn from a private generator: the function records the state
of torch's own generator for `x`'s device before drawing (a host-side copy, no kernel, no sync) and
draws the same mask again in backward by putting that state back for the draw. So
`torch.manual_seed` / `seed_everything` repeat runs, and activation checkpointing (which restores the
generators before it recomputes) recomputes the same masks.

Two mask sources, the same operator count on every device or fewer:

- `"philox"` (CUDA): `torch.native_dropout`, one fused kernel that draws the mask from torch's Philox
  (seed, offset) and applies it with the 1/(1-p) scale; backward replays the offset and applies the
  mask to the gradient with `native_dropout_backward` (one kernel).
- `"lanes"` (CPU): the mask comes from 16-bit lanes of 64-bit `random_` draws (four per draw; about
  three times cheaper on CPU than `bernoulli_`), `p` rounded to a multiple of 1/65536; the scale is
  folded into the GEMMs' `alpha`.

Compute dtype: the products run in `AdapterCall.compute_dtype` (e.g. bf16 for a bf16 base, tensor cores,
no fp32 copy of `x`) while A and B stay in their own dtype (fp32 master weights): they are cast for
the call, and their gradients are computed in the compute dtype and returned in theirs, as
`bf16-mixed` autocast does.

Nothing here knows about modules, configs or Lightning: `lightning_lora.layers` decides when a layer
takes this path.

Example:
    >>> import torch
    >>> from lightning_lora._kernels import AdapterCall, fused_lora, dropout_threshold
    >>> dropout_threshold(0.05)
    3277
    >>> x, a, b = torch.randn(4, 8), torch.randn(2, 8), torch.zeros(3, 2)
    >>> result = torch.randn(4, 3)
    >>> torch.equal(fused_lora(result, x, a, b, AdapterCall(scaling=2.0)), result)   # B = 0: the base output
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: lane dropout masks are drawn as 16-bit uniform integers: p is used rounded to a multiple of 1/65536
MASK_LEVELS = 1 << 16
#: mask sources (see the module docstring); "auto" picks "philox" on CUDA and "lanes" elsewhere
MASK_SOURCES = ("auto", "philox", "lanes")


def dropout_threshold(p: float) -> int:
    """How many of the 65536 values of a 16-bit lane mean "drop" for dropout probability `p` (lane masks).

    The lane masks apply the drop probability `dropout_threshold(p) / 65536`, which is `p` to within
    2**-17 (0.05 -> 0.0500031), and the kept values are scaled by the exact inverse of the keep
    probability, so the expectation is kept.
    """
    return int(round(p * MASK_LEVELS))


def mask_source(device: torch.device, requested: str = "auto") -> str:
    """The mask source a call on `device` uses: `requested`, or for "auto" Philox on CUDA and lanes elsewhere.

    Example:
        >>> mask_source(torch.device("cpu")), mask_source(torch.device("cpu"), "philox")
        ('lanes', 'philox')
    """
    if requested not in MASK_SOURCES:
        raise ValueError(f"mask source {requested!r}; expected one of {MASK_SOURCES}")
    if requested != "auto":
        return requested
    return "philox" if device.type == "cuda" else "lanes"


def generator_for(device: torch.device) -> torch.Generator:
    """torch's default generator for `device` (the one `torch.manual_seed` seeds and checkpointing restores)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


@contextlib.contextmanager
def replayed(generator: torch.Generator, state: torch.Tensor) -> Iterator[None]:
    """Draw from `generator` as it was at `state`, then put its current state back (host-side copies only)."""
    now = generator.get_state()
    generator.set_state(state)
    try:
        yield
    finally:
        generator.set_state(now)


def lane_drop_mask(shape: torch.Size, threshold: int, device: torch.device) -> torch.Tensor:
    """A bool mask (True = dropped) with `threshold / 65536` of it True on average, drawn from the default
    generator of `device` (two operators: one `random_` of int64 words, read as four 16-bit lanes each,
    and one compare).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> m = lane_drop_mask(torch.Size([4, 8]), dropout_threshold(0.5), torch.device("cpu"))
        >>> m.shape, m.dtype
        (torch.Size([4, 8]), torch.bool)
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes < threshold - MASK_LEVELS // 2


_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-dim zero (`torch.where(mask, 0.0, x)` would dispatch a `scalar_tensor` per call)."""
    key = (dtype, device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros((), dtype=dtype, device=device)
    return _ZEROS[key]


def compute_dtype_for(policy: str, input_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype the adapter products run in (`LoRAConfig.adapter_compute_dtype`).

    - `"auto"`: the input's dtype when it is bfloat16 and the adapters are wider (a `bf16-true` base with
      fp32 adapters: tensor cores, as `bf16-mixed` autocast computes), else the adapters' dtype;
    - `"base"`: the input's dtype whenever it is narrower than the adapters' (also float16);
    - `"adapter"`: always the adapters' dtype (the input is cast up: fp32 products on a bf16 base).

    Example:
        >>> compute_dtype_for("auto", torch.bfloat16, torch.float32), compute_dtype_for("adapter", torch.bfloat16, torch.float32)
        (torch.bfloat16, torch.float32)
        >>> compute_dtype_for("auto", torch.float16, torch.float32), compute_dtype_for("base", torch.float16, torch.float32)
        (torch.float32, torch.float16)
    """
    if policy not in ("auto", "base", "adapter"):
        raise ValueError(f"adapter compute policy {policy!r}; expected 'auto', 'base' or 'adapter'")
    if policy == "adapter" or input_dtype == adapter_dtype or not input_dtype.is_floating_point:
        return adapter_dtype
    narrower = input_dtype.itemsize < adapter_dtype.itemsize
    if narrower and (policy == "base" or input_dtype == torch.bfloat16):
        return input_dtype
    return adapter_dtype


@dataclass(frozen=True)
class AdapterCall:
    """The non-tensor settings of one fused adapter call.

    Attributes:
        scaling: `alpha / r` (or `alpha / sqrt(r)`).
        p: dropout probability on the adapter input (0: none).
        compute_dtype: dtype of the products (None: the adapters' dtype); see `compute_dtype_for`.
        masks: mask source, `"auto"`, `"philox"` or `"lanes"` (see the module docstring).
    """

    scaling: float
    p: float = 0.0
    compute_dtype: torch.dtype | None = None
    masks: str = "auto"


# ------------------------------------------------------------------------------------------ pieces
def _mm_scaled(m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * m1 @ m2` as one GEMM (`addmm` with beta=0 ignores its uninitialised input, NaNs included)."""
    if alpha == 1.0:
        return torch.mm(m1, m2)
    return torch.addmm(m1.new_empty(m1.shape[0], m2.shape[1]), m1, m2, beta=0, alpha=alpha)


class _Mask:
    """The dropout of one call: draws `dropout(x)` in the compute dtype, and applies the same mask to an
    input gradient. `out_scale` is the factor the caller applies to `h = A dropout(x)` (the keep scale
    is inside the dropped input for Philox, folded into the GEMMs for lanes)."""

    def __init__(self, call: AdapterCall, device: torch.device) -> None:
        self.p = call.p
        self.source = mask_source(device, call.masks) if call.p > 0 else "none"
        self.threshold = dropout_threshold(call.p) if self.source == "lanes" else 0
        if self.source == "lanes":
            self.keep_scale = MASK_LEVELS / (MASK_LEVELS - self.threshold)
            self.out_scale = call.scaling * self.keep_scale
        else:
            self.keep_scale = 1.0 / (1.0 - call.p) if call.p > 0 else 1.0
            self.out_scale = call.scaling
        self.generator = generator_for(device) if self.source != "none" else None
        #: the generator's state before the draw: backward draws the same mask from it
        self.state = self.generator.get_state() if self.generator is not None else None

    def dropped(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(dropout(x) in dtype, mask)`: Philox scales the kept values by 1/(1-p), lanes leave them unscaled."""
        xc = x if x.dtype == dtype else x.to(dtype)
        if self.source == "philox":
            return torch.native_dropout(xc, self.p, True)      # (dropped and scaled, keep mask)
        if self.source == "lanes":
            drop = lane_drop_mask(x.shape, self.threshold, x.device)
            return torch.where(drop, _zero(dtype, x.device), xc), drop
        return xc, None

    def redrawn(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`dropped(x, dtype)` again, with the mask of the first draw."""
        if self.generator is None:
            return self.dropped(x, dtype)
        with replayed(self.generator, self.state):
            return self.dropped(x, dtype)

    def apply_to_grad(self, grad: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The gradient of `x` from that of `dropout(x)` (`grad`, already scaled by `out_scale`), in `dtype`."""
        if self.source == "philox":
            grad = torch.ops.aten.native_dropout_backward(grad, mask.view(grad.shape), self.keep_scale)
        elif self.source == "lanes":
            grad = grad.masked_fill_(mask.view(grad.shape), 0)
        return grad if grad.dtype == dtype else grad.to(dtype)


def _adapter_output(result: torch.Tensor, h: torch.Tensor, bc: torch.Tensor, alpha: float) -> torch.Tensor:
    """`result + alpha * h @ bc^T`: one `addmm` when the dtypes agree. Else (fp32 products on a bf16 base) on
    CUDA one mixed-dtype `add` (the sum in fp32, rounded once into `result`'s dtype); on CPU, whose mixed-dtype
    kernels are not vectorized (several times slower there), the product cast down and added (two roundings)."""
    flat = result.reshape(-1, result.shape[-1])
    if result.dtype == h.dtype:
        return torch.addmm(flat, h, bc.t(), alpha=alpha).view(result.shape)
    y = _mm_scaled(h, bc.t(), alpha)
    if flat.device.type == "cuda":
        out = torch.add(flat, y, out=torch.empty_like(flat))
    else:
        out = flat + y.to(flat.dtype)
    return out.view(result.shape)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def check_mask_replay(device: torch.device | str, masks: str = "auto") -> str:
    """Check on `device` that a dropout mask drawn again from the recorded generator state is the mask of the
    first draw, and that the generator goes on from where the draws had taken it; returns the mask source.

    A self-test for a new device or torch version (the benchmark runs it on CUDA before timing anything).

    Raises:
        RuntimeError: the replayed mask or the generator state differs.

    Example:
        >>> check_mask_replay("cpu"), check_mask_replay("cpu", "philox")
        ('lanes', 'philox')
    """
    device = torch.device(device)
    x = torch.randn(64, 257, device=device)     # an odd size: the last lanes word / Philox vector is partial
    mask = _Mask(AdapterCall(1.0, 0.1, masks=masks), device)
    first, _ = mask.dropped(x, x.dtype)
    after = mask.generator.get_state()
    again, _ = mask.redrawn(x, x.dtype)
    if not torch.equal(first, again):
        raise RuntimeError(f"dropout mask replay ({mask.source}) on {device} drew another mask; the fused dropout "
                           "path cannot be used here: set LoRALayer.dropout_masks or report the torch version")
    if not torch.equal(mask.generator.get_state(), after):
        raise RuntimeError(f"dropout mask replay ({mask.source}) on {device} did not restore the generator state")
    return mask.source


def fused_lora(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               call: AdapterCall) -> torch.Tensor:
    """What `FusedLoRA` computes, without autograd (inference, `no_grad`): `result + scaling * B A dropout(x)`.

    Draws its dropout mask as `FusedLoRA` does, so a `no_grad` forward (the first pass of reentrant
    activation checkpointing) and the recomputation with grad drop alike.
    """
    cd = call.compute_dtype or a.dtype
    mask = _Mask(call, x.device)
    xd, _ = mask.dropped(x, cd)
    h = torch.mm(xd.reshape(-1, x.shape[-1]), _cast(a, cd).t())
    return _adapter_output(result, h, _cast(b, cd), mask.out_scale)


class FusedLoRA(torch.autograd.Function):
    """`result + scaling * (dropout(x) @ A^T) @ B^T` with a memory-lean backward and few operators.

    Args (of `apply`):
        result: the base layer's output (..., out), computed from `x` or, when `base_weight` is given,
            from `x.detach()`.
        x: the layer input (..., in).
        a: A (r, in); b: B (out, r), possibly in a wider dtype than `x` (fp32 adapters on a bf16 base).
        base_weight: None, or the base weight as an (out, in) matrix (`result = x @ base_weight^T + bias`):
            then the base path's input gradient `g @ base_weight` is computed here, fused into this
            function's own (one `addmm` instead of a `mm` in the base's backward plus the `add` that sums
            the two), and the caller gives the base `x.detach()`.
        call: `AdapterCall` (scaling, dropout p, compute dtype, mask source).

    Returns (..., out) in `result`'s dtype.

    Autograd around `lora_B(lora_A(nn.Dropout(x)))` keeps, per adapted layer, the dropout mask and the
    dropped-out input (the size of `x`, in the adapter dtype: an fp32 copy when the base runs in bf16).
    This function keeps only `x` itself, in its own dtype, the small `h = A dropout(x)` (r columns), A
    and B in the compute dtype (r-wide) and the generator state of its mask (a few bytes on CUDA);
    backward draws the mask again (see the module docstring).

    Operators per call (x needing a gradient, one dtype, base gradient fused), forward / backward, where
    one backward GEMM replaces the base layer's own input-gradient GEMM (so above the frozen base it is one
    fewer): lane masks 5 / 9 (`random_`, `lt`, `where`, `mm`, `addmm` / `random_`, `lt`, `where`, five
    GEMMs with the scales as `alpha`, `masked_fill_`); Philox masks 3 / 7 (`native_dropout`, `mm`, `addmm` /
    `native_dropout`, five GEMMs, `native_dropout_backward`); no dropout 2 / 5. A bf16 compute dtype with
    fp32 adapters adds the casts of A and B in forward and of their gradients in backward (2 / 2).
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                base_weight: torch.Tensor | None, call: AdapterCall) -> torch.Tensor:
        cd = call.compute_dtype or a.dtype
        mask = _Mask(call, x.device)
        ac, bc = _cast(a, cd), _cast(b, cd)
        xd, _ = mask.dropped(x, cd)
        h = torch.mm(xd.reshape(-1, x.shape[-1]), ac.t())          # (tokens, r)
        del xd
        ctx.save_for_backward(x, ac, bc, h, base_weight)
        ctx.mask, ctx.cd, ctx.a_dtype, ctx.b_dtype = mask, cd, a.dtype, b.dtype
        return _adapter_output(result, h, bc, mask.out_scale)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, ac, bc, h, base_weight = ctx.saved_tensors
        mask: _Mask = ctx.mask
        cd, alpha = ctx.cd, mask.out_scale
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        g_out = grad_out.reshape(-1, grad_out.shape[-1])               # (tokens, out), result's dtype
        g = _cast(g_out, cd)
        grad_b = grad_x = grad_a = None
        if need_b:
            grad_b = _cast(_mm_scaled(g.t(), h, alpha), ctx.b_dtype)      # (out, r)
        if need_x or need_a:
            gh = _mm_scaled(g, bc, alpha)                                 # (tokens, r): d loss / d (A dropout(x))
            xd, drop = mask.redrawn(x, cd) if need_a or mask.source != "none" else (None, None)
            if need_a:
                grad_a = _cast(torch.mm(gh.t(), xd.reshape(-1, x.shape[-1])), ctx.a_dtype)
            del xd
            if need_x:
                gx = mask.apply_to_grad(torch.mm(gh, ac), drop, x.dtype)   # (tokens, in)
                if base_weight is not None:                               # + the base path's g @ W
                    gx = torch.addmm(gx, g_out, base_weight)
                # a plain tensor in x's shape (not a view): autograd can sum it in place with x's other gradients
                grad_x = torch.ops.aten._unsafe_view(gx, x.shape)
        return grad_out if need_result else None, grad_x, grad_a, grad_b, None, None
