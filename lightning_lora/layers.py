"""Adapter layers: `LoRALinear`, `LoRAConv1D` (transformers' GPT-2 style) and `LoRAEmbedding`.

Each adapter layer *is* the base layer plus two small matrices. It registers the base layer's own
parameters under their own names (`weight`, `bias`), so an injected model's state dict is the base
model's plus `<module>.lora_A.weight` and `<module>.lora_B.weight` (PEFT's names), and it computes

    h = base(x) + scaling * B(A(dropout(x)))

with the adapter input cast to the adapter dtype and the adapter output cast back. B starts at
zero, so an injected model computes exactly what the base model computes.

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

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers is a dependency, but keep the layers importable without it
    from transformers.pytorch_utils import Conv1D as HFConv1D
except Exception:  # pragma: no cover
    HFConv1D = None  # type: ignore[assignment,misc]


class LoRALayer(nn.Module):
    """Base class of the adapter layers. Holds the base layer's parameters and A, B.

    Subclasses say how the base computes (`base_forward`), how the adapter computes
    (`adapter_forward`) and how `B @ A` maps onto the base weight's layout (`delta_weight`).
    """

    base_cls: type[nn.Module]
    #: the base module's plain attributes that its forward needs (e.g. `in_features`)
    _base_attrs: tuple[str, ...] = ()

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
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"r={r} is invalid; expected an integer > 0.")
        self.base_cls = type(base)
        for key in self._base_attrs:
            setattr(self, key, getattr(base, key))
        # Register the very same Parameter/buffer objects: no copy, keys unchanged.
        for key, param in base._parameters.items():
            self.register_parameter(key, param)
        for key, buf in base._buffers.items():
            self.register_buffer(key, buf, persistent=key not in base._non_persistent_buffers_set)

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
        self.reset_lora_parameters(init)
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
        return super()._apply(fn, recurse=False)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A random (`kaiming`: kaiming-uniform as PEFT; `gaussian`: N(0, 1/r) as the paper), B zero."""
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            raise ValueError(f"init={init!r} is invalid; expected 'kaiming' or 'gaussian'.")
        nn.init.zeros_(self.lora_B.weight)

    # ------------------------------------------------------------------ compute
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the base layer computes (its own class's forward, on our registered parameters)."""
        return self.base_cls.forward(self, x)  # type: ignore[arg-type]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`scaling * B(A(dropout(x)))` in the adapter dtype, through the `lora_A`/`lora_B` modules."""
        a = self.lora_A.weight
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    #: whether `forward` may compute the adapter with the fused paths below (A: (r, in), B: (out, r))
    _fusable = False

    def _fused_path(self, x: torch.Tensor) -> str | None:
        """Which fused adapter path `forward` takes: "dropout" or "cast" (`_FusedLoRA` with and without
        dropout), "addmm" (adapter dtype = input dtype, no dropout), or None (the plain modules).

        The fused paths compute what `adapter_forward` computes (the dropout path with its own masks),
        and are skipped where they could change behaviour: hooks on the adapter modules, autocast,
        a subclassed dropout, devices other than CPU/CUDA, and inside `torch.compile` (which fuses the
        plain path itself).
        """
        if not self._fusable or not x.is_floating_point() or x.device.type not in ("cpu", "cuda"):
            return None
        drop = self.lora_dropout
        if (self.lora_A._forward_hooks or self.lora_A._forward_pre_hooks or self.lora_B._forward_hooks
                or self.lora_B._forward_pre_hooks or drop._forward_hooks or drop._forward_pre_hooks
                or torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling()):
            return None
        if isinstance(drop, nn.Identity) or not drop.training:
            if x.dtype == self.lora_A.weight.dtype:
                return "addmm"
            # a bf16 base with fp32 adapters: with autograd, keep x (bf16) rather than fp32 copies
            return "cast" if torch.is_grad_enabled() else None
        if type(drop) is nn.Dropout and 0 < dropout_threshold(drop.p) < _MASK_LEVELS:
            return "dropout"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged or not self.lora_enabled:
            return result
        path = self._fused_path(x)
        if path in ("dropout", "cast"):
            threshold = dropout_threshold(self.lora_dropout.p) if path == "dropout" else 0
            return _FusedLoRA.apply(result, x, self.lora_A.weight, self.lora_B.weight, threshold, self.scaling)
        if path == "addmm" and result.dtype == x.dtype:
            # result + scaling * (x A^T) B^T in one kernel; its backward scales only the small tensors
            return _add_adapter_output(result, F.linear(x, self.lora_A.weight), self.lora_B.weight, self.scaling)
        return result + self.adapter_forward(x).to(result.dtype)

    # ------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in float32, in the layout of the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (delta in float32, written in the weight's dtype)."""
        if self.merged:
            return
        w = self.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` (exact in float32, within rounding in bf16/fp16)."""
        if not self.merged:
            return
        w = self.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def to_base_module(self) -> nn.Module:
        """A plain module of the base type holding this layer's (possibly merged) parameters."""
        base = self.base_cls.__new__(self.base_cls)
        nn.Module.__init__(base)
        for key in self._base_attrs:
            setattr(base, key, getattr(self, key))
        for key, param in self._parameters.items():
            base.register_parameter(key, param)
        for key, buf in self._buffers.items():
            base.register_buffer(key, buf, persistent=key not in self._non_persistent_buffers_set)
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        return (f"base={self.base_cls.__name__}, r={self.r}, alpha={self.lora_alpha:g}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


#: dropout masks are drawn as 16-bit uniform integers: p is used rounded to a multiple of 1/65536
_MASK_LEVELS = 1 << 16


def dropout_threshold(p: float) -> int:
    """How many of the 65536 values of a 16-bit lane mean "drop" for dropout probability `p`.

    The adapter path draws its dropout masks from 16-bit random lanes (four per 64-bit draw; with the
    compare about three times cheaper on CPU than `bernoulli_`), so the drop probability it applies is
    `dropout_threshold(p) / 65536`, which is `p` to within 2**-17 (0.05 -> 0.0500031), and the
    kept values are scaled by the exact inverse of the keep probability, so the expectation is kept.
    """
    return int(round(p * _MASK_LEVELS))


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
    return lanes < threshold - _MASK_LEVELS // 2


def _dropped_input(x: torch.Tensor, drop: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` with the dropped entries zeroed (unscaled), never writing into `x` itself."""
    xd = x.to(dtype)
    if drop is None:
        return xd
    return xd.masked_fill_(drop, 0) if xd.dtype != x.dtype else torch.where(drop, 0.0, xd)


def _add_adapter_output(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`result + scaling * h B^T`: one `addmm` when the dtypes agree, else computed in B's dtype and cast."""
    if result.dtype != b.dtype:
        return result + F.linear(h, b).mul_(scaling).to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
    return out.view(result.shape)


class _FusedLoRA(torch.autograd.Function):
    """`result + scaling * (dropout(x) @ A^T) @ B^T` with a memory-lean backward.

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
        keep_scale = _MASK_LEVELS / (_MASK_LEVELS - threshold)
        h = F.linear(_dropped_input(x, drop, a.dtype), a)              # (..., r)
        if threshold:
            h.mul_(keep_scale)
        del drop
        ctx.save_for_backward(x, a, b, h)
        ctx.seed, ctx.threshold, ctx.keep_scale, ctx.scaling = seed, threshold, keep_scale, scaling
        return _add_adapter_output(result, h, b, scaling)

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
                grad_a = gh.T @ _dropped_input(x.reshape(flat), None if drop is None else drop.view(flat), a.dtype)
            if ctx.needs_input_grad[1]:
                # computed in x's shape, not as a view: autograd then sums it with the base path's
                # gradient in place instead of allocating a third tensor of x's size
                grad_x = gh.view(*x.shape[:-1], gh.shape[-1]) @ a
                if drop is not None:
                    grad_x.masked_fill_(drop, 0)
                grad_x = grad_x.to(x.dtype)
        return grad_out if ctx.needs_input_grad[0] else None, grad_x, grad_a, grad_b, None, None


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

    def __init__(self, base: nn.Module, r: int, alpha: float, **kwargs: Any) -> None:
        in_features, out_features = base.weight.shape
        super().__init__(base, in_features, out_features, r, alpha, **kwargs)

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T


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


def adapter_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The adapter class for a module, or None if the module's type cannot take an adapter."""
    if isinstance(module, LoRALayer):
        return None
    if isinstance(module, nn.Linear):
        return LoRALinear
    if HFConv1D is not None and isinstance(module, HFConv1D):
        return LoRAConv1D
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    return None


SUPPORTED_TYPES = "nn.Linear, transformers Conv1D, nn.Embedding"
