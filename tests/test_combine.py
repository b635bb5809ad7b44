"""`lightning_lora.combine` against PEFT 0.21: its `merge_utils` functions and `LoraModel.add_weighted_adapter`
on a tiny model with an Embedding, a Linear and a transformers Conv1D (fan_in_fan_out), 2 and 3 adapters,
different ranks and scalings (one rsLoRA), negative weights, one adapter absent from one layer; fp32, 1e-6.

The random pruning (dare_*) is made deterministic per call: `torch.bernoulli` is replaced by a draw seeded
with the call's index, so both sides get the same masks exactly when they draw in the same order, and the
number of draws is compared.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_lora import combine
from lightning_lora.combine import (
    COMBINATION_TYPES,
    LinearLayout,
    check_combination,
    combine_layer,
)
from lightning_lora.errors import LoRAError
from lightning_lora.layers import LoRAConv1D, LoRAConv2d, LoRAEmbedding, LoRALinear

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[torch.Size]:
    """`torch.bernoulli` seeded by its call index; the list records each call's shape."""
    calls: list[torch.Size] = []

    def bernoulli(p: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + len(calls))
        calls.append(p.shape)
        return (torch.rand(p.shape, generator=generator) < p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    return calls


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-6) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=0 if tol == 1e-6 else tol)
    MAX_DIFF[0] = max(MAX_DIFF[0], (ours - theirs).abs().max().item())


MAX_DIFF = [0.0]


# ------------------------------------------------------------------------------------------ merge utilities
METHODS = [("task_arithmetic", "total"), ("magnitude_prune", "total"), ("dare_linear", "total"),
           ("ties", "total"), ("ties", "frequency"), ("dare_ties", "total"), ("dare_ties", "frequency")]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize(("method", "sign_method"), METHODS)
def test_merge_methods_equal_peft(draws: list, n: int, method: str, sign_method: str) -> None:
    gen = torch.Generator().manual_seed(n)
    tensors = [torch.randn(7, 5, generator=gen) for _ in range(n)]
    weights = torch.tensor([0.7, -1.3, 0.4][:n])
    kwargs = {} if method == "task_arithmetic" else {"density": 0.4}
    if method in ("ties", "dare_ties"):
        kwargs["majority_sign_method"] = sign_method
    theirs = getattr(merge_utils, method)(tensors, weights, **kwargs)
    their_draws = len(draws)
    draws.clear()
    ours = getattr(combine, method)(tensors, weights, **kwargs)
    assert len(draws) == their_draws == (n if method.startswith("dare") else 0)
    _close(ours, theirs)


def test_pruning_and_sign_helpers_equal_peft(draws: list) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(6, 4, generator=gen)
    _close(combine.magnitude_based_pruning(t, 0.3), merge_utils.magnitude_based_pruning(t, 0.3))
    for ours, theirs in [(combine.random_pruning, merge_utils.random_pruning), (combine.prune, merge_utils.prune)]:
        draws.clear()
        expected = theirs(t, 0.3, "random", rescale=True) if ours is combine.prune else theirs(t, 0.3, rescale=True)
        draws.clear()
        _close(ours(t, 0.3, "random", rescale=True) if ours is combine.prune else ours(t, 0.3, rescale=True), expected)
    stacked = torch.randn(3, 6, 4, generator=gen)
    for method in ("total", "frequency"):
        mask = combine.majority_sign_mask(stacked, method)
        assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method))
        _close(combine.disjoint_merge(stacked, mask), merge_utils.disjoint_merge(stacked, mask))
    with pytest.warns(UserWarning):
        theirs = merge_utils.prune(t, 1.0, "random")
    draws.clear()
    assert torch.equal(combine.prune(t, 1.0, "random"), theirs) and not draws   # density >= 1: no draw


# ------------------------------------------------------------------------------------------ add_weighted_adapter
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lin = nn.Linear(8, 6)
        self.c1d = Conv1D(5, 6)   # transformers: nf=5 outputs, nx=6 inputs, weight (6, 5)
        self.conv = nn.Conv2d(4, 7, (3, 2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.c1d(self.lin(self.emb(ids)))


LAYOUTS = {"emb": LoRAEmbedding, "lin": LoRALinear, "c1d": LoRAConv1D, "conv": LoRAConv2d}
#: (r, alpha, use_rslora, targets) of the source adapters; the third is absent from c1d
SAME_RANK = [(4, 8, False, ["emb", "lin", "c1d", "conv"]), (4, 3, False, ["emb", "lin", "c1d", "conv"]), (4, 6, True, ["emb", "lin"])]
MIXED_RANK = [(4, 8, False, ["emb", "lin", "c1d", "conv"]), (2, 5, False, ["emb", "lin", "c1d", "conv"]), (3, 6, True, ["emb", "lin"])]
WEIGHTS = [0.7, -1.3, 0.4]


def _peft_model(specs: list[tuple[int, float, bool, list[str]]]) -> nn.Module:
    torch.manual_seed(0)
    model = None
    for i, (r, alpha, rslora, targets) in enumerate(specs):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # fan_in_fan_out set for Conv1D
            if model is None:
                model = peft.get_peft_model(Tiny(), cfg, adapter_name=f"a{i}")
            else:
                model.add_adapter(f"a{i}", cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():   # B is zero at init: every tensor random
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _tensors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone()
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter].detach().clone(), layer.lora_embedding_B[adapter].detach().clone()
    return None


CASES = [(t, n) for t in COMBINATION_TYPES for n in (2, 3)] + [("svd_clamp", 3), ("ties_frequency", 3), ("svd_reduced", 3)]


@pytest.mark.parametrize(("combination_type", "n"), CASES)
def test_add_weighted_adapter_equals_peft(draws: list, combination_type: str, n: int) -> None:
    options: dict = {}
    if combination_type == "svd_clamp":
        combination_type, options = "svd", {"svd_clamp": 0.9}
    if combination_type == "svd_reduced":
        combination_type, options = "magnitude_prune_svd", {"svd_full_matrices": False}
    if combination_type == "ties_frequency":
        combination_type, options = "dare_ties_svd", {"majority_sign_method": "frequency"}
    if combination_type in combine.PRUNING_TYPES:
        options["density"] = 0.5
    if combination_type.endswith("svd") and n == 3:
        options["svd_rank"] = 3
    specs = (SAME_RANK if combination_type in combine.AB_SPACE_TYPES else MIXED_RANK)[:n]
    names, weights = [f"a{i}" for i in range(n)], WEIGHTS[:n]
    model = _peft_model(specs)
    layers = _lora_layers(model)
    sources = {id(m): [(_tensors(m, a), m.scaling.get(a)) for a in names] for _, m in layers}

    draws.clear()
    model.add_weighted_adapter(names, weights, "new", combination_type=combination_type, **options)
    their_draws = list(draws)
    draws.clear()

    plan = check_combination([s[0] for s in specs], weights, combination_type, use_rslora=specs[0][2], **options)
    assert plan.r == model.peft_config["new"].r and plan.lora_alpha == model.peft_config["new"].lora_alpha
    for short, layer in layers:
        present = [(ab[0], ab[1], s) for ab, s in sources[id(layer)] if ab is not None]
        present_weights = [w for (ab, _), w in zip(sources[id(layer)], weights) if ab is not None]
        assert len(present) == (n if short not in ("c1d", "conv") or n < 3 else 2)
        new_a, new_b = combine_layer(LAYOUTS[short], present, present_weights, plan)
        their_a, their_b = _tensors(layer, "new")
        # a conv kernel's delta: PEFT convolves, `LoRAConv2d.delta_from` is an einsum; the rounding differs
        # (~1e-7) and the SVD carries it to ~1e-5: 1e-4 there, bit-exact (1e-6 asked) for the other layers
        tol = 1e-4 if short == "conv" and combination_type.endswith("svd") else 1e-6
        _close(new_a, their_a, tol)
        _close(new_b, their_b, tol)
        assert layer.scaling["new"] == pytest.approx(plan.scaling, rel=1e-12)
    assert draws == their_draws
    assert len(draws) == (0 if "dare" not in combination_type else
                          sum(len([1 for ab, _ in sources[id(m)] if ab]) for _, m in layers)
                          * (1 if combination_type.endswith("svd") else 2))


def test_rslora_quirk_scaling_sqrt_r() -> None:
    plan = check_combination([4, 4], [1.0, 1.0], "cat", use_rslora=True)
    assert (plan.r, plan.lora_alpha, plan.scaling) == (8, 8.0, pytest.approx(8 ** 0.5))
    assert check_combination([4, 2], [1.0, 1.0], "svd").scaling == 1.0


def test_one_adapter_is_linear_and_rank_rules() -> None:
    assert check_combination([4], [2.0], "svd").combination_type == "linear"
    assert check_combination([4, 2], [1.0, 1.0], "svd").r == 4
    assert check_combination([4, 2], [1.0, 1.0], "svd", svd_rank=2).r == 2
    assert check_combination([4, 2, 3], [1.0, 1.0, 1.0], "cat").r == 9
    assert check_combination([4, 4], [1.0, 1.0], "magnitude_prune", density=0.5).r == 4


def test_cat_delta_is_the_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(3)
    src = [(torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen), 1.5),
           (torch.randn(3, 5, generator=gen), torch.randn(6, 3, generator=gen), 0.25)]
    a, b = combine_layer(LinearLayout, src, [0.5, -2.0], check_combination([2, 3], [0.5, -2.0], "cat"))
    expected = sum(w * LinearLayout.delta_from(sa, sb, s) for (sa, sb, s), w in zip(src, [0.5, -2.0]))
    torch.testing.assert_close(LinearLayout.delta_from(a, b, 1.0), expected)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: check_combination([], [], "svd"), "no adapters"),
    (lambda: check_combination([4, 4], [1.0], "linear"), "one weight per adapter"),
    (lambda: check_combination([4, 4], [1.0, float("nan")], "linear"), "finite numbers"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "mean"), "combination_type='mean' is unknown"),
    (lambda: check_combination([4, 2], [1.0, 1.0], "ties", density=0.5), "needs adapters of one rank"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "ties"), "density=None is invalid"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "dare_linear_svd", density=-0.1), "density=-0.1 is invalid"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "ties", density=0.5, majority_sign_method="mode"),
     "majority_sign_method='mode'"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "svd", svd_rank=0), "svd_rank=0 is invalid"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "svd", svd_clamp=1.5), "svd_clamp=1.5 is invalid"),
    (lambda: check_combination([4, 4], [1.0, 1.0], "svd", svd_driver="lapack"), "svd_driver='lapack'"),
    (lambda: combine_layer(LinearLayout, [], [], check_combination([4], [1.0])), "no source adapter"),
    (lambda: combine_layer(LinearLayout, [(torch.ones(1, 2), torch.ones(2, 1), 1.0)] * 2, [1.0, 1.0],
                           check_combination([1, 1], [1.0, 1.0], "svd", svd_driver="gesvd")), "needs CUDA tensors"),
    (lambda: combine_layer(LinearLayout, [(torch.ones(1, 2), torch.ones(2, 1), 1.0), (torch.ones(2, 2),
                           torch.ones(2, 2), 1.0)], [1.0, 1.0], check_combination([2, 2], [1.0, 1.0], "linear")),
     "A and B of one shape"),
    (lambda: combine.prune(torch.ones(2), -1.0, "magnitude"), "density=-1.0"),
    (lambda: combine.prune(torch.ones(2), 0.5, "smallest"), "'smallest' is unknown"),
    (lambda: combine.majority_sign_mask(torch.ones(2, 2), "mode"), "majority_sign_method='mode'"),
])
def test_errors_are_one_line_lora_errors(call, match: str) -> None:
    with pytest.raises(LoRAError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_density_one_warns_once_and_prunes_nothing() -> None:
    with pytest.warns(UserWarning, match="prunes nothing"):
        plan = check_combination([2, 2], [1.0, 1.0], "ties", density=1.0)
    src = [(torch.ones(2, 3), torch.ones(4, 2), 1.0), (-torch.ones(2, 3), torch.ones(4, 2), 1.0)]
    a, _ = combine_layer(LinearLayout, src, [1.0, 0.5], plan)
    assert torch.equal(a, torch.ones(2, 3))   # ties: the unweighted A's sum to 0, + elected

