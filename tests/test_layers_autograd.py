"""The custom backward of the adapter path with dropout (`layers._DropoutLoRA`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lora.layers import LoRAConv1D, LoRALinear, _DropoutLoRA


def _seeded(fn, seed: int = 0):
    """`fn` with the default generator reset before each call: gradcheck calls it many times."""
    def wrapped(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return wrapped


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6)])
def test_gradcheck_float64(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    f = _seeded(lambda x, a, b: _DropoutLoRA.apply(x, a, b, 0.3, 1.7))
    assert torch.autograd.gradcheck(f, (x, a, b), eps=1e-6, atol=1e-5)


def test_gradcheck_float64_only_some_inputs_need_grad():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    f = _seeded(lambda a, b: _DropoutLoRA.apply(x, a, b, 0.5, 2.0))
    assert torch.autograd.gradcheck(f, (a, b), eps=1e-6, atol=1e-5)


def _plain(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The reference: autograd through nn.Dropout and the two Linear modules."""
    xa = x.to(layer.lora_A.weight.dtype)
    return layer.base_forward(x) + (layer.lora_B(layer.lora_A(layer.lora_dropout(xa))) * layer.scaling).to(x.dtype)


@pytest.mark.parametrize("cls", [LoRALinear, LoRAConv1D])
def test_matches_the_plain_autograd_path(cls):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(12, 10) if cls is LoRALinear else Conv1D(10, 12)
    layer = cls(base, r=4, alpha=8, dropout=0.25).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 7, 12, requires_grad=True)
    assert layer._can_use_fused_dropout(x)

    torch.manual_seed(5)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    torch.manual_seed(5)
    ref = _plain(layer, x) if cls is LoRALinear else layer.base_forward(x) + (
        layer.lora_B(layer.lora_A(layer.lora_dropout(x))) * layer.scaling)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


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
    ref = _plain(layer, x)
    rx, ra = torch.autograd.grad(ref.float().sum(), (x, layer.lora_A.weight))
    assert out.dtype is torch.bfloat16 and gx.dtype is torch.bfloat16 and ga.dtype is torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gx, rx)


def test_not_used_when_dropout_is_off_or_in_eval():
    x = torch.randn(2, 4)
    assert not LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.0).train()._can_use_fused_dropout(x)
    assert not LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).eval()._can_use_fused_dropout(x)
    with torch.no_grad():
        assert not LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).train()._can_use_fused_dropout(x)


def test_saves_less_than_autograd_through_dropout():
    """Beyond x and the weights (alive anyway) it saves the small h and a bool mask, not the dropped copy."""
    layer = LoRALinear(nn.Linear(256, 256, bias=False), r=4, alpha=8, dropout=0.1).train()
    layer.weight.requires_grad_(False)   # frozen base, as after inject_lora
    x = torch.randn(64, 256, requires_grad=True)   # as inside a network: the dropout mask is saved too
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

    small = 64 * 4 * 4 + x.numel()      # h = A dropout(x) in fp32, and the keep-mask as bool
    ours = saved_bytes_besides_x(lambda: layer(x))
    assert ours <= small
    # the dropped-out copy (fp32)
    assert saved_bytes_besides_x(lambda: _plain(layer, x)) - ours >= x.numel() * 4
