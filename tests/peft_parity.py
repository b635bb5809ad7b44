"""Checks shared by the layer-kind tests of issue 22 (Conv1d/2d/3d, MultiheadAttention, target_parameters).

Public API and PEFT only: PEFT builds the reference adapter (random non-zero A and B), we load PEFT's file, and
every comparison goes through PEFT's on-disk format, so nothing here depends on our internal key names.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_lora import (
    LoRAConfig,
    disable_lora,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    unload,
    unmerge_adapter,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: F401 (re-exported)

ATOL = 1e-5
Factory = Callable[[], nn.Module]
Run = Callable[[nn.Module], torch.Tensor]


def randomize_peft(pm: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Non-zero A, B (and DoRA magnitudes nudged) in a PEFT model, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))


def randomize_ours(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Random values for every adapter tensor of our model (through lora_state_dict / load_lora_state_dict)."""
    gen = torch.Generator().manual_seed(seed)
    state = lora_state_dict(model)
    new = {k: (torch.randn(v.shape, generator=gen) * std).to(v.dtype) if ".lora_" in k else v for k, v in state.items()}
    load_lora_state_dict(model, new)


def adapter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in lora_state_dict(model).items() if ".lora_" in k}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sgd_step(model: nn.Module, run: Run, target: torch.Tensor, lr: float = 0.5) -> torch.Tensor:
    """One SGD step on (run(model) - target)^2; returns the loss before the step."""
    params = trainable(model)
    assert params, "nothing is trainable"
    opt = torch.optim.SGD(params, lr=lr)
    loss = (run(model) - target).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def peft_file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_close_dicts(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))
    for k in ours:
        assert ours[k].shape == theirs[k].shape, (k, ours[k].shape, theirs[k].shape)
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), atol=atol, rtol=0, msg=k)


def check_step0(factory: Factory, run: Run, config: LoRAConfig) -> nn.Module:
    """inject_lora leaves the function bit-exact (B = 0) and the base state-dict keys unchanged; returns the model."""
    base = factory()
    with torch.no_grad():
        expected = run(base)
    base_keys = set(base.state_dict())
    model = factory()
    names = inject_lora(model, config)
    assert names
    assert base_keys <= set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(run(model), expected)
    return model


def check_lifecycle(factory: Factory, run: Run, config: LoRAConfig, can_merge: bool = True) -> None:
    """merge_adapter / unmerge_adapter / disable_lora / merge_and_unload / unload / state-dict round trip."""
    base = factory()
    base_types = {n: type(m) for n, m in base.named_modules()}
    base_keys = set(base.state_dict())
    with torch.no_grad():
        base_out = run(base)
    model = factory()
    inject_lora(model, config)
    randomize_ours(model)
    with torch.no_grad():
        adapted = run(model)
        assert not torch.allclose(adapted, base_out, atol=1e-4), "the adapter changes nothing"
        with disable_lora(model):
            torch.testing.assert_close(run(model), base_out, atol=0, rtol=0)
        again = factory()
        inject_lora(again, config)
        load_lora_state_dict(again, lora_state_dict(model))
        assert torch.equal(run(again), adapted)
        if can_merge:
            merge_adapter(model)
            torch.testing.assert_close(run(model), adapted, atol=ATOL, rtol=0)
            unmerge_adapter(model)
            torch.testing.assert_close(run(model), adapted, atol=ATOL, rtol=0)
            merged = merge_and_unload(copy.deepcopy(model))
            assert set(merged.state_dict()) == base_keys
            assert {n: type(m) for n, m in merged.named_modules()} == base_types
            torch.testing.assert_close(run(merged), adapted, atol=ATOL, rtol=0)
        unloaded = unload(again)
        assert set(unloaded.state_dict()) == base_keys
        assert {n: type(m) for n, m in unloaded.named_modules()} == base_types
        assert torch.equal(run(unloaded), base_out)


def peft_mha_backward_misses_out_proj_delta() -> bool:
    """Whether PEFT's `lora.MultiheadAttention` backward into in_proj ignores out_proj's delta (PEFT 0.22: its forward
    merges, runs, then unmerges out_proj with an in-place `.data -=` on the merged weight the attention saved for
    backward, so the gradient reaching in_proj's A and B is computed with out_proj's base weight; forward outputs are
    right; `test_layers_mha.py::test_peft_mha_backward_bug_is_known`)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 1, batch_first=True)
    pm = get_peft_model(nn.Sequential(copy.deepcopy(mha)), LoraConfig(r=1, target_modules=["0"]))
    randomize_peft(pm)
    layer = pm.base_model.model[0]
    x = torch.randn(1, 3, 4)
    layer(x, x, x)[0].sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = layer.base_layer.out_proj
    ref_a = a.detach().clone().requires_grad_()
    with torch.no_grad():
        mha.out_proj.weight += out.get_delta_weight("default")
    in_delta = (b.detach() @ ref_a) * layer.scaling["default"]
    q = x.transpose(0, 1)
    y = nn.functional.multi_head_attention_forward(
        q, q, q, 4, 1, mha.in_proj_weight.detach() + in_delta, mha.in_proj_bias.detach(), None, None, False, 0.0,
        mha.out_proj.weight.detach(), mha.out_proj.bias.detach(), training=True, need_weights=False)[0]
    y.sum().backward()
    return not torch.allclose(a.grad, ref_a.grad, atol=1e-6)


@contextlib.contextmanager
def peft_mha_backward_fixed() -> Iterator[None]:
    """Inside the block PEFT's `lora.MultiheadAttention` unmerges out_proj on a copy of the merged weight, so the
    tensor its forward saved for backward keeps out_proj's delta (`peft_mha_backward_misses_out_proj_delta`): its
    gradients are then those of its own forward. A fixed PEFT is left alone."""
    if not peft_mha_backward_misses_out_proj_delta():
        yield
        return
    from peft.tuners.lora.layer import MultiheadAttention as PeftMHA

    unmerge = PeftMHA.unmerge

    def fixed_unmerge(self):
        base = self.get_base_layer().out_proj.get_base_layer()
        weight = base.weight.detach().clone()
        del base.weight
        base.weight = weight
        unmerge(self)

    PeftMHA.unmerge = fixed_unmerge
    try:
        yield
    finally:
        PeftMHA.unmerge = unmerge


def check_peft_parity(tmp_path: Path, factory: Factory, run: Run, peft_config: LoraConfig, config: LoRAConfig,
                      can_merge: bool = True, lr: float = 0.5) -> None:
    """Same A/B as PEFT (we load PEFT's file): same logits, same gradient step, same merged weights, and PEFT
    loads ours; the model our `config` injects has the same adapter tensors as the one loaded from PEFT's file."""
    torch.manual_seed(0)
    pm = get_peft_model(factory(), peft_config)
    randomize_peft(pm)
    pm.save_pretrained(str(tmp_path / "peft"))

    ours = factory()
    load_adapter(ours, tmp_path / "peft", trainable=True)
    by_config = factory()
    inject_lora(by_config, config)
    assert adapter_shapes(by_config) == adapter_shapes(ours)
    with torch.no_grad():
        torch.testing.assert_close(run(ours), run(pm), atol=ATOL, rtol=0)

    with torch.no_grad():
        target = run(factory()) + 0.5
    loss_ours = sgd_step(ours, run, target, lr)
    loss_peft = sgd_step(pm, run, target, lr)
    torch.testing.assert_close(loss_ours, loss_peft, atol=ATOL, rtol=0)
    save_adapter(ours, tmp_path / "ours")
    theirs = {k: v.detach() for k, v in get_peft_model_state_dict(pm).items()}
    assert_close_dicts(peft_file_tensors(tmp_path / "ours"), theirs)
    with torch.no_grad():
        adapted = run(ours)
        torch.testing.assert_close(adapted, run(pm), atol=ATOL, rtol=0)

    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(factory(), str(tmp_path / "ours"))
    reloaded.train(ours.training)  # from_pretrained switches to eval; keep the factory's mode
    with torch.no_grad():
        torch.testing.assert_close(run(reloaded), adapted, atol=ATOL, rtol=0)

    if can_merge:
        merged_ours = merge_and_unload(ours).state_dict()
        merged_peft = pm.merge_and_unload().state_dict()
        assert_close_dicts(merged_ours, merged_peft)


