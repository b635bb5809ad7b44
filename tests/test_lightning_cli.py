"""LightningCLI with the LoRA callback from YAML (issues 3 and 5)."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_lora.cli import main
from lightning_lora.lightning_cli import LoRALightningCLI

TINY_YAML = {
    "seed_everything": 0,
    "trainer": {
        "max_steps": 3, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
        "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "callbacks": [{"class_path": "lightning_lora.LoRA",
                       "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"], "merge_on_fit_end": False}}],
    },
    "model": {"class_path": "lit_models.TinyLlamaLM"},
    "data": {"class_path": "lit_models.TokenData"},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    cfg = dict(TINY_YAML, trainer=dict(TINY_YAML["trainer"], default_root_dir=str(tmp_path)))
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "lora"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_optimizer_and_scheduler_hold_only_adapters(tiny_yaml):
    cli = LoRALightningCLI(args=["fit", "--config", str(tiny_yaml), "--optimizer", "AdamW", "--optimizer.lr", "0.01",
                                 "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1",
                                 "--lr_scheduler.gamma", "0.5"])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 0.01
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in module.named_parameters() if ".lora_" in n} and len(held) == 8
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.optimizer is opt
    callbacks = [type(c).__name__ for c in trainer.callbacks]
    assert "LoRA" in callbacks


def test_cli_default_logger_is_tensorboard(tmp_path, tiny_yaml):
    cfg = yaml.safe_load(tiny_yaml.read_text())
    del cfg["trainer"]["logger"]
    tiny_yaml.write_text(yaml.safe_dump(cfg))
    cli = LoRALightningCLI(args=["--config", str(tiny_yaml), "--optimizer", "AdamW",
                                 "--trainer.max_steps", "1"], run=False)
    from lightning.pytorch.loggers import TensorBoardLogger

    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert cli.trainer.logger.save_dir == "runs" and cli.trainer.logger.name == "lora"


def test_cli_bad_target_is_one_line_and_exit_2(tiny_yaml, capsys):
    code = main(["fit", "--config", str(tiny_yaml), "--optimizer", "AdamW",
                 "--trainer.callbacks.init_args.target_modules", "[qproj]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "lightning-lora fit: error: target_modules=['qproj'] matched no module" in err
    assert "Traceback" not in err


def test_cli_bad_callback_argument_is_one_line_and_exit_2(tiny_yaml, capsys):
    code = main(["fit", "--config", str(tiny_yaml), "--optimizer", "AdamW",
                 "--trainer.callbacks.init_args.log_every_n_steps", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "log_every_n_steps=0 is invalid; expected an integer >= 1" in err
    assert "Traceback" not in err
