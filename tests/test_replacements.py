"""`lightning_lora.replacements`: every replacement of an attribute of an object the package does not own is
recorded with its owner and missing hook, and undone; the callback's, the strategies' and LightningCLI's
replacements go through it."""

from __future__ import annotations

import copy
import pickle
import types

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from lightning_lora import LoRA, strategies
from lightning_lora.replacements import (
    RECORDS_ATTR,
    find_replacement,
    replace_attribute,
    replace_class,
    replacements,
    undo_replacements,
)


class Strategy:
    def save(self) -> str:
        return "class"


def test_replace_attribute_shadows_the_class_and_undo_restores_it():
    s = Strategy()
    r = replace_attribute(s, "save", lambda: "ours", owner="t", missing_hook="none: a test")
    assert s.save() == "ours" and r.active and not r.had_own
    assert (r.owner, r.missing_hook) == ("t", "none: a test")
    r.undo()
    assert s.save() == "class" and "save" not in vars(s) and RECORDS_ATTR not in vars(s) and not r.active
    r.undo()  # twice: nothing happens
    assert s.save() == "class"


def test_an_own_instance_attribute_comes_back():
    s = Strategy()
    s.save = lambda: "instance"
    r = replace_attribute(s, "save", lambda: "ours", owner="t", missing_hook="x")
    assert r.had_own and s.save() == "ours"
    r.undo()
    assert s.save() == "instance"


def test_stacked_replacements_undo_in_any_order():
    s = Strategy()
    first = replace_attribute(s, "save", lambda: "first", owner="a", missing_hook="x")
    second = replace_attribute(s, "save", lambda: "second", owner="b", missing_hook="x")
    first.undo()  # out of order: the newer one now restores the class's method
    assert s.save() == "second" and [r.owner for r in replacements(s)] == ["b"]
    second.undo()
    assert s.save() == "class" and replacements(s) == []


def test_module_global_and_undo_by_owner_across_objects():
    mod = types.ModuleType("m")
    mod.value = 1
    a, b = Strategy(), Strategy()
    replace_attribute(mod, "value", 2, owner="mine", missing_hook="x")
    replace_attribute(a, "save", lambda: "a", owner="mine", missing_hook="x")
    replace_attribute(b, "save", lambda: "b", owner="other", missing_hook="x")
    assert find_replacement(a, "save", owner="mine") is not None and find_replacement(a, "save", owner="other") is None
    assert {(type(r.target).__name__, r.name) for r in replacements(owner="mine")} == {("module", "value"),
                                                                                      ("Strategy", "save")}
    assert undo_replacements(owner="mine") == 2
    assert mod.value == 1 and a.save() == "class" and b.save() == "b"
    assert undo_replacements(b) == 1 and b.save() == "class"


def test_replace_class_and_its_undo_survive_a_deep_copy_and_pickling():
    class Guarded(nn.Linear):
        pass

    layer = nn.Linear(2, 2)
    r = replace_class(layer, Guarded, owner="t", missing_hook="no hook before Module._apply casts")
    copied = copy.deepcopy(layer)
    assert type(copied) is Guarded and replacements(copied)[0].target is copied
    undo_replacements(copied)
    assert type(copied) is nn.Linear and type(layer) is Guarded
    r.undo()
    assert type(layer) is nn.Linear and pickle.loads(pickle.dumps(layer)).weight.shape == (2, 2)


def test_a_replacement_needs_its_reason():
    with pytest.raises(ValueError, match="missing hook"):
        replace_attribute(Strategy(), "save", len, owner="t", missing_hook=" ")
    with pytest.raises(ValueError, match="replace_class"):
        replace_attribute(Strategy(), "__class__", Strategy, owner="t", missing_hook="x")


def test_plain_strategy_checkpoint_wrappers_are_recorded_once_and_can_be_undone():
    strategy = SingleDeviceStrategy("cpu")
    made = strategies.adapter_only_saving(strategy)
    assert [r.name for r in made] == ["save_checkpoint", "load_checkpoint"]
    assert all(r.owner == strategies.OWNER and r.missing_hook for r in made)
    assert strategies.adapter_only_saving(strategy) == []  # once per strategy
    assert undo_replacements(strategy, owner=strategies.OWNER) == 2
    assert "save_checkpoint" not in vars(strategy) and "load_checkpoint" not in vars(strategy)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential()
            self.net.add_module("q_proj", nn.Linear(4, 4))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)


def test_the_callback_undoes_its_module_replacement_at_teardown_and_leaves_only_the_checkpoint_path(tmp_path):
    module = Tiny()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRA(r=2, target_modules=["q_proj"], merge_on_fit_end=False)])
    trainer.fit(module)
    assert module.net.q_proj.lora_A is not None  # injected after configure_model
    assert replacements(module) == [] and "configure_model" not in vars(module)
    left = replacements(trainer.strategy)
    assert [(r.owner, r.name) for r in left] == [(strategies.OWNER, "save_checkpoint"),
                                                 (strategies.OWNER, "load_checkpoint")]
    undo_replacements(trainer.strategy)
