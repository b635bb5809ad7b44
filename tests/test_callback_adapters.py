"""`LoRA(adapter_name=...)`: a new adapter trained beside frozen ones the module loads itself (issue 23)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import EvalData, PlainTinyLlama, fit, token_data
from safetensors.torch import load_file

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAError,
    LoRAMixin,
    inject_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
)
from lightning_lora.checkpoint import CHECKPOINT_KEY, read_checkpoint
from lightning_lora.surgery import active_adapters, adapter_keys, adapter_names, has_lora, lora_layers, set_adapter

TESTS = Path(__file__).parent
#: the new adapter: another rank and other targets than the frozen one (k_proj has no frozen adapter)
NEW = dict(r=2, alpha=4, target_modules=["q_proj", "k_proj"], adapter_name="new")


@pytest.fixture(scope="module")
def frozen_dir(tmp_path_factory) -> Path:
    """A PEFT adapter ("default", r=4 on q_proj / v_proj, B non-zero) of `PlainTinyLlama`'s network."""
    net = make_tiny_llama(seed=0, vocab_size=256)
    inject_lora(net, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in lora_layers(net):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    return save_adapter(net, tmp_path_factory.mktemp("frozen") / "default")


class WithFrozenAdapter(PlainTinyLlama):
    """`PlainTinyLlama` whose `__init__` loads a frozen PEFT adapter into its network."""

    def __init__(self, adapter: str, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__(lr=lr, seed=seed)
        load_adapter(self.model, adapter)


class MixinWithFrozenAdapter(LoRAMixin, WithFrozenAdapter):
    """The same with `LoRAMixin` (adapter-only `load_from_checkpoint`)."""


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def logits(module) -> torch.Tensor:
    with torch.no_grad():
        return module.model(input_ids=token_data(4, 12, seed=3).tensors[0]).logits


def val_loss(trainer, module, ckpt_path=None) -> float:
    return trainer.validate(module, datamodule=EvalData(), ckpt_path=ckpt_path, verbose=False)[0]["val_loss"]


def quiet_trainer(callbacks) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     devices=1, callbacks=list(callbacks))


# ---------------------------------------------------------------------------------------- training
def test_only_the_new_adapter_trains_and_is_checkpointed(tmp_path, frozen_dir):
    module = WithFrozenAdapter(str(frozen_dir))
    before = state(module)
    cb = LoRA(**NEW, merge_on_fit_end=False)
    trainer = fit(module, [cb], tmp_path, max_steps=3)
    assert adapter_names(module) == ["default", "new"] and active_adapters(module) == ["default", "new"]
    new_keys = adapter_keys(module, "new")
    assert "model.model.layers.0.self_attn.q_proj.lora_adapters.new.lora_A.weight" in new_keys  # beside "default"
    assert "model.model.layers.0.self_attn.k_proj.lora_A.weight" in new_keys  # the first adapter of k_proj
    assert len(new_keys) == 8
    after = state(module)
    # the frozen adapter and the base are bit-identical; every tensor of the new adapter changed
    assert sorted(k for k in after if k not in before or not torch.equal(before[k], after[k])) == sorted(new_keys)
    params = dict(module.named_parameters())
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(params[k]) for k in new_keys]
    assert cb.adapted_modules == [f"model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")]
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", map_location="cpu", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(new_keys)
    assert len(ckpt["optimizer_states"][0]["state"]) == 8
    meta = ckpt[CHECKPOINT_KEY]
    assert meta["config"]["r"] == 2 and meta["config"]["target_modules"] == ["q_proj", "k_proj"]
    assert meta["adapter_name"] == "new" and meta["frozen_adapters"] == ["default"]
    # read as the adapter alone (PEFT's keys), e.g. for export or load_adapter(..., adapter_name="new")
    read = read_checkpoint(tmp_path / "a.ckpt")
    assert read.adapter_name == "new" and read.frozen_adapters == ["default"]
    assert sorted(read.state_dict) == sorted(lora_state_dict(module.model, adapter_name="new"))
    # a second fit with the same callback trains the same adapter on
    fit(module, [cb], tmp_path, max_steps=2)
    assert adapter_names(module) == ["default", "new"]
    assert all(torch.equal(before[k], v) for k, v in state(module).items() if k not in new_keys)


def test_resume_equals_an_uninterrupted_run(tmp_path, frozen_dir):
    full = WithFrozenAdapter(str(frozen_dir))
    fit(full, [LoRA(**NEW, merge_on_fit_end=False)], tmp_path / "full", max_steps=-1, max_epochs=2)
    first = WithFrozenAdapter(str(frozen_dir))
    fit(first, [LoRA(**NEW, merge_on_fit_end=False), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        tmp_path / "a", max_steps=-1, max_epochs=1, enable_checkpointing=True)
    resumed = WithFrozenAdapter(str(frozen_dir))  # its __init__ loads the frozen adapter again
    trainer = fit(resumed, [LoRA(**NEW, merge_on_fit_end=False)], tmp_path / "b", max_steps=-1, max_epochs=2,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    assert trainer.optimizers[0].state_dict()["state"][0]["step"].item() == 8
    a, b = state(full), state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_module_without_the_frozen_adapter(tmp_path, frozen_dir):
    trainer = fit(WithFrozenAdapter(str(frozen_dir)), [LoRA(**NEW, merge_on_fit_end=False)], tmp_path, max_steps=1)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(LoRAError, match=r"holds adapter 'new', trained beside \['default'\], which this model does "
                                        r"not have \(its adapters: \['new'\]\); load them in the module's __init__"):
        fit(PlainTinyLlama(), [LoRA(**NEW)], tmp_path, max_steps=2, ckpt_path=str(tmp_path / "a.ckpt"))


def test_refusals(tmp_path, frozen_dir):
    with pytest.raises(LoRAError, match=r"already has an adapter named 'default' \(its adapters: \['default'\]; "
                                        r"'default' is frozen"):
        fit(WithFrozenAdapter(str(frozen_dir)), [LoRA(r=4, adapter_name="default")], tmp_path, max_steps=1)
    with pytest.raises(LoRAError, match=r"adapter_name='a.b' is invalid; expected a non-empty name without dots"):
        LoRA(adapter_name="a.b")
    with pytest.raises(LoRAError, match=r"adapter 'new' is added beside \['default'\]: it cannot use modules_to_save"):
        fit(WithFrozenAdapter(str(frozen_dir)), [LoRA(**NEW, modules_to_save=["lm_head"])], tmp_path, max_steps=1)


# ---------------------------------------------------------------------------------------- fit end
def test_adapter_dir_holds_the_new_adapter_alone(tmp_path, frozen_dir):
    module = WithFrozenAdapter(str(frozen_dir))
    out = tmp_path / "out"
    fit(module, [LoRA(**NEW, merge_on_fit_end=False, adapter_dir=str(out))], tmp_path, max_steps=2)
    assert sorted(p.name for p in out.iterdir() if p.name != "README.md") == ["adapter_config.json",
                                                                               "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and sorted(cfg["target_modules"]) == ["k_proj", "q_proj"]
    tensors = load_file(out / "adapter_model.safetensors")
    expected = lora_state_dict(module.model, adapter_name="new")
    assert sorted(tensors) == sorted(f"base_model.model.{k}" for k in expected)
    assert all(torch.equal(tensors[f"base_model.model.{k}"], v) for k, v in expected.items())
    # loaded beside the frozen adapter, it computes what the trained module computes
    fresh = WithFrozenAdapter(str(frozen_dir))
    load_adapter(fresh.model, out, adapter_name="new")
    set_adapter(fresh.model, ["default", "new"])  # a loaded adapter does not run until set active (PEFT's)
    assert torch.equal(logits(fresh), logits(module))


class LogitsAtFitEnd(L.Callback):
    """Listed before `LoRA`: the logits of the module with both adapters, just before the merge."""

    def on_fit_end(self, trainer, pl_module):
        self.logits = logits(pl_module)


def test_merge_at_fit_end_merges_both_adapters_and_evaluates(tmp_path, frozen_dir):
    module = WithFrozenAdapter(str(frozen_dir))
    probe = LogitsAtFitEnd()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(module, [probe, LoRA(**NEW), ckpt], tmp_path, max_steps=2, limit_val_batches=None,
                  enable_checkpointing=True)
    assert not has_lora(module) and not any(".lora_" in k for k in module.state_dict())
    torch.testing.assert_close(logits(module), probe.logits, rtol=1e-5, atol=1e-5)
    merged = val_loss(trainer, module)  # the merged module as it is
    assert trainer.test(module, datamodule=EvalData(), verbose=False)[0]["test_loss"] == pytest.approx(merged)
    assert not has_lora(module)
    # a checkpoint restored into it: the merge of both adapters is undone, the trained one loads beside the frozen
    assert val_loss(trainer, module, ckpt_path=ckpt.last_model_path) == pytest.approx(merged, rel=1e-5)
    assert adapter_names(module) == ["default", "new"] and active_adapters(module) == ["default", "new"]
    torch.testing.assert_close(logits(module), probe.logits, rtol=1e-5, atol=1e-5)


def test_evaluate_after_fit_with_checkpoints(tmp_path, frozen_dir):
    module = MixinWithFrozenAdapter(str(frozen_dir))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    trainer = fit(module, [LoRA(**NEW, merge_on_fit_end=False), ckpt], tmp_path, max_steps=4, limit_val_batches=None,
                  val_check_interval=2, enable_checkpointing=True)
    best = ckpt.best_model_path
    assert best
    expected = val_loss(trainer, module, ckpt_path=best)
    assert trainer.test(module, datamodule=EvalData(), ckpt_path="best", verbose=False)[0]["test_loss"] == \
        pytest.approx(expected)
    # a fresh module (the frozen adapter loaded by its __init__) and a fresh callback
    fresh = WithFrozenAdapter(str(frozen_dir))
    assert val_loss(quiet_trainer([LoRA(**NEW)]), fresh, ckpt_path=best) == pytest.approx(expected)
    # LoRAMixin.load_from_checkpoint adds the adapter beside the frozen one
    loaded = MixinWithFrozenAdapter.load_from_checkpoint(best, adapter=str(frozen_dir))
    assert adapter_names(loaded) == ["default", "new"]
    assert val_loss(quiet_trainer([]), loaded) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------- surfaces
def test_adapter_name_is_a_callback_and_yaml_option(monkeypatch):
    from lightning_lora.lightning_cli import LoRALightningCLI

    assert inspect.signature(LoRA.__init__).parameters["adapter_name"].default is None
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    cli = LoRALightningCLI(args=["--model", "lit_models.TinyLlamaLM", "--data", "lit_models.TokenData",
                                 "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                                 "--trainer.callbacks", "lightning_lora.LoRA",
                                 "--trainer.callbacks.init_args.adapter_name", "new"], run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, LoRA))
    assert cb.adapter_name == "new"


DDP_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, torch, lightning as L
    from lightning_lora import LoRA, lora_state_dict
    from lightning_lora.surgery import adapter_keys
    from lit_models import TokenData
    from test_callback_adapters import NEW, WithFrozenAdapter
    out, frozen = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=out, callbacks=[LoRA(**NEW, merge_on_fit_end=False)])
    module = WithFrozenAdapter(frozen)
    trainer.fit(module, datamodule=TokenData())
    trainer.save_checkpoint(f"{out}/last.ckpt")
    sd = module.state_dict()
    digest = hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in adapter_keys(module, "new"))).hexdigest()
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"step": trainer.global_step, "sha256": digest, "held": len(held)}, f)
    if torch.distributed.is_initialized():  # stop gloo's threads before the interpreter exits
        torch.distributed.destroy_process_group()
""")


def test_ddp_two_cpu_processes(tmp_path, frozen_dir):
    script = tmp_path / "ddp_adapters.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{TESTS.parent}")
    res = subprocess.run([sys.executable, str(script), str(tmp_path), str(frozen_dir)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 2 and ranks[0]["held"] == 8
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["state_dict"]) == 8 and ckpt[CHECKPOINT_KEY]["frozen_adapters"] == ["default"]


def test_adapter_name_on_a_module_without_adapters(tmp_path):
    # the one adapter gets the name; the merge at fit end stays reversible (one adapter)
    module = PlainTinyLlama()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(module, [LoRA(r=4, adapter_name="solo"), ckpt], tmp_path, max_steps=2, enable_checkpointing=True,
                  limit_val_batches=None)
    assert not has_lora(module)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    meta = torch.load(last, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
    assert meta["adapter_name"] == "solo" and meta["frozen_adapters"] == []
    merged = val_loss(trainer, module)
    assert val_loss(trainer, module, ckpt_path=last) == pytest.approx(merged, rel=1e-5)
    assert adapter_names(module) == ["solo"]  # the merge was undone to load the checkpoint
    fit(module, [LoRA(r=4, adapter_name="solo", merge_on_fit_end=False)], tmp_path, max_steps=3)
    assert adapter_names(module) == ["solo"]
