"""The LoRA callback on the paths users take around `fit` (issue 12): evaluate / test / predict after
fit with every `ckpt_path`, with and without the mixin, merged or not; a second fit; a fresh module
evaluating an adapter-only checkpoint; frozen teachers; explicit networks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import Distill, EvalData, MixinTinyLlama, PlainTinyLlama, token_data

from lightning_lora import LoRA, LoRAError, lora_state_dict
from lightning_lora.surgery import has_lora, is_merged, lora_layers


def trainer_for(tmp_path, callbacks, **kwargs) -> L.Trainer:
    opts = dict(max_epochs=4, callbacks=callbacks, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
                num_sanity_val_steps=0, deterministic=True)
    opts.update(kwargs)
    return L.Trainer(**opts)


def fitted(tmp_path, module_cls, merge: bool):
    """Fit 4 epochs (4 steps each) with a best-by-val_loss checkpoint and last.ckpt."""
    L.seed_everything(0)
    module = module_cls(lr=3e-2)  # val_loss by epoch: 5.539, 5.545, 5.558, 5.555: best (epoch 0) != last
    ckpt = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", mode="min", save_top_k=1)
    # lightning 2.6 writes a monitored callback's last.ckpt only when it saves a top-k one: a second callback
    last = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True)
    lora = LoRA(r=4, alpha=32, merge_on_fit_end=merge)
    trainer = trainer_for(tmp_path, [lora, ckpt, last])
    trainer.fit(module, datamodule=EvalData())
    return module, trainer, ckpt, lora


def val_loss(trainer, module, ckpt_path=None) -> float:
    return trainer.validate(module, datamodule=EvalData(), ckpt_path=ckpt_path, verbose=False)[0]["val_loss"]


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("module_cls", [PlainTinyLlama, MixinTinyLlama], ids=["plain", "mixin"])
def test_validate_after_fit_evaluates_exactly_the_requested_weights(tmp_path, module_cls, merge):
    module, trainer, ckpt, _ = fitted(tmp_path, module_cls, merge)
    assert is_merged(module) is merge and has_lora(module) is not merge
    last_epoch_loss = trainer.callback_metrics["val_loss"].item()
    # best differs from last in this run, so adding best on top of last would show
    assert abs(ckpt.best_model_score.item() - last_epoch_loss) > 1e-4
    # ckpt_path None: the module as fit left it (merged or not) is the last weights
    assert val_loss(trainer, module) == pytest.approx(last_epoch_loss, abs=1e-5)
    # "best": exactly the best checkpoint's number, not best adapters on top of merged weights
    assert val_loss(trainer, module, "best") == pytest.approx(ckpt.best_model_score.item(), abs=1e-5)
    assert has_lora(module) and not is_merged(module)
    # "last" and an explicit path
    assert val_loss(trainer, module, "last") == pytest.approx(last_epoch_loss, abs=1e-5)
    assert val_loss(trainer, module, ckpt.best_model_path) == pytest.approx(ckpt.best_model_score.item(), abs=1e-5)
    # test uses the same data: the same number
    got = trainer.test(module, datamodule=EvalData(), ckpt_path="best", verbose=False)[0]["test_loss"]
    assert got == pytest.approx(ckpt.best_model_score.item(), abs=1e-5)


def test_predict_after_merged_fit_with_best_equals_a_fresh_module_loading_best(tmp_path):
    module, trainer, ckpt, _ = fitted(tmp_path, PlainTinyLlama, merge=True)
    merged_logits = torch.cat(trainer.predict(module, datamodule=EvalData()))
    best_logits = torch.cat(trainer.predict(module, datamodule=EvalData(), ckpt_path="best"))
    fresh = PlainTinyLlama()
    other = trainer_for(tmp_path / "fresh", [LoRA(r=4, alpha=32)])
    fresh_logits = torch.cat(other.predict(fresh, datamodule=EvalData(), ckpt_path=ckpt.best_model_path))
    torch.testing.assert_close(best_logits, fresh_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_logits, best_logits, atol=1e-4)  # last != best


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "mixin-only"])
def test_fresh_module_evaluates_an_adapter_only_checkpoint(tmp_path, with_callback):
    _, _, ckpt, _ = fitted(tmp_path, MixinTinyLlama, merge=True)
    fresh = MixinTinyLlama()
    trainer = trainer_for(tmp_path / "eval", [LoRA(r=4, alpha=32)] if with_callback else [])
    assert val_loss(trainer, fresh, ckpt.best_model_path) == pytest.approx(ckpt.best_model_score.item(), abs=1e-5)


def test_mixin_module_merged_by_fit_loads_best_with_a_trainer_without_the_callback(tmp_path):
    module, _, ckpt, _ = fitted(tmp_path, MixinTinyLlama, merge=True)
    trainer = trainer_for(tmp_path / "eval", [])
    assert val_loss(trainer, module, ckpt.best_model_path) == pytest.approx(ckpt.best_model_score.item(), abs=1e-5)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_second_fit_continues_training_the_same_adapters(tmp_path, merge):
    module, trainer, _, lora = fitted(tmp_path, PlainTinyLlama, merge)
    first = trainer.callback_metrics["val_loss"].item()
    again = trainer_for(tmp_path / "again", [LoRA(r=4, alpha=32, merge_on_fit_end=False)], max_epochs=2)
    before = {k: v.clone() for k, v in lora_state_dict(module).items()} if not merge else None
    again.fit(module, datamodule=EvalData())
    assert has_lora(module)
    held = [p for g in again.optimizers[0].param_groups for p in g["params"]]
    assert len(held) == 8 and all(".lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    if before is not None:
        assert any(not torch.equal(before[k], v) for k, v in lora_state_dict(module).items())
    assert again.callback_metrics["val_loss"].item() < first + 1e-3  # it continued, it did not restart


# ---------------------------------------------------------------------------------------- teachers
def test_frozen_teacher_is_left_alone(tmp_path):
    module = Distill()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    lora = LoRA(r=4, target_modules=["q_proj", "v_proj"])
    trainer = trainer_for(tmp_path, [lora], max_epochs=1, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(token_data(8, 12), batch_size=4))
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(held) == 8  # the student's q,v adapters only
    assert not any("teacher" in n for n in lora.adapted_modules)
    assert all(n.startswith("student.") for n in lora.adapted_modules) and len(lora.adapted_modules) == 4
    assert all(torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())
    assert not any(isinstance(m, torch.nn.Module) and ".lora_" in n for n, m in module.teacher.named_modules())


def test_frozen_teacher_checkpoints_hold_no_teacher_keys_and_summary_names_it(tmp_path, caplog):
    module = Distill()
    lora = LoRA(r=4, merge_on_fit_end=False)
    trainer = trainer_for(tmp_path, [lora], max_epochs=1, limit_val_batches=0)
    with caplog.at_level("INFO"):
        trainer.fit(module, torch.utils.data.DataLoader(token_data(8, 12), batch_size=4))
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    keys = torch.load(tmp_path / "d.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(keys) == sorted(f"student.model.layers.{i}.self_attn.{p}.lora_{ab}.weight"
                                  for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB")
    assert "left alone (frozen before setup): teacher" in caplog.text


def test_networks_option_names_what_to_adapt(tmp_path):
    module = Distill()
    module.teacher.requires_grad_(True)  # not frozen: only the option keeps it out
    lora = LoRA(r=4, networks=["student"], merge_on_fit_end=False)
    trainer = trainer_for(tmp_path, [lora], max_epochs=1, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(token_data(8, 12), batch_size=4))
    assert all(n.startswith("student.") for n, _ in lora_layers(module))
    assert all(p.requires_grad for p in module.teacher.parameters())  # left as the user set it: trained fully
    trainer.save_checkpoint(tmp_path / "n.ckpt")
    keys = torch.load(tmp_path / "n.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(module.teacher.state_dict()) == {k.removeprefix("teacher.") for k in keys if k.startswith("teacher.")}
    with pytest.raises(LoRAError, match=r"networks=\['pupil'\]: 'pupil' is not a submodule of Distill; its "
                                        r"submodules are: student, teacher"):
        trainer_for(tmp_path, [LoRA(networks=["pupil"])], max_steps=1).fit(
            Distill(), torch.utils.data.DataLoader(token_data(8, 12), batch_size=4))


DISTILL_DDP = """
import sys, torch, lightning as L
from lightning_lora import LoRA
from lit_models import Distill, token_data
torch.manual_seed(0)
trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[1],
                    callbacks=[LoRA(r=4, merge_on_fit_end=False)])
trainer.fit(Distill(), torch.utils.data.DataLoader(token_data(16, 12), batch_size=4))
if trainer.is_global_zero:
    print("RESULT", trainer.global_step)
if torch.distributed.is_initialized():  # stop gloo's threads before the interpreter exits (else: std::terminate)
    torch.distributed.destroy_process_group()
"""


def test_ddp_with_a_frozen_teacher(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    script = tmp_path / "distill.py"
    script.write_text(DISTILL_DDP)
    env = dict(os.environ, PYTHONPATH=f"{tests}{os.pathsep}{tests.parent}")
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "RESULT 2" in res.stdout
