"""The adapter-only checkpoint section (`lightning_lora.checkpoint`): config checks on restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, LoRAError, inject_lora
from lightning_lora.checkpoint import (
    TRAINING_ONLY_FIELDS,
    check_checkpoint_config,
    make_adapter_only,
    restore_base_keys,
)

SAVED = LoRAConfig(r=4, dropout=0.05)
CHECKPOINT = {"lightning_lora": {"version": 1, "config": SAVED.to_dict()}}


@pytest.mark.parametrize("field, value", [("dropout", 0.2), ("loraplus_lr_ratio", 16.0),
                                          ("loraplus_lr_embedding", 1e-4), ("adapter_compute_dtype", "adapter")])
def test_training_only_fields_are_ignored_when_evaluating_and_checked_when_resuming(field, value):
    assert field in TRAINING_ONLY_FIELDS
    run = LoRAConfig(**{**SAVED.to_dict(), field: value})
    check_checkpoint_config(CHECKPOINT, run, training=False)
    with pytest.raises(LoRAError, match=rf"differs from this run's \(this run's value != the checkpoint's\):\n"
                                        rf"  {field}: {value!r} != {getattr(SAVED, field)!r}\n"):
        check_checkpoint_config(CHECKPOINT, run, training=True)


@pytest.mark.parametrize("field, value", [("r", 8), ("alpha", 32.0), ("target_modules", ["q_proj"]),
                                          ("use_dora", True), ("init", "pissa"), ("quantize_base", "nf4"),
                                          ("use_rslora", True)])
def test_fields_that_change_the_function_are_checked_when_evaluating_too(field, value):
    run = LoRAConfig(**{**SAVED.to_dict(), field: value})
    for training in (False, True):
        with pytest.raises(LoRAError, match=rf"  {field}: "):
            check_checkpoint_config(CHECKPOINT, run, training=training)


# ------------------------------------------------------------------ copies of the module (issue 20, item 4)
def injected() -> nn.Module:
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("norm", nn.LayerNorm(4))
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    return model


def test_every_copy_of_the_module_in_a_checkpoint_becomes_adapter_only():
    model = injected()
    full = model.state_dict()
    ckpt = {"state_dict": dict(full), "current_model_state": dict(full), "averaging_state": {"n_averaged": 3},
            "callbacks": {"SWA": {"average_model_state": dict(full), "n_averaged": torch.tensor(3)}},
            "hyper_parameters": {"lr": 0.1}}
    make_adapter_only(ckpt, model)
    adapter_keys = ["q_proj.lora_A.weight", "q_proj.lora_B.weight"]
    assert sorted(ckpt["state_dict"]) == sorted(ckpt["current_model_state"]) == adapter_keys
    assert sorted(ckpt["callbacks"]["SWA"]["average_model_state"]) == adapter_keys
    assert ckpt["averaging_state"] == {"n_averaged": 3} and ckpt["hyper_parameters"] == {"lr": 0.1}
    assert ckpt["callbacks"]["SWA"]["n_averaged"].item() == 3


def test_restore_base_keys_fills_copies_with_the_base_but_never_an_adapter_key():
    model = injected()
    ckpt = {"state_dict": model.state_dict()}
    make_adapter_only(ckpt, model)
    assert restore_base_keys(ckpt, model) == 0 and len(ckpt["state_dict"]) == 2  # no copy: nothing added
    ckpt["current_model_state"] = {"q_proj.lora_A.weight": ckpt["state_dict"]["q_proj.lora_A.weight"]}
    assert restore_base_keys(ckpt, model) == 1
    base = ["norm.bias", "norm.weight", "q_proj.bias", "q_proj.weight"]
    assert sorted(ckpt["current_model_state"]) == sorted([*base, "q_proj.lora_A.weight"])  # lora_B stays missing
    assert sorted(ckpt["state_dict"]) == sorted([*base, "q_proj.lora_A.weight", "q_proj.lora_B.weight"])
    assert ckpt["state_dict"]["q_proj.weight"].data_ptr() == model.q_proj.weight.data_ptr()  # not a copy
