"""`lightning_lora.profiling`: the dispatch counter counts exactly what runs, by phase and category."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lora.profiling import (
    CATEGORIES,
    DispatchCounter,
    count_dispatches,
    op_category,
)

aten = torch.ops.aten


def _linear_step() -> tuple[DispatchCounter, nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    counter = DispatchCounter()
    with counter:
        with counter.phase("forward"):
            loss = lin(x).relu().sum()
        with counter.phase("backward"):
            loss.backward()
        with counter.phase("optimizer"):
            opt.step()
    return counter, lin, x


def test_counts_a_training_step_of_a_linear_layer_exactly():
    counter, _, _ = _linear_step()
    assert counter.phases() == ["forward", "backward", "optimizer"]
    # forward: F.linear on a 2-D input with bias is one addmm (weight.t() a view); relu; sum
    assert counter.ops(phase="forward") == {"aten.addmm": 1, "aten.relu": 1, "aten.sum": 1}
    # backward: the seed gradient, relu's, the weight's (x^T g: one mm), the bias's (a sum); x needs none
    assert counter.ops(phase="backward") == {"aten.mm": 1, "aten.ones_like": 1, "aten.sum": 1,
                                             "aten.threshold_backward": 1}
    assert counter.ops(phase="optimizer") == {"aten.add_": 2}          # SGD: one update per parameter
    assert counter.total() == 9
    assert counter.total(phase="forward") == 3 and counter.total(phase="backward") == 4
    # views and profiler markers are counted apart, never as operators
    assert counter.ops("view", phase="forward") == {"aten.detach": 1, "aten.t": 1}
    assert counter.ops("other", phase="optimizer") == {"profiler._record_function_enter_new": 1,
                                                       "profiler._record_function_exit": 1}
    assert counter.total(None) == counter.total("compute") + counter.total("view") + counter.total("other")


def test_counting_changes_nothing():
    _, lin, x = _linear_step()
    torch.manual_seed(0)
    ref = nn.Linear(4, 3)
    ref_x = torch.randn(2, 4)
    ref(ref_x).relu().sum().backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    assert torch.equal(x, ref_x)
    assert torch.equal(lin.weight, ref.weight) and torch.equal(lin.bias, ref.bias)


def test_linear_on_a_3d_input_is_one_mm_plus_views():
    w = torch.randn(3, 4)
    _, counter = count_dispatches(torch.nn.functional.linear, torch.randn(2, 5, 4), w)
    assert counter.ops() == {"aten.mm": 1}
    assert counter.ops("view") == {"aten._unsafe_view": 1, "aten.t": 1, "aten.view": 1}


@pytest.mark.parametrize(("op", "category"), [
    (aten.view.default, "view"), (aten.t.default, "view"), (aten.transpose.int, "view"),
    (aten.expand.default, "view"), (aten.slice.Tensor, "view"), (aten.detach.default, "view"),
    (aten.split.Tensor, "view"), (aten._unsafe_view.default, "view"),
    (aten.empty.memory_format, "other"), (aten.empty_like.default, "other"), (aten.empty_strided.default, "other"),
    (aten.resize_.default, "other"),
    (aten.mm.default, "compute"), (aten.add_.Tensor, "compute"), (aten.copy_.default, "compute"),
    (aten._to_copy.default, "compute"), (aten.masked_fill_.Scalar, "compute"), (aten.clone.default, "compute"),
    (aten.random_.default, "compute"), (aten._local_scalar_dense.default, "compute"),
])
def test_op_category(op, category):
    assert op_category(op) == category


def test_phases_nest_and_restore():
    a = torch.ones(3)
    counter = DispatchCounter()
    with counter:
        a.add(1)
        with counter.phase("outer"):
            a.mul(2)
            with counter.phase("inner"):
                a.sub(1)
            a.div(2)
        a.neg()
    assert counter.ops(phase="all") == {"aten.add": 1, "aten.neg": 1}
    assert counter.ops(phase="outer") == {"aten.div": 1, "aten.mul": 1}
    assert counter.ops(phase="inner") == {"aten.sub": 1}
    assert counter.phases() == ["all", "outer", "inner"]


def test_counts_are_per_device_and_a_fresh_counter_starts_at_zero():
    with DispatchCounter() as counter:
        torch.ones(2).sum().item()
    assert counter.ops() == {"aten._local_scalar_dense": 1, "aten.ones": 1, "aten.sum": 1}
    assert counter.summary()["devices"] == {"cpu": 3}
    assert DispatchCounter().total(None) == 0


def test_summary_is_json_ready_and_consistent():
    import json

    counter, _, _ = _linear_step()
    s = json.loads(json.dumps(counter.summary()))
    assert set(s) == {"total", "phases", "devices", "ops"}
    assert list(s["total"]) == list(CATEGORIES)
    assert s["total"]["compute"] == sum(p["compute"] for p in s["phases"].values()) == 9
    assert s["phases"]["backward"] == {"compute": 4, "view": 8, "other": 0}
    assert sum(sum(ops.values()) for ops in s["ops"].values()) == 9


def test_count_dispatches_returns_the_result():
    out, counter = count_dispatches(torch.matmul, torch.ones(2, 3), torch.ones(3))
    assert torch.equal(out, torch.full((2,), 3.0))
    assert counter.ops() == {"aten.mv": 1}
