"""Count the operators a piece of PyTorch code dispatches: our device-independent proxy for kernel launches.

On a GPU a LoRA training step at small batch is launch-bound: its time follows the number of kernels it
launches more than its FLOPs. Each kernel is launched by an ATen operator, and which operators run does
not depend on the device, so counting them on CPU tells how a change to the adapter layers moves the
launch count on CUDA. `DispatchCounter` is a `TorchDispatchMode`: it sees every ATen operator that
reaches the dispatcher below autograd (forward, the backward that autograd runs, the optimizer),
after composite operators were decomposed (`F.linear` on a 3-D input shows as `mm` plus views).

Every operator falls into one of three categories:

* ``compute``: may launch a kernel (matmuls, pointwise, reductions, copies, casts, fills, random draws).
  This is the count that matters.
* ``view``: returns an alias of an input (`view`, `t`, `transpose`, `expand`, `slice`, `detach`,
  `_unsafe_view`, ...): metadata only, no kernel.
* ``other``: allocation, metadata query or profiler marker only (`empty`, `empty_strided`,
  `empty_like`, `resize_`, `record_function` enter/exit, ...): no kernel.

Counts can be split into named phases (forward, backward, optimizer) with `DispatchCounter.phase`.

Example:
    >>> import torch
    >>> from lightning_lora.profiling import DispatchCounter
    >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
    >>> with DispatchCounter() as counter:
    ...     y = (a @ b).relu().t()
    >>> counter.total(), counter.total("view"), counter.ops()
    (2, 1, {'aten.mm': 1, 'aten.relu': 1})
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("compute", "view", "other")
#: operators that allocate, answer a metadata question or mark a profiler range, without running a kernel
OTHER_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "resize_as_", "set_",
    "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "record_stream", "_record_function_enter", "_record_function_enter_new",
    "_record_function_exit",
})
#: operators whose schema does not say so but that return a view of their input
VIEW_OPS = frozenset({"_unsafe_view", "lift_fresh", "_reshape_alias"})


def op_category(func: Any) -> str:
    """`"view"`, `"other"` or `"compute"` for an operator overload (see the module docstring).

    Example:
        >>> import torch
        >>> [op_category(f) for f in (torch.ops.aten.view.default, torch.ops.aten.empty.memory_format,
        ...                           torch.ops.aten.add_.Tensor)]
        ['view', 'other', 'compute']
    """
    name = func.overloadpacket.__name__
    if name in OTHER_OPS:
        return "other"
    if name in VIEW_OPS:
        return "view"
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return "view"
    return "compute"


def _op_name(func: Any) -> str:
    return f"{func.namespace}.{func.overloadpacket.__name__}"


def _device_of(args: Any, kwargs: Any, out: Any) -> str:
    for item in tree_flatten((args, kwargs, out))[0]:
        if isinstance(item, torch.Tensor):
            return item.device.type
    return "none"


class DispatchCounter(TorchDispatchMode):
    """Counts the operators dispatched while it is active, by phase, category, device and name.

    Use it as a context manager around the code to count; it runs every operator unchanged. It must be
    active when autograd runs the backward (call `loss.backward()` inside it), so that the backward's
    operators are counted too. Overhead is a few microseconds of Python per operator; never time code
    while counting.

    Attributes:
        counts: `Counter` keyed `(phase, category, device type, "<namespace>.<op>")`; the device is that
            of the first tensor among the operator's arguments and outputs (`"none"` without any).

    Example:
        >>> import torch
        >>> w = torch.ones(4, 4, requires_grad=True)
        >>> counter = DispatchCounter()
        >>> with counter:
        ...     with counter.phase("forward"):
        ...         loss = (torch.ones(2, 4) @ w).sum()
        ...     with counter.phase("backward"):
        ...         loss.backward()
        >>> counter.total(phase="forward"), counter.ops(phase="forward")
        (3, {'aten.mm': 1, 'aten.ones': 1, 'aten.sum': 1})
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str, str, str]] = Counter()
        self._phase = "all"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the operators dispatched inside the block to phase `name` (outside any: `"all"`)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counts[(self._phase, op_category(func), _device_of(args, kwargs, out), _op_name(func))] += 1
        return out

    # ------------------------------------------------------------------ queries
    def _select(self, category: str | None, phase: str | None, device: str | None) -> Iterator[tuple[str, int]]:
        for (ph, cat, dev, op), n in self.counts.items():
            if (category is None or cat == category) and (phase is None or ph == phase) \
                    and (device is None or dev == device):
                yield op, n

    def total(self, category: str | None = "compute", phase: str | None = None, device: str | None = None) -> int:
        """Operators of `category` (None: all) dispatched in `phase` (None: all) on `device` (None: any)."""
        return sum(n for _, n in self._select(category, phase, device))

    def ops(self, category: str | None = "compute", phase: str | None = None,
            device: str | None = None) -> dict[str, int]:
        """`{"aten.<op>": calls}` sorted by name (`<namespace>.<op>`), for the same filters as `total`."""
        out: Counter[str] = Counter()
        for op, n in self._select(category, phase, device):
            out[op] += n
        return dict(sorted(out.items()))

    def phases(self) -> list[str]:
        """The phases seen, in first-seen order."""
        return list(dict.fromkeys(ph for ph, _, _, _ in self.counts))

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: totals per category, per phase (per category), compute operators per
        device, and the compute operators by name per phase.

        Example:
            >>> import torch
            >>> with DispatchCounter() as c:
            ...     _ = torch.ones(3).view(1, 3) * 2
            >>> s = c.summary()
            >>> s["total"], s["phases"]["all"]["compute"], s["ops"]["all"]
            ({'compute': 2, 'view': 1, 'other': 0}, 2, {'aten.mul': 1, 'aten.ones': 1})
        """
        phases = self.phases()
        return {
            "total": {cat: self.total(cat) for cat in CATEGORIES},
            "phases": {ph: {cat: self.total(cat, ph) for cat in CATEGORIES} for ph in phases},
            "devices": {dev: self.total("compute", device=dev)
                        for dev in sorted({d for _, cat, d, _ in self.counts if cat == "compute"})},
            "ops": {ph: self.ops("compute", ph) for ph in phases},
        }


def count_dispatches(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, DispatchCounter]:
    """`fn(*args, **kwargs)` run under a fresh `DispatchCounter`: `(its result, the counter)`.

    Example:
        >>> import torch
        >>> _, counter = count_dispatches(torch.add, torch.ones(2), torch.ones(2))
        >>> counter.ops()
        {'aten.add': 1}
    """
    with DispatchCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter
