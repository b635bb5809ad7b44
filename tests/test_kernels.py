"""`lightning_lora._kernels`: the fused autograd function (every variant: mask source, fused base
gradient, compute dtype), its no-grad twin, mask replay, and the operators each variant dispatches.

The Philox mask source is CUDA's; here it runs on CPU (`torch.native_dropout` exists there too, drawn
from the CPU generator), so its code path, replay included, is tested without a GPU. The operator counts
are exact: they are the CPU proxy for kernel launches on CUDA (`lightning_lora.profiling`)."""

from __future__ import annotations

import pytest
import torch

from lightning_lora._kernels import (
    MASK_LEVELS,
    AdapterCall,
    FusedLoRA,
    check_mask_replay,
    compute_dtype_for,
    dropout_threshold,
    fused_lora,
    generator_for,
    lane_drop_mask,
    mask_source,
    replayed,
)
from lightning_lora.profiling import DispatchCounter

SOURCES = ["lanes", "philox"]


def _seeded(fn, seed: int = 0):
    """`fn` with the default generator reset before each call: gradcheck calls it many times."""
    def wrapped(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return wrapped


def _inputs(shape=(2, 3, 6), out=4, r=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = torch.randn(out, shape[-1], dtype=dtype)                 # a frozen base weight (out, in)
    a = torch.randn(r, shape[-1], dtype=dtype, requires_grad=True)
    b = torch.randn(out, r, dtype=dtype, requires_grad=True)
    return x, w, a, b


# ------------------------------------------------------------------------------------------- choices
def test_mask_source_and_generator():
    cpu = torch.device("cpu")
    assert mask_source(cpu) == "lanes" and mask_source(torch.device("cuda", 0)) == "philox"
    assert mask_source(cpu, "philox") == "philox"
    with pytest.raises(ValueError, match="mask source 'curand'"):
        mask_source(cpu, "curand")
    assert generator_for(cpu) is torch.default_generator


def test_compute_dtype_policy():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert compute_dtype_for("auto", bf16, f32) is bf16          # bf16-true base, fp32 adapters: bf16 products
    assert compute_dtype_for("auto", f16, f32) is f32            # fp16 only when asked for ("base")
    assert compute_dtype_for("base", f16, f32) is f16
    assert compute_dtype_for("adapter", bf16, f32) is f32
    assert compute_dtype_for("auto", f32, f32) is f32
    assert compute_dtype_for("auto", f32, bf16) is bf16          # bf16 adapters on an fp32 base: as before
    assert compute_dtype_for("base", f32, bf16) is bf16
    with pytest.raises(ValueError, match="'fp8'"):
        compute_dtype_for("fp8", bf16, f32)


# ------------------------------------------------------------------------------------------- masks
def test_threshold_rounds_p_to_multiples_of_2_to_the_minus_16():
    assert dropout_threshold(0.05) == 3277 and dropout_threshold(0.1) == 6554 and dropout_threshold(0.5) == 32768
    assert abs(dropout_threshold(0.05) / MASK_LEVELS - 0.05) < 2 ** -17
    assert dropout_threshold(1e-6) == 0


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lane_mask_rate_is_p_in_every_lane(p):
    """The mask comes from 16-bit lanes of 64-bit draws: each of the four lane positions must drop at rate p."""
    thr = dropout_threshold(p)
    torch.manual_seed(123)
    drop = lane_drop_mask(torch.Size([1000, 1024]), thr, torch.device("cpu"))
    assert drop.dtype is torch.bool and drop.shape == (1000, 1024)
    n = drop.numel() // 4
    sigma = (p * (1 - p) / n) ** 0.5
    for lane in range(4):
        rate = drop.reshape(-1)[lane::4].float().mean().item()
        assert abs(rate - thr / MASK_LEVELS) < 5 * sigma, (lane, rate)


def test_replayed_draws_the_same_numbers_and_restores_the_generator():
    gen = torch.default_generator
    torch.manual_seed(0)
    state = gen.get_state()
    first = lane_drop_mask(torch.Size([7, 33]), 20000, torch.device("cpu"))
    after = gen.get_state()
    with replayed(gen, state):
        again = lane_drop_mask(torch.Size([7, 33]), 20000, torch.device("cpu"))
    assert torch.equal(first, again)
    assert torch.equal(gen.get_state(), after)           # the stream goes on where it was
    assert not torch.equal(lane_drop_mask(torch.Size([7, 33]), 20000, torch.device("cpu")), first)


@pytest.mark.parametrize("masks", SOURCES)
def test_check_mask_replay(masks):
    assert check_mask_replay("cpu", masks) == masks


# ------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("masks", SOURCES)
@pytest.mark.parametrize("fused_base", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(masks, fused_base, p):
    """Every variant of the backward: the dropout mask drawn again from the recorded generator state,
    the scales folded into the GEMMs, and the base's input gradient fused in (`base_weight`)."""
    x, w, a, b = _inputs()
    call = AdapterCall(scaling=1.7, p=p, masks=masks)

    def f(x, a, b):
        result = torch.nn.functional.linear(x.detach() if fused_base else x, w)
        return FusedLoRA.apply(result, x, a, b, w if fused_base else None, call)

    assert torch.autograd.gradcheck(_seeded(f), (x, a, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("masks", SOURCES)
def test_gradcheck_float64_only_some_inputs_need_grad(masks):
    x, _, a, b = _inputs()
    x = x.detach()
    result = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    f = _seeded(lambda result, a, b: FusedLoRA.apply(result, x, a, b, None, AdapterCall(2.0, 0.5, masks=masks)))
    assert torch.autograd.gradcheck(f, (result, a, b), eps=1e-6, atol=1e-5)
    g = _seeded(lambda b: FusedLoRA.apply(result, x, a.detach(), b, None, AdapterCall(2.0, 0.5, masks=masks)))
    assert torch.autograd.gradcheck(g, (b,), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------- vs plain autograd
def _plain(result, x, a, b, scaling, drop_keep: torch.Tensor | None, keep_scale: float, cd: torch.dtype):
    """Plain autograd of the same function (casts as autocast does), with a given keep mask."""
    xc = x.to(cd)
    if drop_keep is not None:
        xc = xc * drop_keep.to(cd) * keep_scale
    return result + (torch.nn.functional.linear(torch.nn.functional.linear(xc, a.to(cd)), b.to(cd)) * scaling).to(result.dtype)


def _mask_of(masks: str, x: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, float]:
    """The keep mask and scale a call with `masks` draws after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    if masks == "lanes":
        thr = dropout_threshold(p)
        return ~lane_drop_mask(x.shape, thr, x.device), MASK_LEVELS / (MASK_LEVELS - thr)
    return torch.native_dropout(torch.ones_like(x, dtype=torch.float32), p, True)[1], 1 / (1 - p)


@pytest.mark.parametrize("masks", SOURCES)
@pytest.mark.parametrize("fused_base", [False, True])
def test_float32_matches_plain_autograd_with_the_same_mask(masks, fused_base):
    x, w, a, b = _inputs(shape=(3, 7, 12), out=10, r=4, dtype=torch.float32)
    bias = torch.randn(10, requires_grad=True)
    call = AdapterCall(scaling=2.0, p=0.25, masks=masks)
    torch.manual_seed(5)
    result = torch.nn.functional.linear(x.detach() if fused_base else x, w, bias)
    out = FusedLoRA.apply(result, x, a, b, w if fused_base else None, call)
    grads = torch.autograd.grad(out.square().sum(), (x, a, b, bias))
    keep, scale = _mask_of(masks, x, 0.25, 5)
    ref = _plain(torch.nn.functional.linear(x, w, bias), x, a, b, 2.0, keep, scale, torch.float32)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, a, b, bias))
    assert out.grad_fn.name() == "FusedLoRABackward"
    # the same products, summed and scaled in another order (scales as GEMM alpha, the base gradient fused)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("masks", SOURCES)
@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float32])
def test_bf16_input_fp32_adapters_in_either_compute_dtype(masks, cd):
    """A bf16 base with fp32 adapters: outputs and gradients in the input's / adapters' dtypes, equal to
    plain autograd with the same casts (bf16 products: autocast's casts) within bf16 rounding."""
    x, w, a, b = _inputs(shape=(4, 5, 32), out=24, r=4, dtype=torch.float32)
    x = x.detach().bfloat16().requires_grad_()
    w = w.bfloat16()
    call = AdapterCall(scaling=2.0, p=0.1, compute_dtype=cd, masks=masks)
    torch.manual_seed(1)
    out = FusedLoRA.apply(torch.nn.functional.linear(x.detach(), w), x, a, b, w, call)
    gx, ga, gb = torch.autograd.grad(out.float().sum(), (x, a, b))
    keep, scale = _mask_of(masks, x, 0.1, 1)
    ref = _plain(torch.nn.functional.linear(x, w), x, a, b, 2.0, keep, scale, cd)
    rx, ra, rb = torch.autograd.grad(ref.float().sum(), (x, a, b))
    assert out.dtype is torch.bfloat16 and gx.dtype is torch.bfloat16
    assert ga.dtype is torch.float32 and gb.dtype is torch.float32
    # the two sides round in other places (one addmm vs mm + mul + add; one rounding of the sum into bf16
    # vs two): within 2 bf16 ulps of the largest value for outputs and input gradients, and within 2**-6 of
    # the largest value for the weight gradients (bf16 products summed over tokens)
    for actual, expected, frac in ((out, ref, 2**-7), (gx, rx, 2**-7), (ga, ra, 2**-6), (gb, rb, 2**-6)):
        bound = frac * expected.float().abs().max().item()
        assert (actual.float() - expected.float()).abs().max().item() <= bound


@pytest.mark.parametrize("masks", SOURCES)
def test_no_grad_twin_equals_the_autograd_forward(masks):
    x, _, a, b = _inputs(dtype=torch.float32)
    result = torch.randn(2, 3, 4)
    call = AdapterCall(scaling=1.5, p=0.4, masks=masks)
    torch.manual_seed(9)
    with_grad = FusedLoRA.apply(result, x, a, b, None, call)
    torch.manual_seed(9)
    with torch.no_grad():
        without = fused_lora(result, x, a, b, call)
    assert torch.equal(with_grad, without)


def test_b_zero_gives_the_base_output_bit_for_bit():
    x, _, a, b = _inputs(dtype=torch.float32)
    result = torch.randn(2, 3, 4)
    for call in (AdapterCall(2.0), AdapterCall(2.0, 0.3), AdapterCall(2.0, 0.3, masks="philox")):
        assert torch.equal(FusedLoRA.apply(result, x, a, torch.zeros_like(b), None, call), result)
        assert torch.equal(fused_lora(result, x, a, torch.zeros_like(b), call), result)


def test_backward_restores_the_generator_it_replays():
    """Backward draws the forward's mask again and leaves torch's generator where the step had taken it."""
    x, _, a, b = _inputs(dtype=torch.float32)
    out = FusedLoRA.apply(torch.randn(2, 3, 4), x, a, b, None, AdapterCall(1.0, 0.5))
    before = torch.default_generator.get_state()
    out.sum().backward()
    assert torch.equal(torch.default_generator.get_state(), before)


# ------------------------------------------------------------------------------------------- operators
def _count(fn):
    with DispatchCounter() as counter:
        with counter.phase("forward"):
            out = fn()
        grad = torch.ones_like(out)
        with counter.phase("backward"):
            out.backward(grad)
    return counter.ops(phase="forward"), counter.ops(phase="backward")


# (mask source, p, fused base grad, bf16 input with compute dtype) -> forward ops, backward ops of the function
# alone (the base layer's own F.linear excluded: counted with `result` computed outside the counter)
OPS = {
    ("lanes", 0.0, False, None): ({"addmm": 1, "mm": 1}, {"addmm": 2, "mm": 2}),
    ("lanes", 0.0, True, None): ({"addmm": 1, "mm": 1}, {"addmm": 3, "mm": 2}),
    ("lanes", 0.1, True, None): ({"addmm": 1, "lt": 1, "mm": 1, "random_": 1, "where": 1},
                                 {"addmm": 3, "lt": 1, "masked_fill_": 1, "mm": 2, "random_": 1, "where": 1}),
    ("philox", 0.1, True, None): ({"addmm": 1, "mm": 1, "native_dropout": 1},
                                  {"addmm": 3, "mm": 2, "native_dropout": 1, "native_dropout_backward": 1}),
    # bf16 input, fp32 adapters, bf16 products (the default): A and B cast in forward, their grads back
    ("lanes", 0.0, True, torch.bfloat16): ({"_to_copy": 2, "addmm": 1, "mm": 1}, {"_to_copy": 2, "addmm": 3, "mm": 2}),
    ("philox", 0.1, True, torch.bfloat16): ({"_to_copy": 2, "addmm": 1, "mm": 1, "native_dropout": 1},
                                            {"_to_copy": 2, "addmm": 3, "mm": 2, "native_dropout": 1,
                                             "native_dropout_backward": 1}),
    # bf16 input, fp32 products: x cast up (forward and again in backward), the product added to the base output
    # (on CUDA one mixed-dtype add; on CPU cast and add)
    ("lanes", 0.0, True, torch.float32): ({"_to_copy": 2, "add": 1, "addmm": 1, "mm": 1},
                                          {"_to_copy": 3, "addmm": 3, "mm": 2}),
}


@pytest.mark.parametrize("key", list(OPS), ids=[f"{k[0]}-p{k[1]}-base{int(k[2])}-{k[3]}" for k in OPS])
def test_operators_per_call(key):
    masks, p, fused_base, cd = key
    x, w, a, b = _inputs(shape=(2, 5, 16), out=8, r=4, dtype=torch.float32)
    if cd is not None:
        x, w = x.detach().bfloat16().requires_grad_(), w.bfloat16()
    result = torch.nn.functional.linear(x.detach(), w)
    call = AdapterCall(2.0, p, cd, masks)
    FusedLoRA.apply(result, x, a, b, w if fused_base else None, call).sum().backward()   # warm-up (cached zero)
    for t in (x, a, b):
        t.grad = None
    fwd, bwd = _count(lambda: FusedLoRA.apply(result, x, a, b, w if fused_base else None, call))
    expected_fwd, expected_bwd = OPS[key]
    assert fwd == {f"aten.{k}": v for k, v in expected_fwd.items()}
    assert bwd == {f"aten.{k}": v for k, v in expected_bwd.items()}
