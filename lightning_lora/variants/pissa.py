"""PiSSA and OLoRA initialisation: A and B taken from the base weight, the base replaced by the residual.

The math (`pissa`, `olora`, `residual`, `to_plain_lora`, ...) and the variant object `BaseChangingInit`
that a layer with such an `init` resolves.

With `LoRAConfig(init="pissa")` (Meng et al. 2024) an adapter of rank r starts from the r principal
singular triplets of its base weight `W` (out x in, `W = U S V^T`):

    A0 = sqrt(S_r / scaling) V_r^T      B0 = U_r sqrt(S_r / scaling)      W_res = W - scaling * B0 A0

`"pissa_niter_N"` takes the triplets from `torch.svd_lowrank` with N subspace iterations (fast, and
deterministic here: it draws its random start from a generator seeded with 0, not from the global
RNG). `init="olora"` (Büyükakyüz 2024) uses the QR decomposition `W = Q R`: `B0 = Q[:, :r]`,
`A0 = R[:r]`. These are PEFT's formulas (`init_lora_weights="pissa" | "pissa_niter_N" | "olora"`).

The base weight is replaced by `W_res` in its own dtype, so the injected model computes
`W_res x + scaling * B0 A0 x`, which is `W x` within float rounding. Each such layer also keeps
`A0` and `B0` as buffers (`lora_init_A`, `lora_init_B`), which adapter-only checkpoints hold next to
A and B, so nothing that leaves the process needs the residual base:

* `save_adapter` / export write the plain LoRA delta against the original W (PEFT's
  `path_initial_model_for_weight_conversion`): `[A; A0]` and `[B, -B0]` at rank 2r, alpha doubled
  (times sqrt(2) with rsLoRA), so the scaling and the function are unchanged (`to_plain_lora`);
* loading a checkpoint recomputes `W_res` from the original W and the recorded `A0, B0`;
* `unload` puts `W_res + scaling * B0 A0` back, and `disable_lora` adds `scaling * B0 A0 x`.

Example:
    >>> import torch
    >>> w = torch.randn(6, 4)
    >>> a, b = pissa(w, r=2, scaling=2.0)
    >>> s = torch.linalg.svdvals(w)
    >>> torch.allclose(torch.linalg.svdvals(w - 2.0 * b @ a)[:2], s[2:], atol=1e-5)   # the residual's spectrum
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.errors import LoRAConfigError, LoRAError
from lightning_lora.variants.base import ExtraTensor, LoRAVariant, label

#: seed of the random start of `torch.svd_lowrank` for "pissa_niter_N" (deterministic injections)
SVD_LOWRANK_SEED = 0
_NITER = re.compile(r"pissa_niter_(\d+)")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_skip_base_init: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_lora_skip_base_init", default=False)


def is_base_changing(init: str) -> bool:
    """Whether `init` takes A, B from the weight and leaves the residual as the base.

    Example:
        >>> is_base_changing("pissa_niter_16"), is_base_changing("olora"), is_base_changing("kaiming")
        (True, True, False)
    """
    return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None


def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A0, B0)` from the r principal singular triplets of `weight` (out x in), in float32.

    `scaling * B0 @ A0` is the best rank-r approximation of `weight`. `niter=None` uses the full SVD
    (`torch.linalg.svd`), an integer the randomized `torch.svd_lowrank(q=r, niter=niter)` with a
    random start drawn from a generator seeded with `SVD_LOWRANK_SEED` (the global RNG is not used).

    Example:
        >>> w = torch.diag(torch.tensor([4.0, 1.0]))
        >>> a, b = pissa(w, r=1, scaling=1.0)
        >>> (b @ a).abs().tolist()
        [[4.0, 0.0], [0.0, 0.0]]
    """
    w = weight.detach().to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        on = w if w.device.type in ("cpu", "cuda") else w.cpu()
        with torch.random.fork_rng(devices=[on.device] if on.device.type == "cuda" else []):
            if on.device.type == "cuda":
                torch.cuda.default_generators[on.device.index or 0].manual_seed(SVD_LOWRANK_SEED)
            else:
                torch.default_generator.manual_seed(SVD_LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(on, q=r, niter=niter)
        u, s, vh = u.to(w.device), s.to(w.device), v.T.to(w.device)
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def olora(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A0, B0) = (R[:r], Q[:, :r])` of the QR decomposition of `weight` (out x in), in float32.

    As in PEFT, the scaling is not divided out: the residual is `W - scaling * B0 A0`.

    Example:
        >>> a, b = olora(torch.eye(3), r=2)
        >>> tuple(a.shape), tuple(b.shape)
        ((2, 3), (3, 2))
    """
    q, rr = torch.linalg.qr(weight.detach().to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def init_adapters(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A0, B0)` in float32 for a base-changing `init` and a weight in (out, in) layout.

    Raises:
        LoRAError: the weight is not a plain floating-point tensor (e.g. quantized), or `r` exceeds
            `min(out, in)`.

    Example:
        >>> a, b = init_adapters("olora", torch.eye(4), r=2, scaling=1.0)
        >>> tuple(a.shape), tuple(b.shape)
        ((2, 4), (4, 2))
    """
    check_weight(init, weight, r)
    if init == "olora":
        return olora(weight, r)
    m = _NITER.fullmatch(init)
    return pissa(weight, r, scaling, niter=int(m.group(1)) if m else None)


def check_weight(init: str, weight: torch.Tensor, r: int, name: str | None = None) -> None:
    """Raise a `LoRAError` when `init` cannot be computed from `weight` (quantized, or r too large).

    Example:
        >>> check_weight("pissa", torch.zeros(2, 2, dtype=torch.int8), 1)
        Traceback (most recent call last):
        lightning_lora.errors.LoRAError: init='pissa' needs a floating-point base weight, got torch.int8 (Tensor); PiSSA/OLoRA cannot start from a quantized base: use init='kaiming', or inject before quantizing.
    """
    if weight.dtype not in _FLOAT_DTYPES or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        raise LoRAError(f"init={init!r} needs a floating-point base weight, got {weight.dtype} "
                        f"({type(weight).__name__}); PiSSA/OLoRA cannot start from a quantized base: use "
                        "init='kaiming', or inject before quantizing.")
    if r > min(weight.shape):
        where = f" of {name}" if name else ""
        raise LoRAError(f"init={init!r} with r={r} needs r <= min(out, in) = {min(weight.shape)} for the weight{where} "
                        f"(shape {tuple(weight.shape)}); lower r, or give this module a smaller rank with rank_pattern.")


def residual(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scaling: float,
             transposed: bool = False) -> torch.Tensor:
    """`weight - (scaling * B0) @ A0` computed in float32 (PEFT's order of operations) and returned in
    `weight`'s dtype (one rounding).

    `transposed`: `weight` is stored as (in, out) (transformers' `Conv1D`).

    Example:
        >>> w = torch.ones(2, 2)
        >>> residual(w, torch.ones(1, 2), torch.ones(2, 1), 0.5).tolist()
        [[0.5, 0.5], [0.5, 0.5]]
    """
    delta = (scaling * b0.to(device=weight.device, dtype=torch.float32)) @ a0.to(device=weight.device,
                                                                                 dtype=torch.float32)
    if transposed:
        delta = delta.T
    return (weight.detach().to(torch.float32) - delta).to(weight.dtype)


def to_plain_lora(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor,
                  b0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r plain LoRA factors of `B A - B0 A0`: `([A; A0], [B, -B0])`.

    With the scaling kept (alpha doubled for rank 2r, see `converted_alpha`), they applied to the
    original W compute what A, B compute on the residual base `W - scaling * B0 A0`.

    Example:
        >>> a, b, a0, b0 = torch.randn(2, 5), torch.randn(3, 2), torch.randn(2, 5), torch.randn(3, 2)
        >>> a2, b2 = to_plain_lora(a, b, a0, b0)
        >>> torch.allclose(b2 @ a2, b @ a - b0 @ a0, atol=1e-6), tuple(a2.shape)
        (True, (4, 5))
    """
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1)


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps the scaling when the rank doubles: `2 alpha`, or `sqrt(2) alpha` with rsLoRA.

    Example:
        >>> converted_alpha(16.0, False), round(converted_alpha(16.0, True), 4)
        (32.0, 22.6274)
    """
    return alpha * (math.sqrt(2.0) if use_rslora else 2.0)


@contextlib.contextmanager
def skip_base_init() -> Iterator[None]:
    """Inside the block, adapter layers with a base-changing `init` neither compute A0, B0 nor change the
    base weight (their `lora_init_A/B` buffers start at zero): for a base that already is the residual
    (re-injecting merged adapters) or has no values (the meta device), with A0, B0 loaded afterwards.

    Example:
        >>> with skip_base_init():
        ...     base_init_skipped()
        True
    """
    token = _skip_base_init.set(True)
    try:
        yield
    finally:
        _skip_base_init.reset(token)


def base_init_skipped() -> bool:
    """Whether the calling code runs inside `skip_base_init()`.

    Example:
        >>> base_init_skipped()
        False
    """
    return _skip_base_init.get()


class BaseChangingInit(LoRAVariant):
    """The variant of `LoRAConfig(init="pissa" | "pissa_niter_N" | "olora")`: A = A0, B = B0 from the base
    weight, which becomes `W - scaling * B0 A0`; A0, B0 are kept on the layer as the buffers `lora_init_A`
    / `lora_init_B` (our checkpoints only; PEFT files get the plain-LoRA conversion, `peft_conversion`).
    Inside `skip_base_init()`, and on the meta device, the buffers start at zero and the weight is left as it is.

    Example:
        >>> v = BaseChangingInit.from_config(init="olora")
        >>> v.option(), [(t.name, t.shape, t.peft_key) for t in v.extra_tensors(16, 8, 4)]
        ("init='olora'", [('lora_init_A', (4, 16), None), ('lora_init_B', (8, 4), None)])
    """

    name: ClassVar[str] = "pissa"
    title: ClassVar[str] = "PiSSA/OLoRA"
    config_fields: ClassVar[tuple[str, ...]] = ("init",)
    example: ClassVar[dict[str, Any]] = {"init": "pissa"}
    sets_adapters: ClassVar[bool] = True

    def __init__(self, init: str) -> None:
        #: the `init` value ("pissa", "pissa_niter_N", "olora")
        self.kind = init

    @classmethod
    def from_config(cls, **fields: Any) -> BaseChangingInit | None:
        init = fields.get("init", "kaiming")
        return cls(init) if is_base_changing(init) else None

    def option(self) -> str:
        return f"init={self.kind!r}"

    def unsupported_error(self, base: nn.Module | type) -> LoRAConfigError:
        return LoRAConfigError(f"init={self.kind!r} cannot initialise an {label(base)} adapter ({base}): PiSSA/OLoRA are "
                               "implemented for Linear and Conv1D layers (as in PEFT). Leave the embedding out of "
                               "target_modules, or use init='kaiming'.")

    def check_target(self, name: str, module: nn.Module, r: int) -> None:
        check_weight(self.kind, module.weight, r, name=name)

    def extra_tensors(self, in_features: int, out_features: int, r: int) -> tuple[ExtraTensor, ...]:
        return (ExtraTensor("lora_init_A", (r, in_features), None, False),
                ExtraTensor("lora_init_B", (out_features, r), None, False))

    @torch.no_grad()
    def init(self, layer: Any, dtype: torch.dtype) -> None:
        a, b = layer.lora_A.weight, layer.lora_B.weight
        if base_init_skipped() or layer.weight.device.type == "meta":  # no values to decompose
            a0, b0 = torch.zeros_like(a), torch.zeros_like(b)
        else:
            a0, b0 = init_adapters(self.kind, layer.weight_oi(), layer.r, layer.scaling)
            a0, b0 = a0.to(device=a.device, dtype=dtype), b0.to(device=b.device, dtype=dtype)
            layer.weight.copy_(residual(layer.weight, a0, b0, layer.scaling, layer.fan_in_fan_out))
        a.copy_(a0)
        b.copy_(b0)
        layer.register_buffer("lora_init_A", a0.clone())
        layer.register_buffer("lora_init_B", b0.clone())

    def load_state(self, layer: Any, state_dict: dict[str, Any], prefix: str) -> None:
        a0, b0 = state_dict.get(prefix + "lora_init_A"), state_dict.get(prefix + "lora_init_B")
        if a0 is not None and b0 is not None:
            load_init_adapters(layer, a0, b0)

    @torch.no_grad()
    def restore_base(self, layer: Any) -> None:
        if layer.merged:
            layer.unmerge()
        layer.weight.copy_(residual(layer.weight, layer.lora_init_A, -layer.lora_init_B, layer.scaling,
                                    layer.fan_in_fan_out))
        layer.lora_init_A.zero_()
        layer.lora_init_B.zero_()

    def disabled_forward(self, layer: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result + scaling * B0 A0 x`: the original base function, not the residual's."""
        a0 = layer.lora_init_A
        h = F.linear(x.to(a0.dtype), a0)
        return result + F.linear(h, layer.lora_init_B).mul_(layer.scaling).to(result.dtype)

    def peft_conversion(self, a: torch.Tensor, b: torch.Tensor, extras: dict[str, torch.Tensor], alpha: float,
                        use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        a2, b2 = to_plain_lora(a, b, extras["lora_init_A"], extras["lora_init_B"])
        return a2, b2, converted_alpha(alpha, use_rslora)

    def extra_repr(self) -> str:
        return f", init={self.kind!r}"


@torch.no_grad()
def load_init_adapters(layer: Any, a0: torch.Tensor, b0: torch.Tensor) -> None:
    """Take A0, B0 recorded by the run that trained this adapter (PiSSA / OLoRA layers only): the base
    weight of `layer` becomes `W - scaling * B0 A0` for them. The same A0, B0 change nothing (bit for
    bit); others (computed on another device, say) are swapped within one float rounding of the weight.

    Raises:
        LoRAError: a layer without a base-changing init, or a merged one.

    Example:
        >>> from lightning_lora.layers import LoRALinear
        >>> layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, init="olora")
        >>> load_init_adapters(layer, layer.lora_init_A.clone(), layer.lora_init_B.clone())   # the same: a no-op
    """
    if getattr(layer, "lora_init_A", None) is None:
        raise LoRAError(f"This {type(layer).__name__} was not built with a PiSSA/OLoRA init (init={layer.init!r}); "
                        "it has no initial adapters to load.")
    cur_a, cur_b = layer.lora_init_A, layer.lora_init_B
    a0 = a0.to(device=cur_a.device, dtype=cur_a.dtype)
    b0 = b0.to(device=cur_b.device, dtype=cur_b.dtype)
    if a0.shape != cur_a.shape or b0.shape != cur_b.shape:
        return  # left to the strict shape checks of the caller
    if torch.equal(a0, cur_a) and torch.equal(b0, cur_b):
        return
    if layer.merged:
        raise LoRAError("Cannot load PiSSA/OLoRA initial adapters into a merged layer; unmerge it first.")
    w, t = layer.weight, layer.fan_in_fan_out
    w.copy_(residual(residual(w, cur_a, -cur_b, layer.scaling, t), a0, b0, layer.scaling, t))
    cur_a.copy_(a0)
    cur_b.copy_(b0)


__all__ = ["SVD_LOWRANK_SEED", "BaseChangingInit", "base_init_skipped", "check_weight", "converted_alpha",
           "init_adapters", "is_base_changing", "load_init_adapters", "olora", "pissa", "residual", "skip_base_init",
           "to_plain_lora"]
