"""LoRAMixin: helpers, apply_lora without the callback, adapter-only load_from_checkpoint (issue 3)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lit_models import BuiltInConfigureModel, TinyLlamaModule, fit

from lightning_lora import LoRA, LoRAConfig, LoRAError
from lightning_lora.checkpoint import CHECKPOINT_KEY

X = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(module: L.LightningModule) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(X)


def test_load_from_checkpoint_reinjects_and_gives_identical_logits(tmp_path):
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, alpha=8, merge_on_fit_end=False)], tmp_path, max_steps=3)
    path = tmp_path / "adapter-only.ckpt"
    trainer.save_checkpoint(path)
    assert all(".lora_" in k for k in torch.load(path, weights_only=True)["state_dict"])
    loaded = TinyLlamaModule.load_from_checkpoint(path)
    assert len(loaded.lora_parameters()) == 8
    assert torch.equal(logits(loaded), logits(module))


def test_load_from_checkpoint_of_configure_model_module(tmp_path):
    module = BuiltInConfigureModel()
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    loaded = BuiltInConfigureModel.load_from_checkpoint(tmp_path / "c.ckpt")
    assert torch.equal(logits(loaded), logits(module))


class ApplyInInit(TinyLlamaModule):
    """Uses the mixin alone: adapters in __init__, optimizer over lora_parameters()."""

    def __init__(self, r: int = 4) -> None:
        super().__init__()
        self.apply_lora(LoRAConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.lora_parameters(), lr=1e-2)


def test_apply_lora_without_callback_trains_saves_and_loads(tmp_path):
    module = ApplyInInit()
    before = {k: v.clone() for k, v in module.state_dict().items() if ".lora_" not in k}
    trainer = fit(module, [], tmp_path, max_steps=3)
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(held) == 12 and all(p.requires_grad for p in held)
    assert all(torch.equal(before[k], module.state_dict()[k]) for k in before)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(module.lora_state_dict())
    assert ckpt[CHECKPOINT_KEY]["config"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    loaded = ApplyInInit.load_from_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(logits(loaded), logits(module))
    # a module built with another rank cannot take these adapters
    with pytest.raises(LoRAError, match="r: 8 != 4"):
        ApplyInInit.load_from_checkpoint(tmp_path / "m.ckpt", r=8)


def test_mixin_merge_and_adapter_state(tmp_path):
    module = ApplyInInit()
    fit(module, [], tmp_path, max_steps=2)
    before = logits(module)
    sd = module.lora_state_dict()
    assert len(sd) == 12 and all(".lora_" in k for k in sd)
    assert module.merge_and_unload() is module
    assert not any("lora_" in k for k in module.state_dict())
    assert torch.allclose(logits(module), before, atol=1e-5)


def test_strict_load_rejects_missing_adapter_keys(tmp_path):
    module = ApplyInInit()
    sd = module.lora_state_dict()
    sd.pop(next(iter(sd)))
    with pytest.raises(LoRAError, match=r"missing adapter keys \(1\)"):
        module.load_state_dict(sd)
    with pytest.raises(LoRAError, match="Unexpected keys in the adapter state dict"):
        module.load_state_dict({**module.lora_state_dict(), "model.nonexistent.lora_A.weight": torch.zeros(1)})
