"""The adapter paths of `LoRALinear`/`LoRAConv1D` (`AdapterPath`): `FusedLoRA` (dropout, a bf16 base with fp32
adapters, one dtype) with its custom backward, masks drawn again from the recorded generator state and the
base's input gradient fused in; the functional ops (torch.compile, other devices); the modules (hooks,
autocast). The function itself (gradchecks, operator counts) is tested in tests/test_kernels.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from lightning_lora._kernels import MASK_LEVELS, dropout_threshold, lane_drop_mask
from lightning_lora.layers import AdapterPath, LoRAConv1D, LoRALinear


# ------------------------------------------------------------------------------------------- vs reference
def _reference(layer, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Plain autograd with the mask the fused path draws on CPU after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    thr = dropout_threshold(layer.lora_dropout.p)
    drop = lane_drop_mask(x.shape, thr, x.device)
    xd = x.to(layer.lora_A.weight.dtype).masked_fill(drop, 0) * (MASK_LEVELS / (MASK_LEVELS - thr))
    return layer.base_forward(x) + (layer.lora_B(layer.lora_A(xd)) * layer.scaling).to(x.dtype)


def test_p_too_small_for_lane_masks_takes_the_functional_ops():
    x = torch.randn(3, 8)
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=2, dropout=1e-6).train()
    assert dropout_threshold(1e-6) == 0 and layer._fused_path(x) is AdapterPath.FUNCTIONAL
    layer.dropout_masks = "philox"      # native_dropout takes any p
    assert layer._fused_path(x) is AdapterPath.DROPOUT


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
    ref = _reference(layer, x, 5)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    assert out.grad_fn.name() == "FusedLoRABackward"
    # the same products, summed and scaled in another order (1/(1-p) in the GEMMs' alpha, the base's
    # input gradient fused into one addmm)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # dropout really drops: the same input gives another output on the next call
    assert not torch.allclose(layer(x), out)


def test_bf16_base_fp32_adapter_gradients_with_fp32_products():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, alpha=8, dropout=0.1).train()
    layer.adapter_compute_dtype = "adapter"
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    gx, ga = torch.autograd.grad(out.float().sum(), (x, layer.lora_A.weight))
    ref = _reference(layer, x, 1)
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


@pytest.mark.parametrize("masks", ["lanes", "philox"])
def test_no_grad_forward_draws_the_same_mask(masks):
    """Reentrant activation checkpointing runs the forward under no_grad, then again with grad: both must drop alike."""
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5).train()
    layer.dropout_masks = masks
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 8)
    torch.manual_seed(7)
    with torch.no_grad():
        a = layer(x)
    torch.manual_seed(7)
    b = layer(x.requires_grad_())
    assert torch.equal(a, b)


@pytest.mark.parametrize("masks", ["lanes", "philox"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_mask(use_reentrant, masks):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.5).train()
    layer.dropout_masks = masks
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
    # a bf16 base with fp32 adapters: the fused function, with or without autograd, in either compute dtype
    bf16 = LoRALinear(nn.Linear(4, 4).bfloat16(), r=2, alpha=2)
    assert bf16._fused_path(x.bfloat16()) is AdapterPath.CAST
    with torch.no_grad():
        assert bf16._fused_path(x.bfloat16()) is AdapterPath.CAST
    bf16.adapter_compute_dtype = "adapter"
    assert bf16._fused_path(x.bfloat16()) is AdapterPath.CAST
    # fp32 adapters computing in bf16 on a bf16 input is a cast too; one dtype throughout is the addmm
    assert LoRALinear(nn.Linear(4, 4).bfloat16(), r=2, alpha=2, adapter_dtype=None)._fused_path(
        x.bfloat16()) is AdapterPath.ADDMM
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).train()._fused_path(x) is AdapterPath.MODULES

    class MyDropout(nn.Dropout):
        pass

    custom = LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).train()
    custom.lora_dropout = MyDropout(0.5)
    assert custom._fused_path(x) is AdapterPath.MODULES
    assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2)._fused_path(x.to("meta")) is AdapterPath.FUNCTIONAL


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
    assert layer._fused_path(x) is AdapterPath.ADDMM and out.grad_fn.name() == "FusedLoRABackward"
    ref = layer.base_forward(x) + layer.adapter_forward(x)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("cls", [LoRALinear, LoRAConv1D])
def test_the_base_input_gradient_is_fused_and_the_base_parameters_still_train(cls):
    """With the base's input gradient computed inside FusedLoRA (the base sees x.detach()), x's gradient is
    still the whole one, and a base weight or bias that trains (bias='all', full fine-tuning) still gets its own."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if cls is LoRALinear else Conv1D(10, 12)
    layer = cls(base, r=4, alpha=8, dropout=0.2).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 7, 12, requires_grad=True)
    assert layer._fused_base_weight(x) is not None
    params = (x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)
    torch.manual_seed(4)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref = _reference(layer, x, 4)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_the_base_gradient_is_not_fused_for_a_base_computed_otherwise():
    """A subclass that overrides base_forward (a quantized base, say), a tensor-subclass weight or another
    dtype than the input keeps the base's own backward."""
    class Scaled(LoRALinear):
        def base_forward(self, x):
            return 2 * super().base_forward(x)

    x = torch.randn(2, 4, requires_grad=True)
    assert Scaled(nn.Linear(4, 4), r=2, alpha=2)._fused_base_weight(x) is None
    assert LoRALinear(nn.Linear(4, 4).bfloat16(), r=2, alpha=2)._fused_base_weight(x) is None
    assert LoRALinear(nn.Linear(4, 4), r=2, alpha=2)._fused_base_weight(x) is not None
    layer = Scaled(nn.Linear(4, 4), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    gx, = torch.autograd.grad(layer(x).sum(), x)
    ref = torch.autograd.grad((layer.base_forward(x) + layer.adapter_forward(x)).sum(), x)[0]
    torch.testing.assert_close(gx, ref)


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


def _bf16_layer(dropout: float, compute: str = "auto") -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24).to(torch.bfloat16), r=4, alpha=8, dropout=dropout).train()
    layer.weight.requires_grad_(False)
    layer.adapter_compute_dtype = compute
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


@pytest.mark.parametrize("compute", ["auto", "adapter"])
def test_cast_path_matches_the_functional_ops_and_keeps_bf16_x(compute):
    layer = _bf16_layer(0.0, compute)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    params = (x, layer.lora_A.weight, layer.lora_B.weight, layer.bias)
    out = layer(x)
    assert out.grad_fn.name() == "FusedLoRABackward" and out.dtype is torch.bfloat16
    ref = layer.base_forward(x) + layer.functional_adapter(x).to(torch.bfloat16)
    for g, r in zip((out, *torch.autograd.grad(out.float().sum(), params)),
                    (ref, *torch.autograd.grad(ref.float().sum(), params))):
        assert g.dtype == r.dtype
        # within 2 bf16 ulps of the largest value (they round in other places)
        assert (g.float() - r.float()).abs().max() <= 2**-7 * r.float().abs().max()

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() not in params]
    assert [(t.dtype, t.data_ptr()) for t in big] == [(torch.bfloat16, x.data_ptr())]   # x itself, no fp32 copy
    h = [t for t in saved if t.shape == (15, 4)]
    assert [t.dtype for t in h] == [torch.bfloat16 if compute == "auto" else torch.float32]


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
@pytest.mark.parametrize("compute", ["auto", "adapter"])
def test_bf16_base_fp32_adapter_casts_are_counted_and_off_the_base_path(dropout, compute):
    """Per adapted layer and step, with bf16 products ("auto"): 2 casts forward (A and B down, r-wide), 2
    backward (their gradients up); with fp32 products ("adapter"): 2 forward (x up, the adapter output down),
    3 backward (incoming grad up, x up again for A's gradient, x's gradient down). None touches the base
    weight or bias, and none of the bf16-products casts is of activation size."""
    layer = _bf16_layer(dropout, compute)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    with _CountCasts() as fwd:
        out = layer(x)
    loss = out.sum()
    with _CountCasts() as bwd:
        loss.backward()
    shapes = lambda casts: [(t.dtype, tuple(t.shape)) for t in casts.sources]  # noqa: E731
    if compute == "auto":
        assert shapes(fwd) == [(torch.float32, (4, 32)), (torch.float32, (24, 4))]
        assert shapes(bwd) == [(torch.bfloat16, (24, 4)), (torch.bfloat16, (4, 32))]
    else:
        assert shapes(fwd) == [(torch.bfloat16, (3, 5, 32)), (torch.float32, (15, 24))]
        assert shapes(bwd) == [(torch.bfloat16, (15, 24)), (torch.bfloat16, (3, 5, 32)), (torch.float32, (15, 32))]
    base = {layer.weight.data_ptr(), layer.bias.data_ptr()}
    assert not any(t.data_ptr() in base for t in fwd.sources + bwd.sources)


@pytest.mark.parametrize("compute", ["auto", "adapter"])
def test_inject_lora_passes_the_compute_dtype_to_every_layer(compute):
    """`LoRAConfig.adapter_compute_dtype` reaches the layers: on a bf16 model with fp32 adapters, "auto"
    saves a bf16 `h` (bf16 products), "adapter" an fp32 one."""
    from conftest import make_tiny_llama

    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.surgery import lora_layers

    model = make_tiny_llama().to(torch.bfloat16).train()
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear", adapter_compute_dtype=compute))
    layers = [layer for _, layer in lora_layers(model)]
    assert {layer.adapter_compute_dtype for layer in layers} == {compute}
    assert {layer.lora_A.weight.dtype for layer in layers} == {torch.float32}
    saved: list[torch.Tensor] = []
    ids = torch.randint(1, 128, (2, 8))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    h = [t for t in saved if t.shape == (16, 4)]
    assert len(h) == len(layers) and {t.dtype for t in h} == {torch.bfloat16 if compute == "auto" else torch.float32}
    loss.backward()
    assert all(layer.lora_B.weight.grad.dtype is torch.float32 for layer in layers)
