"""DoRA, LoRA+ and PiSSA/OLoRA from a LightningCLI YAML (`lightning-lora fit`, issue 17 point 4)."""

from __future__ import annotations

import pytest
import yaml

from lightning_lora.cli import main
from lightning_lora.lightning_cli import LoRALightningCLI
from lightning_lora.surgery import lora_layers

pytestmark = pytest.mark.filterwarnings("ignore")


def write_yaml(tmp_path, **lora_args) -> str:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 3, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False,
            "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_lora.LoRA",
                           "init_args": {"r": 4, "target_modules": ["q_proj", "v_proj"], "merge_on_fit_end": False,
                                         "adapter_dir": str(tmp_path / "adapter"), **lora_args}}],
        },
        "model": {"class_path": "lit_models.TinyLlamaLM"},
        "data": {"class_path": "lit_models.TokenData"},
    }
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_every_variant_option_from_yaml(tmp_path):
    path = write_yaml(tmp_path, use_dora=True, loraplus_lr_ratio=16, init="pissa_niter_2")
    cli = LoRALightningCLI(args=["fit", "--config", path, "--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.01",
                                 "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3
    config = next(c for c in trainer.callbacks if type(c).__name__ == "LoRA").config
    assert (config.use_dora, config.loraplus_lr_ratio, config.init) == (True, 16.0, "pissa_niter_2")
    layers = [layer for _, layer in lora_layers(module)]
    assert len(layers) == 4 and all(layer.use_dora and layer.lora_init_A is not None for layer in layers)
    groups = trainer.optimizers[0].param_groups
    assert [g["loraplus"] for g in groups] == ["A", "B"]
    assert len(groups[1]["params"]) == 8  # every lora_B and every DoRA magnitude
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"])
    assert len(trainer.lr_scheduler_configs[0].scheduler.base_lrs) == 2
    adapter_cfg = yaml.safe_load((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is True and adapter_cfg["r"] == 8  # PiSSA saved as the plain rank-2r delta


def test_lightning_lora_fit_with_variants_exits_zero(tmp_path):
    path = write_yaml(tmp_path, use_dora=True, loraplus_lr_ratio=4, init="olora")
    assert main(["fit", "--config", path, "--optimizer", "torch.optim.AdamW"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("option, value, message", [
    ("loraplus_lr_ratio", "0", "loraplus_lr_ratio=0.0 is invalid; expected a finite number > 0"),
    ("init", "pissa_niter_x", "init='pissa_niter_x' is invalid; expected one of gaussian, kaiming, pissa"),
    ("target_modules", "[embed_tokens,q_proj]", "use_dora=True cannot adapt the embedding(s) ['model.model.embed_tokens']"),
])
def test_bad_variant_options_are_one_line_and_exit_2(tmp_path, capsys, option, value, message):
    path = write_yaml(tmp_path, use_dora=True)
    code = main(["fit", "--config", path, "--optimizer", "torch.optim.AdamW", f"--trainer.callbacks.init_args.{option}", value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
