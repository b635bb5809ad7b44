"""Adapter layers on their own: shapes, keys, init, forward formula, merge/unmerge, dtype, mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora._kernels import dropout_threshold, lane_drop_mask
from lightning_lora.layers import (
    AdapterPath,
    LoRAConv1D,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    adapter_class_for,
)

IN, OUT, R, ALPHA = 12, 10, 4, 8.0


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def _conv1d() -> Conv1D:
    torch.manual_seed(0)
    layer = Conv1D(OUT, IN)  # nf=OUT outputs, nx=IN inputs, weight (IN, OUT)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(IN, OUT, padding_idx=0)


CASES = {
    # name: (base factory, adapter class, input factory)
    "linear": (_linear, LoRALinear, lambda: torch.randn(2, 3, IN)),
    "conv1d": (_conv1d, LoRAConv1D, lambda: torch.randn(2, 3, IN)),
    "embedding": (_embedding, LoRAEmbedding, lambda: torch.tensor([[0, 1, 5], [11, 3, 3]])),
}


def _make(kind: str, seed: int = 1, **kwargs) -> tuple[nn.Module, LoRALayer, torch.Tensor]:
    factory, cls, inputs = CASES[kind]
    base = factory()
    torch.manual_seed(seed)
    layer = cls(base, r=kwargs.pop("r", R), alpha=kwargs.pop("alpha", ALPHA), **kwargs)
    return base, layer, inputs()


def _randomize_B(layer: LoRALayer, std: float = 0.1, seed: int = 2) -> None:
    """Give the zero factor random values (B; for an embedding A, which starts at zero as in PEFT)."""
    gen = torch.Generator().manual_seed(seed)
    zero = layer.lora_A.weight if isinstance(layer, LoRAEmbedding) else layer.lora_B.weight
    with torch.no_grad():
        zero.copy_(torch.randn(zero.shape, generator=gen) * std)


def _expected(kind: str, base: nn.Module, layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The documented formula, written out independently of the layer's code (float64)."""
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    s = layer.scaling
    if kind == "linear":
        W, b = base.weight.double(), base.bias.double()
        xd = x.double()
        return xd @ W.T + b + s * (xd @ A.T @ B.T)
    if kind == "conv1d":
        W, b = base.weight.double(), base.bias.double()  # (in, out)
        xd = x.double()
        return xd @ W + b + s * (xd @ A.T @ B.T)
    E = base.weight.double()  # (num, dim)
    return E[x] + s * (A.T[x] @ B.T)


# ---------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize(("kind", "a_shape", "b_shape", "keys"), [
    ("linear", (R, IN), (OUT, R), ["bias", "lora_A.weight", "lora_B.weight", "weight"]),
    ("conv1d", (R, IN), (OUT, R), ["bias", "lora_A.weight", "lora_B.weight", "weight"]),
    ("embedding", (R, IN), (OUT, R), ["lora_A.weight", "lora_B.weight", "weight"]),
])
def test_shapes_keys_and_shared_base_parameters(kind, a_shape, b_shape, keys):
    base, layer, _ = _make(kind)
    assert tuple(layer.lora_A.weight.shape) == a_shape
    assert tuple(layer.lora_B.weight.shape) == b_shape
    assert sorted(layer.state_dict()) == keys
    # the very same Parameter objects as the base layer: no copy, base keys unchanged
    assert layer.weight is base.weight
    if kind != "embedding":
        assert layer.bias is base.bias
    assert layer.base_cls is type(base)
    zero, random = ((layer.lora_A, layer.lora_B) if kind == "embedding" else (layer.lora_B, layer.lora_A))
    assert torch.count_nonzero(zero.weight) == 0  # embeddings: A zero, B ~ N(0, 1) (PEFT's and loralib's)
    assert torch.count_nonzero(random.weight) == random.weight.numel()


def test_linear_without_bias_and_the_docstring_count():
    layer = LoRALinear(nn.Linear(64, 32, bias=False), r=8, alpha=16)
    assert layer.bias is None
    assert sorted(layer.state_dict()) == ["lora_A.weight", "lora_B.weight", "weight"]
    assert layer.lora_A.weight.numel() + layer.lora_B.weight.numel() == 8 * (64 + 32)


@pytest.mark.parametrize(("use_rslora", "expected"), [(False, ALPHA / R), (True, ALPHA / math.sqrt(R))])
def test_scaling(use_rslora, expected):
    _, layer, _ = _make("linear", use_rslora=use_rslora)
    assert layer.scaling == expected
    assert f"scaling={expected:g}" in repr(layer) and "base=Linear, r=4, alpha=8" in repr(layer)


def test_kaiming_vs_gaussian_init():
    fan_in, r = 512, 4
    torch.manual_seed(0)
    kaiming = LoRALinear(nn.Linear(fan_in, 8), r=r, alpha=8, init="kaiming").lora_A.weight
    gaussian = LoRALinear(nn.Linear(fan_in, 8), r=r, alpha=8, init="gaussian").lora_A.weight
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PEFT
    assert kaiming.abs().max() <= bound
    assert kaiming.abs().max() > 0.9 * bound
    assert abs(kaiming.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert abs(gaussian.std().item() - 1 / r) < 0.02  # N(0, 1/r): std 0.25 over 2048 samples
    assert gaussian.abs().max() > 10 * bound


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match=r"r=0 is invalid; expected an integer > 0"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match=r"init='xavier' is invalid; expected 'kaiming' or 'gaussian'"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=1, init="xavier")


def test_adapter_class_for():
    assert adapter_class_for(nn.Linear(2, 2)) is LoRALinear
    assert adapter_class_for(Conv1D(2, 2)) is LoRAConv1D
    assert adapter_class_for(nn.Embedding(2, 2)) is LoRAEmbedding
    assert adapter_class_for(nn.LayerNorm(2)) is None
    assert adapter_class_for(nn.Conv2d(2, 2, 1)) is LoRAConv2d  # issue 22 (tests/test_layers_conv.py)
    assert adapter_class_for(nn.ConvTranspose2d(2, 2, 1)) is None
    assert adapter_class_for(LoRALinear(nn.Linear(2, 2), r=1, alpha=1)) is None  # never wrap twice


def test_embedding_never_uses_dropout():
    layer = LoRAEmbedding(nn.Embedding(10, 4), r=2, alpha=2, dropout=0.5)
    assert isinstance(layer.lora_dropout, nn.Identity)
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=0.5).lora_dropout, nn.Dropout)


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_formula(kind, use_rslora):
    base, layer, x = _make(kind, use_rslora=use_rslora)
    _randomize_B(layer)
    out = layer(x)
    expected = _expected(kind, base, layer, x)
    assert out.shape == (*x.shape[:2], OUT)
    assert (out.double() - expected).abs().max() < 1e-5
    assert (out - base(x)).abs().max() > 1e-3  # the adapter really contributes


@pytest.mark.parametrize("kind", list(CASES))
def test_gradients_reach_A_and_B(kind):
    _, layer, x = _make(kind)
    _randomize_B(layer)
    layer(x).square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


def test_dropout_applies_only_to_the_adapter_input():
    base = nn.Linear(IN, OUT)
    layer = LoRALinear(base, r=R, alpha=ALPHA, dropout=0.5).train()
    _randomize_B(layer)
    x = torch.randn(64, IN)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    drop = lane_drop_mask(x.shape, dropout_threshold(0.5), x.device)   # what the layer draws on CPU
    assert 0.4 < drop.float().mean().item() < 0.6
    dropped = x.masked_fill(drop, 0) * 2   # kept values scaled by 1 / (1 - p)
    expected = base(x) + layer.scaling * (dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(out, expected, atol=1e-6)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("training", [False, True])
def test_new_layer_takes_the_base_layers_mode(training):
    """Regression: an adapter injected into an eval-mode model used to leave lora_dropout in
    training mode, so the adapted model was random in eval()."""
    base = nn.Linear(IN, OUT).train(training)
    layer = LoRALinear(base, r=R, alpha=ALPHA, dropout=0.5)
    assert [m.training for m in layer.modules()] == [training] * 4
    if not training:
        _randomize_B(layer)
        x = torch.randn(8, IN)
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fp32_adapter_on_bf16_base(kind):
    factory, cls, inputs = CASES[kind]
    base = factory().to(torch.bfloat16)
    layer = cls(base, r=R, alpha=ALPHA)  # adapter_dtype defaults to float32
    x = inputs().to(torch.bfloat16)
    assert layer.weight.dtype is torch.bfloat16
    assert layer.lora_A.weight.dtype is torch.float32 and layer.lora_B.weight.dtype is torch.float32
    assert torch.equal(layer(x), base(x))
    _randomize_B(layer)
    out = layer(x)
    assert out.dtype is torch.bfloat16
    # by default (adapter_compute_dtype="auto") the products run in bf16, as bf16-mixed autocast computes them
    bf16 = base(x) + (layer.lora_B.weight.bfloat16() @ (layer.lora_A.weight.bfloat16() @ x.unsqueeze(-1))).squeeze(-1) \
        * layer.scaling
    torch.testing.assert_close(out, bf16, rtol=0.02, atol=0.02)
    # with "adapter" they run in fp32 and the adapter output is rounded to bf16 and added to the base output
    # (on CPU; on CUDA the sum is taken in fp32 and rounded once)
    layer.adapter_compute_dtype = "adapter"
    expected = base(x) + layer.adapter_forward(x.float()).to(torch.bfloat16)
    assert torch.equal(layer(x), expected)
    kept = cls(factory().to(torch.bfloat16), r=R, alpha=ALPHA, adapter_dtype=None)
    assert kept.lora_A.weight.dtype is torch.bfloat16


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", list(CASES))
def test_delta_weight_layout_and_merge(kind):
    base, layer, x = _make(kind)
    _randomize_B(layer)
    w0 = base.weight.detach().clone()
    unmerged = layer(x)
    delta = layer.delta_weight()
    assert delta.shape == w0.shape  # Linear (out, in); Conv1D (in, out); Embedding (num, dim)
    BA = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling  # (out, in)
    assert torch.allclose(delta, BA if kind == "linear" else BA.T, atol=1e-7)

    layer.merge()
    assert layer.merged
    assert torch.equal(base.weight, w0 + delta)  # written into the shared base parameter
    merged = layer(x)
    assert (merged - unmerged).abs().max() < 1e-5
    layer.merge()  # idempotent: a second merge must not add the delta twice
    assert torch.equal(base.weight, w0 + delta)
    # a plain base module on the merged weight computes the same thing
    plain = layer.to_base_module()
    assert type(plain) is type(base)
    assert plain.weight is base.weight
    assert (plain(x) - unmerged).abs().max() < 1e-5

    layer.unmerge()
    assert not layer.merged
    assert (base.weight - w0).abs().max() < 1e-6
    assert (layer(x) - unmerged).abs().max() < 1e-6
    layer.unmerge()  # idempotent
    assert (base.weight - w0).abs().max() < 1e-6


def test_merge_bf16_weight_rounds_once():
    base = _linear().to(torch.bfloat16)
    layer = LoRALinear(base, r=R, alpha=ALPHA)
    _randomize_B(layer)
    w0 = base.weight.detach().clone()
    layer.merge()
    assert base.weight.dtype is torch.bfloat16
    assert torch.equal(base.weight, (w0.float() + layer.delta_weight()).to(torch.bfloat16))


@pytest.mark.parametrize("kind", list(CASES))
def test_to_base_module_restores_type_attributes_and_mode(kind):
    base, layer, x = _make(kind)
    base_attrs = {k: v for k, v in vars(base).items() if not k.startswith("_") and k != "training"}
    layer.eval()
    plain = layer.to_base_module()
    assert type(plain) is type(base)
    assert {k: v for k, v in vars(plain).items() if not k.startswith("_") and k != "training"} == base_attrs
    assert list(plain.state_dict()) == list(base.state_dict())
    assert plain.training is False
    assert list(plain.children()) == []
    assert torch.equal(plain(x), base(x))


@pytest.mark.parametrize("policy, dtype", [("auto", torch.bfloat16), ("adapter", torch.float32)])
def test_module_path_computes_in_the_configured_dtype(policy, dtype):
    # the module path (hooks on lora_A / lora_B, e.g. FSDP2 units of their own) follows adapter_compute_dtype
    # as the functional and fused paths do: bf16 products on a bf16 base with fp32 adapters under "auto"
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).bfloat16(), r=4, alpha=8)
    layer.adapter_compute_dtype = policy
    nn.init.normal_(layer.lora_B.weight)
    layer.lora_A.register_forward_pre_hook(lambda module, args: None)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert layer._fused_path(x) is AdapterPath.MODULES
    out = layer.adapter_forward(x)
    assert out.dtype == dtype and layer.lora_A.weight.dtype == torch.float32
    assert torch.equal(out, layer.functional_adapter(x))
