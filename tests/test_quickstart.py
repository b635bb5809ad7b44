"""`lightning-lora fit --config configs/quickstart.yaml` end to end, shortened (issue 5).

The real quickstart takes minutes; here it runs a few steps with the real SmolLM2-135M-Instruct,
from a temporary working directory (the config's `runs/...` paths land there), then `validate`
from the adapter-only checkpoint. Bad input must give one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from lightning_lora.cli import main
from lightning_lora.tasks import contains_answer

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
SHORT = ["--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--trainer.limit_train_batches", "4",
         "--trainer.limit_val_batches", "2", "--data.batch_size", "2", "--model.num_generate_examples", "1",
         "--model.generate_max_new_tokens", "6",
         # the last callback of the config is the AnswersReport: these two override its arguments
         "--trainer.callbacks.num_questions", "3", "--trainer.callbacks.max_new_tokens", "6"]
ANSWERS_KEYS = ["total", "base_correct", "finetuned_correct", "base_accuracy", "finetuned_accuracy",
                "val_loss_before", "val_loss_after", "val_loss_after_step", "model", "global_step", "resumed",
                "generate_max_new_tokens", "questions"]
QUESTION_KEYS = ["question", "keywords", "base_answer", "finetuned_answer", "expected", "fact", "source",
                 "base_correct", "finetuned_correct"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, smollm2_path):
    """Run the shortened quickstart once (fit, then validate from the checkpoint) in a fresh directory;
    `workdir / "fit-stdout.txt"` keeps what fit printed."""
    import os

    workdir = tmp_path_factory.mktemp("quickstart")
    old = os.getcwd()
    os.chdir(workdir)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            fit_code = main(["fit", "--config", CONFIG, *SHORT])
        (workdir / "fit-stdout.txt").write_text(out.getvalue())
        ckpt = workdir / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
        validate_code = main(["validate", "--config", CONFIG, *SHORT, "--ckpt_path", str(ckpt)]) \
            if ckpt.is_file() else None
    finally:
        os.chdir(old)
    return workdir, fit_code, validate_code


def scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}, acc.Tags().get("tensors", [])


@pytest.mark.integration
def test_fit_and_validate_exit_zero(quickstart_run):
    _, fit_code, validate_code = quickstart_run
    assert fit_code == 0
    assert validate_code == 0


@pytest.mark.integration
def test_tensorboard_scalars_and_text(quickstart_run):
    workdir, _, _ = quickstart_run
    log_dir = workdir / "runs" / "quickstart" / "version_0"
    assert list(log_dir.glob("events.out.tfevents.*"))
    tags, tensors = scalars(log_dir)
    for tag in ("train_loss", "train_ppl", "val_loss", "val_ppl", "lora/trainable_params"):
        assert tag in tags, sorted(tags)
    assert any(tag.startswith("lr-") for tag in tags)  # LearningRateMonitor
    assert tags["lora/trainable_params"][0].value > 0
    # TensorBoard text: generations at validation end, and the before/after table
    assert "val/generations/text_summary" in tensors and "answers/before_after/text_summary" in tensors
    # validate (version_1) logs val_loss too
    assert "val_loss" in scalars(workdir / "runs" / "quickstart" / "version_1")[0]


@pytest.mark.integration
def test_checkpoint_holds_only_the_adapters(quickstart_run):
    workdir, _, _ = quickstart_run
    ckpt_dir = workdir / "runs" / "quickstart" / "checkpoints"
    files = sorted(ckpt_dir.glob("*.ckpt"))
    assert {f.name for f in files} >= {"last.ckpt"} and len(files) == 2  # best (monitor val_loss) + last
    for f in files:
        assert f.stat().st_size < 8 * 2**20, f"{f.name}: {f.stat().st_size} bytes"
        ckpt = torch.load(f, map_location="cpu", weights_only=False)
        keys = list(ckpt["state_dict"])
        assert keys and all(".lora_" in k for k in keys), [k for k in keys if ".lora_" not in k][:5]
        assert ckpt["lightning_lora"]["config"]["r"] == 2
        assert ckpt["hyper_parameters"]["model_name_or_path"] == "smollm2-135m-instruct"


@pytest.mark.integration
def test_peft_adapter_dir(quickstart_run):
    workdir, _, _ = quickstart_run
    adapter = workdir / "runs" / "quickstart" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"


@pytest.mark.integration
def test_merged_model_dir_is_a_plain_transformers_model_with_tokenizer(quickstart_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, _, _ = quickstart_run
    merged = workdir / "runs" / "quickstart" / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.eos_token == "<|im_end|>" and (merged / "tokenizer_config.json").is_file()


@pytest.mark.integration
def test_answers_json(quickstart_run):
    workdir, _, _ = quickstart_run
    data = json.loads((workdir / "runs" / "quickstart" / "version_0" / "answers.json").read_text())
    assert data["total"] == 3 and len(data["questions"]) == 3
    assert 0 <= data["base_correct"] <= 3 and 0 <= data["finetuned_correct"] <= 3
    # before: the full sanity validation; after: the last validation (4 steps are too few to promise a drop)
    assert 0 < data["val_loss_before"] < 10 and 0 < data["val_loss_after"] < 10
    assert data["val_loss_after_step"] == 4
    assert data["global_step"] == 4 and data["model"] == "smollm2-135m-instruct"
    assert list(data) == ANSWERS_KEYS
    assert (data["resumed"], data["generate_max_new_tokens"]) == (False, 6)
    for q in data["questions"]:
        assert list(q) == QUESTION_KEYS
        assert q["keywords"] and isinstance(q["base_answer"], str)
        assert q["base_correct"] == contains_answer(q["base_answer"], q["keywords"])


@pytest.mark.integration
def test_fit_prints_the_table_and_the_summary_lines(quickstart_run):
    workdir, _, _ = quickstart_run
    data = json.loads((workdir / "runs" / "quickstart" / "version_0" / "answers.json").read_text())
    lines = [line.strip() for line in (workdir / "fit-stdout.txt").read_text().splitlines()]
    title = "3 held-out questions, before and after fine-tuning (4 steps)"
    assert title in lines
    header = lines.index(title) + 2  # the top border, then the header row
    assert [c.strip() for c in lines[header].strip("┃").split("┃")] == \
        ["question", "expected", "base answer", "fine-tuned answer"]
    summary = [f"base: {data['base_correct']}/3 answers contain the right fact, fine-tuned: {data['finetuned_correct']}/3",
               f"val loss: {data['val_loss_before']:.3f} -> {data['val_loss_after']:.3f}",
               "answers written to runs/quickstart/version_0/answers.json"]
    start = lines.index(summary[0])
    assert lines[start:start + 3] == summary


# ------------------------------------------------------------------------------------------ bad input


def run_error(capsys, *args: str) -> str:
    code = main(["fit", "--config", CONFIG, *SHORT, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lightning-lora fit: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_data_file(in_tmp, capsys):
    line = run_error(capsys, "--data.train_file", "/nonexistent.jsonl")
    assert "train_file='/nonexistent.jsonl' does not exist" in line


def test_data_line_without_the_fields(in_tmp, capsys):
    bad = in_tmp / "bad.jsonl"
    bad.write_text('{"prompt": "Who?", "response": "Me."}\n{"question": "no fields here"}\n')
    line = run_error(capsys, "--data.train_file", str(bad))
    assert f"{bad}:2" in line and "missing fields" in line


def test_unknown_model_name(in_tmp, capsys):
    line = run_error(capsys, "--model.model_name_or_path", "no-such-model-xyz")
    assert "'no-such-model-xyz' was not found: not a local directory, not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in line and "run `hf download no-such-model-xyz`" in line


def test_bad_model_argument_raised_in_init(in_tmp, capsys):
    # jsonargparse wraps errors from __init__; the CLI still shows the one line of the cause
    line = run_error(capsys, "--model.learning_rate", "0")
    assert "learning_rate=0.0; expected a positive number" in line


def test_the_quickstart_trains_a_hub_id(in_tmp, capsys, local_hub, tiny_lm_dir):
    """`--model.model_name_or_path ORG/NAME` (issue 24): the model and tokenizer are downloaded from the Hub
    (a local one) into the Hugging Face cache, trained, and the merged model is the hub model's architecture."""
    from conftest import HUB_REPO

    code = main(["fit", "--config", CONFIG, *SHORT, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
                 "--model.model_name_or_path", HUB_REPO, "--data.tokenizer", HUB_REPO])
    err = capsys.readouterr().err
    assert code == 0, err
    merged = json.loads((in_tmp / "runs" / "quickstart" / "merged" / "config.json").read_text())
    assert merged["num_hidden_layers"] == 2 and merged["hidden_size"] == 64
    adapter = json.loads((in_tmp / "runs" / "quickstart" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == HUB_REPO  # what `merge --base` and PEFT load it onto
    snapshot = in_tmp / "hf-home" / "hub" / "models--tiny-org--tiny-llama" / "snapshots"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in next(snapshot.iterdir()).iterdir()}
