"""The adapter-only checkpoint section (`lightning_lora.checkpoint`): config checks on restore."""

from __future__ import annotations

import pytest

from lightning_lora import LoRAConfig, LoRAError
from lightning_lora.checkpoint import TRAINING_ONLY_FIELDS, check_checkpoint_config

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
