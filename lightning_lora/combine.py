"""Combining LoRA adapters into one (the math of PEFT's `add_weighted_adapter`), as pure functions on tensors.

Three parts, torch only:

- **Merge methods** on a list of same-shape task tensors `t_i` and weights `w_i` (PEFT's `merge_utils`):
  `task_arithmetic` (sum of `w_i * t_i`), `magnitude_prune` (keep the top `density` fraction of each `t_i`
  by magnitude, then task arithmetic), `ties` (magnitude pruning, a majority sign per element, then the mean
  of the weighted tensors that agree with it: `disjoint_merge`), `dare_linear` (keep each element with
  probability `density`, rescaled by `1 / density`, then task arithmetic) and `dare_ties` (that random
  pruning, then the ties steps). The random pruning draws `torch.bernoulli(torch.full_like(t, density))` once
  per tensor, in list order, as PEFT does: under one seed the masks are PEFT's.
- **Per-layer combinations** (`combine_layer`): from the `(A, B, scaling)` of each source adapter present
  in one layer, the new adapter's `(A, B)`. `cat` stacks the ranks (`A = cat(w_i s_i A_i)`,
  `B = cat(B_i)`); `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` merge the A's and the B's
  separately with weights `sign(c_i) sqrt|c_i|` on A and `sqrt|c_i|` on B (`c_i = w_i * scaling_i`); the
  `*svd` types merge the deltas `scaling_i B_i A_i` (the layer type's `delta_from`) and factor the result
  back to rank `r` with `torch.linalg.svd`.
- **Config-level checks** (`check_combination`): rank rules, the new rank and the new adapter's alpha
  (`= r`, so its scaling is 1; with rsLoRA `sqrt(r)`, PEFT's quirk, kept), raising one-line `LoRAError`s.

Example:
    >>> a, b = torch.ones(2, 3), torch.ones(4, 2)
    >>> plan = check_combination([2, 2], [0.5, 0.5], "linear")
    >>> new_a, new_b = combine_layer(LinearLayout, [(a, b, 1.0), (2 * a, b, 1.0)], [0.5, 0.5], plan)
    >>> round((new_b @ new_a * plan.scaling)[0, 0].item(), 4)   # `linear` is rough: not 0.5*2 + 0.5*4 = 3
    6.0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from lightning_lora.errors import LoRAError

#: one source adapter in one layer: its A, its B and its scaling (alpha / r, or alpha / sqrt(r) with rsLoRA)
Source = tuple[torch.Tensor, torch.Tensor, float]

#: the combination types, PEFT's names
AB_SPACE_TYPES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES: tuple[str, ...] = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES: tuple[str, ...] = ("cat", *AB_SPACE_TYPES, *SVD_TYPES)
#: the combination types that prune, so need `density`
PRUNING_TYPES: tuple[str, ...] = tuple(t for t in COMBINATION_TYPES if t not in ("cat", "linear", "svd"))
MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
SVD_DRIVERS: tuple[str | None, ...] = (None, "gesvd", "gesvdj", "gesvda")


# ---------------------------------------------------------------------------------------------- merge methods
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`stacked` (n, ...) times `weights` (n,) broadcast over the trailing dimensions."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its `int(density * numel)` largest-magnitude elements set to zero.

    Args:
        tensor: any shape, floating dtype.
        density: the fraction kept, in [0, 1).

    Returns:
        A tensor of `tensor`'s shape and dtype (ties in magnitude resolved by `torch.topk`).

    Example:
        >>> magnitude_based_pruning(torch.tensor([1.0, -4.0, 2.0, 3.0]), 0.5).tolist()
        [0.0, -4.0, 0.0, 3.0]
    """
    mask = torch.zeros_like(tensor).reshape(-1)
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices
    mask[keep] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """`tensor` with each element kept with probability `density` (one `torch.bernoulli` draw for the tensor).

    Args:
        tensor: any shape, floating dtype.
        density: the probability of keeping an element, in (0, 1).
        rescale: divide what is kept by `density` (DARE), so the expected value is `tensor`.

    Returns:
        A tensor of `tensor`'s shape and dtype.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> out = random_pruning(torch.ones(1000), 0.25, rescale=True)
        >>> sorted(set(out.tolist())), 150 < int((out > 0).sum()) < 350
        ([0.0, 4.0], True)
    """
    pruned = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    """Prune `tensor` by `method` ("magnitude" or "random"); `density >= 1` returns it unchanged (no draw).

    Args:
        tensor: any shape, floating dtype.
        density: the fraction kept, >= 0 (`check_combination` warns once for >= 1).
        method: "magnitude" (`magnitude_based_pruning`) or "random" (`random_pruning`).
        rescale: for "random": divide by `density`.

    Returns:
        A tensor of `tensor`'s shape and dtype.

    Raises:
        LoRAError: a negative `density` or an unknown `method`.

    Example:
        >>> prune(torch.tensor([1.0, -3.0]), 1.0, "random").tolist()
        [1.0, -3.0]
    """
    if density < 0:
        raise LoRAError(f"density={density} is invalid; expected a fraction in [0, 1], e.g. density=0.5.")
    if density >= 1:
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise LoRAError(f"pruning method {method!r} is unknown; expected 'magnitude' or 'random'.")


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Where each task tensor agrees with the elected sign (TIES' "elect sign"); ties elect +.

    Args:
        stacked: (n, ...) the n task tensors stacked on dimension 0.
        method: "total" (the sign of the sum) or "frequency" (the sign of the sum of signs).

    Returns:
        A bool tensor of `stacked`'s shape.

    Raises:
        LoRAError: an unknown `method`.

    Example:
        >>> majority_sign_mask(torch.tensor([[1.0, -1.0], [-3.0, -1.0], [1.0, 2.0]]), "frequency").tolist()
        [[True, True], [False, True], [True, False]]
    """
    signs = stacked.sign()
    if method not in MAJORITY_SIGN_METHODS:
        raise LoRAError(f"majority_sign_method={method!r} is invalid; expected one of {list(MAJORITY_SIGN_METHODS)}.")
    elected = (stacked if method == "total" else signs).sum(dim=0)
    return signs == torch.where(elected >= 0, 1, -1)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over dimension 0 of the elements of `stacked` where `mask` holds (0 where none does).

    Args:
        stacked: (n, ...) the weighted task tensors.
        mask: bool (n, ...), e.g. `majority_sign_mask` of the unweighted tensors.

    Returns:
        A tensor of shape `stacked.shape[1:]`.

    Example:
        >>> disjoint_merge(torch.tensor([[2.0, 5.0], [4.0, 1.0]]), torch.tensor([[True, False], [True, False]]))
        tensor([3., 0.])
    """
    return (stacked * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`sum_i weights[i] * tensors[i]`.

    Args:
        tensors: n tensors of one shape.
        weights: (n,) float32.

    Returns:
        A tensor of the tensors' shape (dtype promoted with `weights`').

    Example:
        >>> task_arithmetic([torch.ones(2), torch.full((2,), 3.0)], torch.tensor([0.5, -1.0])).tolist()
        [-2.5, -2.5]
    """
    return _weighted(torch.stack(list(tensors), dim=0), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """`task_arithmetic` of the tensors after `magnitude_based_pruning` of each at `density`.

    Args:
        tensors: n tensors of one shape.
        weights: (n,) float32.
        density: the fraction of each tensor kept.

    Returns:
        A tensor of the tensors' shape.

    Example:
        >>> magnitude_prune([torch.tensor([1.0, 2.0]), torch.tensor([4.0, 3.0])], torch.ones(2), 0.5).tolist()
        [4.0, 2.0]
    """
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def _ties_steps(pruned: Sequence[torch.Tensor], weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    stacked = torch.stack(list(pruned), dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    """TIES: magnitude pruning of each tensor, the majority sign of the pruned (unweighted) tensors, then
    `disjoint_merge` of the weighted ones.

    Args:
        tensors: n tensors of one shape.
        weights: (n,) float32.
        density: the fraction of each tensor kept.
        majority_sign_method: "total" or "frequency" (`majority_sign_mask`).

    Returns:
        A tensor of the tensors' shape.

    Example:
        >>> ties([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], torch.ones(2), 1.0).tolist()
        [2.0, -2.0]
    """
    return _ties_steps([prune(t, density, "magnitude") for t in tensors], weights, majority_sign_method)


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: random pruning of each tensor (rescaled by `1 / density`), then `task_arithmetic`; one
    `torch.bernoulli` draw per tensor, in order.

    Args:
        tensors: n tensors of one shape.
        weights: (n,) float32.
        density: the probability of keeping an element.

    Returns:
        A tensor of the tensors' shape.

    Example:
        >>> dare_linear([torch.ones(3), torch.ones(3)], torch.tensor([1.0, 2.0]), 1.0).tolist()
        [3.0, 3.0, 3.0]
    """
    return task_arithmetic([prune(t, density, "random", rescale=True) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: str = "total") -> torch.Tensor:
    """DARE then TIES: random pruning of each tensor (rescaled, one draw per tensor), the majority sign,
    then `disjoint_merge`.

    Args:
        tensors: n tensors of one shape.
        weights: (n,) float32.
        density: the probability of keeping an element.
        majority_sign_method: "total" or "frequency".

    Returns:
        A tensor of the tensors' shape.

    Example:
        >>> dare_ties([torch.tensor([1.0]), torch.tensor([-3.0])], torch.ones(2), 1.0).tolist()
        [-3.0]
    """
    pruned = [prune(t, density, "random", rescale=True) for t in tensors]
    return _ties_steps(pruned, weights, majority_sign_method)


#: merge method of each combination type (the `_svd` suffix dropped): f(tensors, weights, density, sign_method)
MergeMethod = Callable[[Sequence[torch.Tensor], torch.Tensor, "float | None", str], torch.Tensor]
MERGE_METHODS: dict[str, MergeMethod] = {
    "linear": lambda t, w, density, sign: task_arithmetic(t, w),
    "svd": lambda t, w, density, sign: task_arithmetic(t, w),
    "ties": lambda t, w, density, sign: ties(t, w, density, sign),
    "dare_linear": lambda t, w, density, sign: dare_linear(t, w, density),
    "dare_ties": lambda t, w, density, sign: dare_ties(t, w, density, sign),
    "magnitude_prune": lambda t, w, density, sign: magnitude_prune(t, w, density),
}


# ---------------------------------------------------------------------------------------------- config level
@dataclass(frozen=True)
class CombinationPlan:
    """What `check_combination` decided for the new adapter (its config: `r`, `lora_alpha`, `rank_pattern={}`,
    `alpha_pattern={}`, the rest from the first source adapter).

    Attributes:
        combination_type: the type used (`linear` when there is one source adapter, as PEFT).
        r: the new adapter's rank (`cat`: the sum; `*svd`: `svd_rank` or the largest; else the common rank).
        lora_alpha: `r`.
        scaling: the new adapter's scaling: 1.0, or `sqrt(r)` with rsLoRA (PEFT keeps `use_rslora`).
        density: the pruning density (None for `cat`, `linear`, `svd`).
        majority_sign_method: "total" or "frequency".
        svd_clamp: the quantile clamp of the SVD factors, or None.
        svd_full_matrices: `torch.linalg.svd`'s `full_matrices`.
        svd_driver: `torch.linalg.svd`'s `driver` (CUDA only), or None.

    Example:
        >>> check_combination([4, 8], [1.0, 1.0], "cat").r
        12
    """

    combination_type: str
    r: int
    lora_alpha: float
    scaling: float
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


def check_combination(ranks: Sequence[int], weights: Sequence[float], combination_type: str = "svd", *,
                      svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                      svd_driver: str | None = None, density: float | None = None,
                      majority_sign_method: str = "total", use_rslora: bool = False) -> CombinationPlan:
    """Check a combination of adapters and decide the new adapter's rank, alpha and scaling (PEFT's rules).

    Args:
        ranks: each source adapter's rank (with a `rank_pattern`: the largest of `r` and its values).
        weights: one weight per source adapter (negative subtracts).
        combination_type: one of `COMBINATION_TYPES`; with one adapter `linear` is used whatever is asked.
        svd_rank: the `*svd` types' new rank (default: the largest of `ranks`).
        svd_clamp: a quantile in [0, 1] at which the SVD factors are clamped, or None.
        svd_full_matrices: passed to `torch.linalg.svd`.
        svd_driver: None, "gesvd", "gesvdj" or "gesvda" (CUDA only).
        density: the fraction kept by the pruning types, in [0, 1] (>= 1 prunes nothing and warns).
        majority_sign_method: "total" or "frequency" (the ties types).
        use_rslora: the first source adapter's `use_rslora` (the new adapter keeps it: scaling `sqrt(r)`).

    Returns:
        The `CombinationPlan`.

    Raises:
        LoRAError: no adapters, weights that do not match, an unknown type or option, unequal ranks for the
            A/B-space types, a missing or negative density.

    Example:
        >>> check_combination([8, 8], [1.0, -0.5], "ties", density=0.5).scaling
        1.0
        >>> check_combination([8, 4], [1.0, 1.0], "linear")
        Traceback (most recent call last):
        lightning_lora.errors.LoRAError: combination_type='linear' needs adapters of one rank, got ranks [8, 4]; use combination_type='cat' or 'svd', which take different ranks.
    """
    if not ranks:
        raise LoRAError("add_weighted_adapter got no adapters; expected the names of one or more existing adapters.")
    if len(weights) != len(ranks):
        raise LoRAError(f"weights={list(weights)} has {len(weights)} values for {len(ranks)} adapters; expected one "
                        "weight per adapter.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise LoRAError(f"weights={list(weights)} is invalid; expected finite numbers, e.g. weights=[0.5, 0.5].")
    if combination_type not in COMBINATION_TYPES:
        raise LoRAError(f"combination_type={combination_type!r} is unknown; expected one of {list(COMBINATION_TYPES)}.")
    combination_type = "linear" if len(ranks) == 1 else combination_type
    if combination_type in AB_SPACE_TYPES:
        if len(set(ranks)) != 1:
            raise LoRAError(f"combination_type={combination_type!r} needs adapters of one rank, got ranks "
                            f"{list(ranks)}; use combination_type='cat' or 'svd', which take different ranks.")
        r = int(ranks[0])
    elif combination_type == "cat":
        r = int(sum(ranks))
    else:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise LoRAError(f"svd_rank={svd_rank!r} is invalid; expected an integer > 0 or None, e.g. svd_rank=8.")
        r = int(svd_rank or max(ranks))
    if combination_type in PRUNING_TYPES:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) or density < 0:
            raise LoRAError(f"density={density!r} is invalid for combination_type={combination_type!r}; expected a "
                            "fraction in [0, 1], e.g. density=0.5.")
        if density >= 1:
            warnings.warn(f"density={density} >= 1: {combination_type!r} prunes nothing.", stacklevel=2)
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise LoRAError(f"majority_sign_method={majority_sign_method!r} is invalid; expected one of "
                        f"{list(MAJORITY_SIGN_METHODS)}.")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise LoRAError(f"svd_clamp={svd_clamp!r} is invalid; expected a quantile in [0, 1] or None, e.g. 0.99.")
    if svd_driver not in SVD_DRIVERS:
        raise LoRAError(f"svd_driver={svd_driver!r} is invalid; expected one of {list(SVD_DRIVERS)}.")
    return CombinationPlan(combination_type, r, float(r), math.sqrt(r) if use_rslora else 1.0,
                           float(density) if density is not None else None, majority_sign_method,
                           None if svd_clamp is None else float(svd_clamp), bool(svd_full_matrices), svd_driver)


# ---------------------------------------------------------------------------------------------- one layer
class LayerLayout(Protocol):
    """What `combine_layer` needs of a layer type (a `lightning_lora.layers.LoRALayer` subclass answers it).

    Attributes:
        peft_layer_type: "linear" or "embedding" (an embedding's delta is stored (num_embeddings, dim)).
        fan_in_fan_out: whether the base weight is stored (in, out) (transformers' `Conv1D`).

    Example:
        >>> LinearLayout.delta_from(torch.ones(1, 2), torch.ones(3, 1), 2.0).shape
        torch.Size([3, 2])
    """

    peft_layer_type: ClassVar[str]
    fan_in_fan_out: ClassVar[bool]

    @classmethod
    def delta_from(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor: ...


class LinearLayout:
    """The layout of `nn.Linear`: A (r, in), B (out, r), delta `scaling * B @ A` (out, in) in float32; a
    stand-in for `LoRALinear` where no layer class is at hand.

    Example:
        >>> LinearLayout.delta_from(torch.ones(1, 2), torch.ones(3, 1), 0.5).tolist()
        [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """

    peft_layer_type: ClassVar[str] = "linear"
    fan_in_fan_out: ClassVar[bool] = False

    @classmethod
    def delta_from(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        return (b.float() @ a.float()) * scaling


def combine_cat(sources: Sequence[Source], weights: Sequence[float], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cat`: `A = cat_i(w_i * scaling_i * A_i)` on dimension 0 and `B = cat_i(B_i)` on dimension 1, zero-padded
    to rank `r` (a layer where some adapters have a smaller rank than their largest, or are absent).

    Args:
        sources: the (A (r_i, ...), B (out, r_i, ...), scaling_i) of the adapters present in the layer.
        weights: their weights.
        r: the new adapter's rank (`CombinationPlan.r`), >= sum of the r_i.

    Returns:
        (A (r, ...), B (out, r, ...)) in A_1's and B_1's dtypes; `B @ A` (scaling 1) = `sum_i w_i s_i B_i A_i`.

    Example:
        >>> a, b = combine_cat([(torch.ones(1, 2), torch.ones(3, 1), 2.0)], [0.5], 3)
        >>> a.tolist(), b.shape
        ([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], torch.Size([3, 3]))
    """
    a = torch.cat([src_a * w * s for (src_a, _, s), w in zip(sources, weights)], dim=0)
    b = torch.cat([src_b for _, src_b, _ in sources], dim=1)
    new_a = a.new_zeros((r, *a.shape[1:]))
    new_b = b.new_zeros((b.shape[0], r, *b.shape[2:]))
    new_a[: a.shape[0]] = a
    new_b[:, : b.shape[1]] = b
    return new_a, new_b


def ab_weights(sources: Sequence[Source], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the A's and of the B's: `sign(c_i) sqrt|c_i|` and `sqrt|c_i|`, `c_i = w_i * scaling_i`
    (the sign on A only, so a negative weight negates the product once).

    Args:
        sources: the (A, B, scaling) of the adapters present in the layer.
        weights: their weights.

    Returns:
        Two float32 tensors of shape (n,), on A_1's device.

    Example:
        >>> wa, wb = ab_weights([(torch.ones(1), torch.ones(1), 2.0)], [-2.0])
        >>> wa.tolist(), wb.tolist()
        ([-2.0], [2.0])
    """
    c, device = [w * s for (_, _, s), w in zip(sources, weights)], sources[0][0].device
    return (torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in c]).to(device),
            torch.tensor([math.sqrt(abs(x)) for x in c]).to(device))


def combine_ab_space(sources: Sequence[Source], weights: Sequence[float], plan: CombinationPlan,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: merge the A's (weights `ab_weights`' first)
    and then the B's (its second) with the type's merge method; the random types draw for A_1..A_n, then
    B_1..B_n.

    Args:
        sources: the (A (r, ...), B (out, r, ...), scaling) of the adapters present, of one rank.
        weights: their weights.
        plan: from `check_combination`.

    Returns:
        (A, B) of the sources' shapes, in A_1's dtype (both).

    Raises:
        LoRAError: sources of different shapes in this layer (a `rank_pattern` giving them different ranks).

    Example:
        >>> plan = check_combination([1, 1], [1.0, 1.0], "linear")
        >>> a, b = combine_ab_space([(torch.ones(1, 2), torch.ones(2, 1), 1.0)] * 2, [1.0, 1.0], plan)
        >>> (b @ a).tolist()
        [[4.0, 4.0], [4.0, 4.0]]
    """
    shapes = [(tuple(a.shape), tuple(b.shape)) for a, b, _ in sources]
    if len(set(shapes)) != 1:
        raise LoRAError(f"combination_type={plan.combination_type!r} needs the adapters' A and B of one shape in "
                        f"each layer, got {shapes}; use combination_type='cat' or 'svd'.")
    merge = MERGE_METHODS[plan.combination_type]
    weights_a, weights_b = ab_weights(sources, weights)
    dtype = sources[0][0].dtype
    a = merge([s[0] for s in sources], weights_a, plan.density, plan.majority_sign_method)
    b = merge([s[1] for s in sources], weights_b, plan.density, plan.majority_sign_method)
    return a.to(dtype), b.to(dtype)


def combine_svd(layout: type[LayerLayout], sources: Sequence[Source], weights: Sequence[float], plan: CombinationPlan,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: merge the deltas
    `layout.delta_from(A_i, B_i, scaling_i)` (one random draw per delta), bring the result to (out, in)
    (transposed for `fan_in_fan_out` and embeddings, flattened for conv kernels), and keep the top `plan.r`
    singular triplets: `B = U[:, :r] diag(S[:r])`, `A = Vh[:r]`, both clamped to the `svd_clamp` quantile of
    their values if set.

    Args:
        layout: the layer type (`delta_from`, `fan_in_fan_out`, `peft_layer_type`), e.g. `LoRALinear`.
        sources: the (A, B, scaling) of the adapters present in the layer.
        weights: their weights.
        plan: from `check_combination`.

    Returns:
        (A (r', ...), B (out, r', ...)) with r' = min(r, rank dimension of the SVD), in A_1's dtype, the SVD
        computed in float32 (the deltas are float32). Embeddings: A (r', num_embeddings), B (dim, r').

    Raises:
        LoRAError: `svd_driver` set for tensors not on CUDA.

    Example:
        >>> plan = check_combination([1, 1], [1.0, 1.0], "svd", svd_rank=1)
        >>> src = [(torch.ones(1, 2), torch.ones(3, 1), 1.0), (torch.ones(1, 2), 2 * torch.ones(3, 1), 1.0)]
        >>> a, b = combine_svd(LinearLayout, src, [1.0, 1.0], plan)
        >>> torch.allclose(b @ a, torch.full((3, 2), 3.0))
        True
    """
    a0, b0 = sources[0][0], sources[0][1]
    deltas = [layout.delta_from(a, b, s) for a, b, s in sources]
    merge = MERGE_METHODS[plan.combination_type.removesuffix("_svd")]
    delta = merge(deltas, torch.tensor([float(w) for w in weights]).to(deltas[0].device), plan.density,
                  plan.majority_sign_method)
    if plan.svd_driver is not None and delta.device.type != "cuda":
        raise LoRAError(f"svd_driver={plan.svd_driver!r} needs CUDA tensors, got {delta.device.type}; use "
                        "svd_driver=None (the default).")
    if delta.dim() > 2:
        delta = delta.flatten(start_dim=1)
    if layout.fan_in_fan_out or layout.peft_layer_type == "embedding":
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=plan.svd_full_matrices, driver=plan.svd_driver)
    u = u[:, : plan.r] @ torch.diag(s[: plan.r])
    vh = vh[: plan.r, :]
    if plan.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), plan.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    if a0.dim() > 2:
        vh = vh.reshape(vh.shape[0], *a0.shape[1:])
        u = u.reshape(*u.shape, *b0.shape[2:])
    return vh.to(a0.dtype), u.to(a0.dtype)


def combine_layer(layout: type[LayerLayout], sources: Sequence[Source], weights: Sequence[float],
                  plan: CombinationPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) in one layer, from the source adapters present in it (`plan.combination_type`
    picks `combine_cat`, `combine_ab_space` or `combine_svd`). Call it per layer in `named_modules` order, each
    layer's sources in the order of the adapters list, so the random draws are PEFT's.

    Args:
        layout: the layer type (`LoRALinear`, `LoRAConv1D`, `LoRAEmbedding`, ... or `LinearLayout`).
        sources: the (A, B, scaling) of the source adapters present in this layer (at least one), in order.
        weights: their weights (those of the absent adapters left out).
        plan: from `check_combination`.

    Returns:
        (A, B) to store as the new adapter's `lora_A.weight` and `lora_B.weight` (its scaling is `plan.scaling`).

    Raises:
        LoRAError: no source in the layer, or sources and weights of different lengths.

    Example:
        >>> plan = check_combination([2, 3], [1.0, 1.0], "cat")
        >>> src = [(torch.randn(2, 5), torch.randn(4, 2), 0.5), (torch.randn(3, 5), torch.randn(4, 3), 2.0)]
        >>> a, b = combine_layer(LinearLayout, src, [1.0, -1.0], plan)
        >>> torch.allclose(b @ a, 0.5 * src[0][1] @ src[0][0] - 2.0 * src[1][1] @ src[1][0], atol=1e-5)
        True
    """
    if not sources:
        raise LoRAError("combine_layer got no source adapter in this layer; expected at least one (A, B, scaling).")
    if len(sources) != len(weights):
        raise LoRAError(f"combine_layer got {len(sources)} sources and {len(weights)} weights; expected one weight "
                        "per source present in the layer.")
    if plan.combination_type == "cat":
        return combine_cat(sources, weights, plan.r)
    if plan.combination_type in AB_SPACE_TYPES:
        return combine_ab_space(sources, weights, plan)
    return combine_svd(layout, sources, weights, plan)
