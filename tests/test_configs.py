"""The YAML files in `configs/` (issue 5): each parses with `--print_config`; GPU configs ask for
bf16-true on one device; the Llama-3 config fits a 24 GB GPU (r=8 on q_proj/v_proj, checkpointing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_lora.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPU_CONFIGS = ["smollm2-135m-lora.yaml", "llama-3-8b-lora.yaml", "llama-3.2-1b-alpaca.yaml"]


def print_config(name: str, capsys, *overrides: str) -> dict:
    code = main(["fit", "--config", str(CONFIGS / name), *overrides, "--print_config"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return yaml.safe_load(out.out)


def callback(cfg: dict, class_path: str) -> dict:
    found = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == class_path]
    assert len(found) == 1, f"{class_path} in {[c['class_path'] for c in cfg['trainer']['callbacks']]}"
    return found[0]["init_args"]


def test_the_three_configs_exist():
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"quickstart.yaml", *GPU_CONFIGS}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses(name, capsys):
    cfg = print_config(name, capsys)
    assert cfg["model"]["class_path"] == "lightning_lora.tasks.CausalLM"
    assert cfg["data"]["class_path"] == "lightning_lora.data.InstructionDataModule"
    lora = callback(cfg, "lightning_lora.LoRA")
    assert lora["adapter_dir"] and lora["merged_dir"]
    ckpt = callback(cfg, "lightning.pytorch.callbacks.ModelCheckpoint")
    assert ckpt["save_last"] is True and ckpt["monitor"] == "val_loss"
    callback(cfg, "lightning.pytorch.callbacks.LearningRateMonitor")
    # the before/after answers table comes from the AnswersReport callback, last in the list (so that
    # `--trainer.callbacks.num_questions N` reaches it)
    assert cfg["trainer"]["callbacks"][-1]["class_path"] == "lightning_lora.tasks.AnswersReport"
    report = callback(cfg, "lightning_lora.tasks.AnswersReport")
    assert set(report) == {"num_questions", "max_new_tokens"} and report["max_new_tokens"] >= 24
    logger = cfg["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert logger["init_args"]["save_dir"] == "runs"
    stem = name.removesuffix(".yaml")
    # everything a run writes goes under runs/<name>/
    assert logger["init_args"]["name"] == stem
    for path in (lora["adapter_dir"], lora["merged_dir"], ckpt["dirpath"]):
        assert path.startswith(f"runs/{stem}/"), path
    # the model is named once: the data module tokenizes with the model's tokenizer (tokenizer None)
    assert cfg["data"]["init_args"]["tokenizer"] is None
    settings = [line.split("#")[0] for line in (CONFIGS / name).read_text().splitlines()]
    assert sum(cfg["model"]["init_args"]["model_name_or_path"] in line for line in settings) == 1


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_ask_for_bf16_on_one_gpu(name, capsys):
    trainer = print_config(name, capsys)["trainer"]
    assert trainer["precision"] == "bf16-true"
    assert trainer["devices"] == 1
    assert trainer["accelerator"] == "gpu"


def test_quickstart_runs_on_cpu_in_fp32_with_a_full_validation_first(capsys):
    cfg = print_config("quickstart.yaml", capsys)
    assert cfg["trainer"]["accelerator"] in ("auto", "cpu") and cfg["trainer"]["precision"] == "32-true"
    assert cfg["trainer"]["num_sanity_val_steps"] == -1  # gives the "val loss before"
    assert cfg["model"]["init_args"]["model_name_or_path"] == "smollm2-135m-instruct"
    assert callback(cfg, "lightning_lora.tasks.AnswersReport") == {"num_questions": 24, "max_new_tokens": 24}
    short = print_config("quickstart.yaml", capsys, "--trainer.callbacks.num_questions", "3")
    assert callback(short, "lightning_lora.tasks.AnswersReport") == {"num_questions": 3, "max_new_tokens": 24}
    assert short["trainer"]["callbacks"][:-1] == cfg["trainer"]["callbacks"][:-1]
    assert cfg["data"]["init_args"]["system_prompt"]
    # the documented GPU override parses
    gpu = print_config("quickstart.yaml", capsys, "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-true")
    assert gpu["trainer"]["precision"] == "bf16-true"


def test_llama_config_fits_a_24gb_gpu(capsys):
    cfg = print_config("llama-3-8b-lora.yaml", capsys)
    lora = callback(cfg, "lightning_lora.LoRA")
    assert lora["r"] == 8 and sorted(lora["target_modules"]) == ["q_proj", "v_proj"]
    model = cfg["model"]["init_args"]
    assert model["gradient_checkpointing"] is True
    assert model["dtype"] == "bfloat16"  # loaded in bf16: 16 GB, not 32 GB of float32 first
    assert "/path/to/" in model["model_name_or_path"]  # a placeholder the user overrides
    overridden = print_config("llama-3-8b-lora.yaml", capsys, "--model.model_name_or_path", "/models/llama3")
    assert overridden["model"]["init_args"]["model_name_or_path"] == "/models/llama3"
    assert overridden["data"]["init_args"]["tokenizer"] is None  # the model's
    explicit = print_config("llama-3-8b-lora.yaml", capsys, "--model.model_name_or_path", "/models/llama3",
                            "--data.tokenizer", "/models/other")  # an explicit tokenizer wins
    assert explicit["data"]["init_args"]["tokenizer"] == "/models/other"


def test_hub_model_and_dataset_config_names_both_once(capsys):
    cfg = print_config("llama-3.2-1b-alpaca.yaml", capsys)
    assert cfg["model"]["init_args"]["model_name_or_path"] == "meta-llama/Llama-3.2-1B-Instruct"
    data = cfg["data"]["init_args"]
    assert (data["dataset"], data["split"], data["val_fraction"], data["packing"]) == ("yahma/alpaca-cleaned", "train",
                                                                                     0.02, True)
    settings = [line.split("#")[0] for line in (CONFIGS / "llama-3.2-1b-alpaca.yaml").read_text().splitlines()]
    assert [sum(name in line for line in settings) for name in ("yahma/alpaca-cleaned", "Llama-3.2-1B")] == [1, 1]
    local = print_config("llama-3.2-1b-alpaca.yaml", capsys, "--data.dataset", "my.parquet", "--data.columns",
                         '{"prompt": "question", "response": "answer"}')
    assert local["data"]["init_args"]["columns"] == {"prompt": "question", "response": "answer"}


@pytest.mark.parametrize("name", ["llama-3-8b-lora.yaml", "llama-3-8b-qlora.yaml", "llama-3-70b-lora-fsdp.yaml",
                                  "llama-3.2-1b-alpaca.yaml", "quickstart.yaml"])
def test_the_gpu_configs_pack_their_data_and_the_quickstart_pads(name, capsys):
    """Packing pays off on users' data of mixed lengths (the Llama configs); the quickstart's short demo answers
    keep padded batches, so its printed numbers stay those of the README."""
    data = print_config(name, capsys)["data"]["init_args"]
    assert data["packing"] is (name != "quickstart.yaml")
