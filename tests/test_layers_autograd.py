"""The fused adapter paths of `LoRALinear`/`LoRAConv1D`: `FusedLoRA` (dropout > 0 in training, or a bf16
base with fp32 adapters) with its custom backward and regenerated masks, and the `addmm` path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lightning_lora._kernels import FusedLoRA
from lightning_lora._kernels import draw_dropout_seed, dropout_drop_mask, dropout_threshold
from lightning_lora.layers import AdapterPath, LoRAConv1D, LoRALinear


def _seeded(fn, seed: int = 0):
    """`fn` with the default generator reset before each call: gradcheck calls it many times."""
    def wrapped(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return wrapped


# ------------------------------------------------------------------------------------------- masks
def test_threshold_rounds_p_to_multiples_of_2_to_the_minus_16():
    assert dropout_threshold(0.05) == 3277 and dropout_threshold(0.1) == 6554 and dropout_threshold(0.5) == 32768
    assert abs(dropout_threshold(0.05) / 65536 - 0.05) < 2 ** -17
    assert dropout_threshold(1e-6) == 0            # too small to draw: the plain nn.Dropout path takes it
    x = torch.randn(3, 8)
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dropout=1e-6).train()
    assert layer._fused_path(x) is AdapterPath.MODULES


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_drop_mask_rate_is_p_in_every_lane(p):
    """The mask comes from 16-bit lanes of 64-bit draws: each of the four lane positions must drop at rate p."""
    thr = dropout_threshold(p)
    drop = dropout_drop_mask(torch.Size([1000, 1024]), thr, seed=123, device=torch.device("cpu"))
    assert drop.dtype is torch.bool and drop.shape == (1000, 1024)
    n = drop.numel() // 4
    sigma = (p * (1 - p) / n) ** 0.5
    for lane in range(4):
        rate = drop.reshape(-1)[lane::4].float().mean().item()
        assert abs(rate - thr / 65536) < 5 * sigma, (lane, rate)


def test_drop_mask_is_a_function_of_the_seed():
    shape, dev = torch.Size([7, 33]), torch.device("cpu")
    assert torch.equal(dropout_drop_mask(shape, 20000, 5, dev), dropout_drop_mask(shape, 20000, 5, dev))
    assert not torch.equal(dropout_drop_mask(shape, 20000, 5, dev), dropout_drop_mask(shape, 20000, 6, dev))
    torch.manual_seed(0)
    s1, s2 = draw_dropout_seed(), draw_dropout_seed()
    torch.manual_seed(0)
    assert (draw_dropout_seed(), draw_dropout_seed()) == (s1, s2) and s1 != s2


# ------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6)])
def test_gradcheck_float64(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    result = torch.randn(*shape[:-1], 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    f = _seeded(lambda result, x, a, b: FusedLoRA.apply(result, x, a, b, dropout_threshold(0.3), 1.7))
    assert torch.autograd.gradcheck(f, (result, x, a, b), eps=1e-6, atol=1e-5)


def test_gradcheck_float64_only_some_inputs_need_grad():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    result = torch.randn(4, 5, dtype=torch.float64)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    f = _seeded(lambda a, b: FusedLoRA.apply(result, x, a, b, dropout_threshold(0.5), 2.0))
    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------- vs reference
def _reference(layer, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Plain autograd with the mask the fused path draws for `seed`."""
    drop = dropout_drop_mask(x.shape, dropout_threshold(layer.lora_dropout.p), seed, x.device)
    keep_scale = 65536 / (65536 - dropout_threshold(layer.lora_dropout.p))
    xd = x.to(layer.lora_A.weight.dtype).masked_fill(drop, 0) * keep_scale
    return layer.base_forward(x) + (layer.lora_B(layer.lora_A(xd)) * layer.scaling).to(x.dtype)


@pytest.mark.parametrize("cls", [LoRALinear, LoRAConv1D])
def test_matches_plain_autograd_with_the_same_mask(cls):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if cls is LoRALinear else Conv1D(10, 12)
    layer = cls(base, r=4, alpha=8, dropout=0.25).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 7, 12, requires_grad=True)
    assert layer._fused_path(x) is AdapterPath.DROPOUT
    params = (x, layer.lora_A.weight, layer.lora_B.weight, layer.bias)

    torch.manual_seed(5)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    torch.manual_seed(5)
    ref = _reference(layer, x, draw_dropout_seed())
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    assert out.grad_fn.name() == "FusedLoRABackward"
    # the same products, summed and scaled in another order (1/(1-p) is applied to the r-wide h)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    # dropout really drops: the same input gives another output on the next call
    assert not torch.allclose(layer(x), out)


def test_bf16_base_fp32_adapter_gradients():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, alpha=8, dropout=0.1).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    gx, ga = torch.autograd.grad(out.float().sum(), (x, layer.lora_A.weight))
    torch.manual_seed(1)
    ref = _reference(layer, x, draw_dropout_seed())
    rx, ra = torch.autograd.grad(ref.float().sum(), (x, layer.lora_A.weight))
    assert out.dtype is torch.bfloat16 and gx.dtype is torch.bfloat16 and ga.dtype is torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gx, rx)


def test_expectation_is_kept():
    """Kept values are scaled by 1 / keep-probability: the mean adapter output equals the dropout-free one."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64, bias=False), r=4, alpha=4, dropout=0.3).train()
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_B.weight.normal_()
    x = torch.randn(1, 64).expand(20000, 64).contiguous()
    with torch.no_grad():
        mean = layer(x).mean(0)
        exact = layer.eval()(x[:1])[0]
    assert torch.allclose(mean, exact, atol=0.03 * exact.abs().max().item())


def test_no_grad_forward_draws_the_same_mask():
    """Reentrant activation checkpointing runs the forward under no_grad, then again with grad: both must drop alike."""
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 8)
    torch.manual_seed(7)
    with torch.no_grad():
        a = layer(x)
    torch.manual_seed(7)
    b = layer(x.requires_grad_())
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_mask(use_reentrant):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 8, requires_grad=True)
    params = (x, layer.lora_A.weight, layer.lora_B.weight)

    def grads(fn) -> list[torch.Tensor]:
        torch.manual_seed(3)
        fn(x).square().sum().backward()      # .backward(): reentrant checkpointing refuses autograd.grad
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    plain = grads(layer)
    ckpt = grads(lambda x: checkpoint(layer, x, use_reentrant=use_reentrant))
    for g, r in zip(ckpt, plain):
        torch.testing.assert_close(g, r)


def test_paths_taken():
    x = torch.randn(2, 4)
    assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.0).train()._fused_path(x) is AdapterPath.ADDMM
    assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).eval()._fused_path(x) is AdapterPath.ADDMM
    with torch.no_grad():
        assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).train()._fused_path(x) is AdapterPath.DROPOUT
    hooked = LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).train()
    hooked.lora_A.register_forward_hook(lambda *a: None)
    assert hooked._fused_path(x) is AdapterPath.MODULES
    # a bf16 base with fp32 adapters: the cast-saving function with autograd, the modules without
    assert LoRALinear(nn.Linear(4, 4).bfloat16(), r=2, alpha=2)._fused_path(x.bfloat16()) is AdapterPath.CAST
    with torch.no_grad():
        assert LoRALinear(nn.Linear(4, 4).bfloat16(), r=2, alpha=2)._fused_path(x.bfloat16()) is AdapterPath.MODULES
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).train()._fused_path(x) is AdapterPath.MODULES


@pytest.mark.parametrize("cls", [LoRALinear, LoRAConv1D])
def test_addmm_path_matches_the_modules(cls):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if cls is LoRALinear else Conv1D(10, 12)
    layer = cls(base, r=4, alpha=8).train()
    x = torch.randn(3, 7, 12, requires_grad=True)
    assert torch.equal(layer(x), layer.base_forward(x))      # B = 0: exactly the base
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    params = (x, layer.lora_A.weight, layer.lora_B.weight, layer.bias)
    out = layer(x)
    assert out.grad_fn.name() == "ViewBackward0" and out.grad_fn.next_functions[0][0].name() == "AddmmBackward0"
    ref = layer.base_forward(x) + layer.adapter_forward(x)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(g, r)


def test_saves_no_mask_and_no_dropped_copy():
    """Beyond x and the weights (alive anyway) it saves only the small h; PEFT's path saves a dropped copy and a mask."""
    layer = LoRALinear(nn.Linear(256, 256, bias=False), r=4, alpha=8, dropout=0.1).train()
    layer.weight.requires_grad_(False)   # frozen base, as after inject_lora
    x = torch.randn(64, 256, requires_grad=True)   # as inside a network
    alive = {t.untyped_storage().data_ptr() for t in (x, *layer.parameters())}   # saved by reference only

    def saved_bytes_besides_x(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in alive:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    h_bytes = 64 * 4 * 4          # h = A dropout(x), fp32
    assert saved_bytes_besides_x(lambda: layer(x)) == h_bytes
    plain = lambda: layer.base_forward(x) + layer.lora_B(layer.lora_A(layer.lora_dropout(x))) * layer.scaling  # noqa: E731
    assert saved_bytes_besides_x(plain) >= h_bytes + x.numel() * (4 + 1)   # dropped fp32 copy + bool mask


def _bf16_layer(dropout: float) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24).to(torch.bfloat16), r=4, alpha=8, dropout=dropout).train()
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def test_cast_path_matches_the_modules_and_keeps_bf16_x():
    layer = _bf16_layer(0.0)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    params = (x, layer.lora_A.weight, layer.lora_B.weight, layer.bias)
    out = layer(x)
    assert out.grad_fn.name() == "FusedLoRABackward" and out.dtype is torch.bfloat16
    ref = layer.base_forward(x) + layer.adapter_forward(x).to(torch.bfloat16)
    assert torch.equal(out, ref)
    for g, r in zip(torch.autograd.grad(out.float().sum(), params), torch.autograd.grad(ref.float().sum(), params)):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r)

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() not in params]
    assert [(t.dtype, t.data_ptr()) for t in big] == [(torch.bfloat16, x.data_ptr())]   # x itself, no fp32 copy


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the source tensor of every dtype cast (`aten._to_copy`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.sources.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_base_fp32_adapter_casts_are_counted_and_off_the_base_path(dropout):
    """Per adapted layer and step: 2 casts forward (x up, adapter output down), 3 backward (incoming grad
    up, x up for A's gradient, x's gradient down); none of them touches the base weight or bias."""
    layer = _bf16_layer(dropout)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    with _CountCasts() as fwd:
        out = layer(x)
    loss = out.float().sum()
    with _CountCasts() as bwd:
        loss.backward()
    assert [(t.dtype, tuple(t.shape)) for t in fwd.sources] == [(torch.bfloat16, (3, 5, 32)), (torch.float32, (3, 5, 24))]
    # the first backward cast belongs to the test's own `.float()` of the output
    assert [(t.dtype, tuple(t.shape)) for t in bwd.sources] == [(torch.float32, (3, 5, 24)),
        (torch.bfloat16, (15, 24)), (torch.bfloat16, (15, 32)), (torch.float32, (3, 5, 32))]
    base = {layer.weight.data_ptr(), layer.bias.data_ptr()}
    assert not any(t.data_ptr() in base for t in fwd.sources + bwd.sources)
