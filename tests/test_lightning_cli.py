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


@pytest.fixture(autouse=True)
def no_command_line(monkeypatch):
    """These tests call the CLI from Python: the test runner's own arguments are not its command line."""
    import sys

    monkeypatch.setattr(sys, "argv", ["lightning-lora"])


@pytest.fixture
def tiny_yaml(tmp_path):
    cfg = dict(TINY_YAML, trainer=dict(TINY_YAML["trainer"], default_root_dir=str(tmp_path)))
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "lora"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("model", ["lit_models.TinyLlamaLM", "lit_models.BuiltInConfigureModel"])
def test_cli_optimizer_and_scheduler_hold_only_adapters(tiny_yaml, model):
    # BuiltInConfigureModel builds its network in configure_model (as CausalLM): LightningCLI alone would
    # build the optimizer before that, over no parameters ("optimizer got an empty parameter list")
    cli = LoRALightningCLI(args=["fit", "--config", str(tiny_yaml), "--model", model, "--optimizer", "torch.optim.AdamW",
                                 "--optimizer.lr", "0.01", "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1",
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
    cli = LoRALightningCLI(args=["--config", str(tiny_yaml), "--optimizer", "torch.optim.AdamW",
                                 "--trainer.max_steps", "1"], run=False)
    from lightning.pytorch.loggers import TensorBoardLogger

    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert cli.trainer.logger.save_dir == "runs" and cli.trainer.logger.name == "lora"


def test_cli_bad_target_is_one_line_and_exit_2(tiny_yaml, capsys):
    code = main(["fit", "--config", str(tiny_yaml), "--optimizer", "torch.optim.AdamW",
                 "--trainer.callbacks.init_args.target_modules", "[qproj]"])
    err = capsys.readouterr().err
    assert code == 2
    [line] = error_lines(err.splitlines())
    assert line.startswith("lightning-lora fit: error: target_modules=['qproj'] matched no module")
    assert "Traceback" not in err


def test_cli_bad_callback_argument_is_one_line_and_exit_2(tiny_yaml, capsys):
    code = main(["fit", "--config", str(tiny_yaml), "--optimizer", "torch.optim.AdamW",
                 "--trainer.callbacks.init_args.log_every_n_steps", "0"])
    err = capsys.readouterr().err
    assert code == 2
    [line] = error_lines(err.splitlines())
    assert line.startswith("lightning-lora fit: error: log_every_n_steps=0 is invalid; expected an integer >= 1")
    assert "Traceback" not in err


# ------------------------------------------------------------------ the command line, as a user runs it

def run_command_line(monkeypatch, capsys, *argv) -> tuple[int, list[str], list[str]]:
    """`lightning-lora ARGV` as the console script runs it (sys.argv, main() without arguments);
    returns the exit code, stderr's lines, and the warnings raised."""
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", ["lightning-lora", *map(str, argv)])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main()
    return code, capsys.readouterr().err.splitlines(), [str(w.message) for w in caught]


def error_lines(lines: list[str], sub: str = "fit") -> list[str]:
    return [line for line in lines if line.startswith(f"lightning-lora {sub}: error: ")]


def write_yaml(tmp_path, cfg: dict, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def edited(tiny_yaml, edit) -> dict:
    cfg = yaml.safe_load(tiny_yaml.read_text())
    edit(cfg)
    return cfg


HELP = " (see lightning-lora fit --help)"
TYPOS = {
    "data_init_arg": (lambda c: c["data"].update(init_args={"batch_sise": 2}), [],
                      "data.init_args.batch_sise is not an option of lit_models.TokenData; did you mean batch_size?"),
    "model_init_arg": (lambda c: c["model"].update(init_args={"lrr": 0.1}), [],
                       "model.init_args.lrr is not an option of lit_models.TinyLlamaLM; did you mean lr?"),
    "trainer_key": (lambda c: c["trainer"].update(max_step=3), [],
                    "trainer.max_step is not an option of lightning-lora fit; did you mean trainer.max_steps?"),
    "top_level_key": (lambda c: c.update(trainr={"max_steps": 1}), [],
                      "trainr.max_steps is not an option of lightning-lora fit; did you mean trainer.max_steps?"),
    "top_level_value": (lambda c: c.update(seed_everythin=1), [],
                        "seed_everythin is not an option of lightning-lora fit; did you mean seed_everything?"),
    "callback_init_arg": (lambda c: c["trainer"]["callbacks"][0]["init_args"].update(rr=4), [],
                          "trainer.callbacks.init_args.rr is not an option of lightning_lora.LoRA; did you mean r?"),
    "instruction_data_key": (lambda c: c.update(data={"class_path": "lightning_lora.data.InstructionDataModule",
                                                      "init_args": {"max_lenght": 32}}), [],
                             ("data.init_args.max_lenght is not an option of lightning_lora.data.InstructionDataModule; "
                             "did you mean max_length?")),
    "flag": (lambda c: None, ["--trainer.max_stepz", "3"],
             "--trainer.max_stepz is not an option of lightning-lora fit; did you mean --trainer.max_steps?"),
    "wrong_type": (lambda c: None, ["--trainer.max_steps", "three"],
                   "trainer.max_steps: Expected a <class 'int'>. Got value: three"),
    "unknown_class": (lambda c: c["model"].update(class_path="lit_models.NoSuchModel"), [],
                      "model (lit_models.NoSuchModel): module 'lit_models' has no attribute 'NoSuchModel'"),
}


@pytest.mark.parametrize("kind", list(TYPOS))
def test_yaml_typo_is_one_line_naming_the_key(tmp_path, tiny_yaml, monkeypatch, capsys, kind):
    edit, extra, message = TYPOS[kind]
    path = write_yaml(tmp_path, edited(tiny_yaml, edit))
    code, lines, warned = run_command_line(monkeypatch, capsys, "fit", "--config", path, *extra)
    assert code == 2
    assert lines == [f"lightning-lora fit: error: {message}{HELP}"]  # no usage dump, nothing else
    assert not [w for w in warned if "args parameter" in w]


def test_typo_names_the_subcommand_it_was_given_to(tmp_path, tiny_yaml, monkeypatch, capsys):
    path = write_yaml(tmp_path, edited(tiny_yaml, lambda c: c["trainer"].update(max_epoch=1)))
    code, lines, _ = run_command_line(monkeypatch, capsys, "validate", "--config", path)
    assert code == 2
    assert lines == [("lightning-lora validate: error: trainer.max_epoch is not an option of lightning-lora validate; "
                     "did you mean trainer.max_epochs? (see lightning-lora validate --help)")]


def test_command_line_run_gives_no_args_and_argv_warning(tiny_yaml, monkeypatch, capsys):
    code, _, warned = run_command_line(monkeypatch, capsys, "fit", "--config", tiny_yaml, "--optimizer", "torch.optim.AdamW",
                                       "--trainer.max_steps", "1")
    assert code == 0
    assert not [w for w in warned if "args parameter" in w], warned


def jsonl(path, rows) -> str:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def data_errors(tmp_path, smollm2_path) -> dict:
    """kind -> (data init_args, the one-line message)."""
    from lightning_lora.data.formats import FORMATS_HINT
    from lightning_lora.hub import load_tokenizer

    one = jsonl(tmp_path / "one.jsonl", [{"prompt": "Q?", "response": "A."}])
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q?", "response": "A."}, '{"prompt": "Q?"'])
    long = jsonl(tmp_path / "long.jsonl", [{"prompt": " ".join(["word"] * 300), "response": "A."}] * 3)
    tok = load_tokenizer(smollm2_path)
    prompt = len(tok.apply_chat_template([{"role": "user", "content": " ".join(["word"] * 300)}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False))
    whole = prompt + len(tok("A.<|im_end|>", add_special_tokens=False)["input_ids"])
    strict = tmp_path / "strict-tokenizer"
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    tok.save_pretrained(strict)
    chat = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."},
                                                         {"role": "user", "content": "Q?"},
                                                         {"role": "assistant", "content": "A."}]}])
    missing = str(tmp_path / "missing.jsonl")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    return {
        "tokenizer": ({"tokenizer": str(no_tokenizer)},
                      f"tokenizer={str(no_tokenizer)!r}: no tokenizer can be loaded from it ("),
        "unknown_model": ({"tokenizer": "no-org/no-model"}, "Model 'no-org/no-model' was not found: "),
        "split": ({"train_file": one, "val_fraction": 0.5},
                  (f"{one}: Cannot split 1 example(s) with val_fraction=0.5: nothing would be left to train on. Add "
                  "examples, lower val_fraction (0 = no validation), or pass val_file.")),
        "missing_file": ({"train_file": missing},
                         (f"train_file={missing!r} does not exist (looked for {missing}). Pass the path of a JSON-lines "
                         f"file ({FORMATS_HINT}), or leave train_file and val_file unset to use the bundled demo "
                         "data.")),
        "max_length": ({"max_length": 0}, ("max_length=0; expected a number of tokens >= 2 (a causal LM learns from "
                                          "the second token on), e.g. 256.")),
        "batch_size": ({"batch_size": 0}, "batch_size=0; expected a positive integer, e.g. 8."),
        "bad_line": ({"train_file": bad, "val_fraction": 0.0},
                     f"{bad}:2: invalid JSON (Expecting ',' delimiter at column 16); {FORMATS_HINT}."),
        "truncation": ({"train_file": long, "val_file": one, "max_length": 32},
                       (f"{long}: no training example is left: 3 of 3 were longer than max_length=32 tokens and "
                       f"truncation left them no token to learn (they need max_length >= {prompt + 1} to keep one, "
                       f"{whole} to stay whole). Raise max_length (data.init_args.max_length) or shorten the "
                       "prompts.")),
        "template": ({"train_file": chat, "val_fraction": 0.0, "tokenizer": str(strict)},
                     (f"{chat}:1: the tokenizer's chat template cannot render this conversation (roles: assistant, "
                     "user, assistant): Conversation roles must alternate user/assistant. Order the messages as the "
                     "template expects, or set use_chat_template: false (data.init_args) to train on plain "
                     "'prompt\\nresponse' text.")),
    }


DATA_ERRORS = ["split", "missing_file", "max_length", "batch_size", "bad_line", "truncation", "template", "tokenizer",
               "unknown_model"]


@pytest.mark.parametrize("kind", DATA_ERRORS)
def test_data_user_errors_through_fit_are_one_line_and_exit_2(tmp_path, tiny_yaml, monkeypatch, capsys,
                                                                smollm2_path, kind):
    init_args, message = data_errors(tmp_path, smollm2_path)[kind]
    init_args.setdefault("tokenizer", smollm2_path)
    cfg = edited(tiny_yaml, lambda c: c.update(data={"class_path": "lightning_lora.data.InstructionDataModule",
                                                     "init_args": init_args}))
    code, lines, _ = run_command_line(monkeypatch, capsys, "fit", "--config", write_yaml(tmp_path, cfg),
                                      "--optimizer", "torch.optim.AdamW")
    assert code == 2
    [line] = error_lines(lines)
    if message.endswith((": ", "(")):  # the rest quotes transformers or the hub
        assert line.startswith(f"lightning-lora fit: error: {message}")
    else:
        assert line == f"lightning-lora fit: error: {message}"
    assert not [line for line in lines if "Traceback" in line or "ValueError" in line]


# ------------------------------------------------------------------ Lightning's own configuration errors (issue 20, item 10)
@pytest.mark.parametrize(("extra", "expected"), [
    (["--trainer.logger", "false"],
     ("lightning-lora fit: error: Lightning: Cannot use `LearningRateMonitor` callback with `Trainer` that has no "
      "logger. Fix: give the Trainer a logger (remove --trainer.logger false / `logger: false` from the config) or "
      "remove the callback that logs.")),
    (["--trainer.accelerator", "mps"],
     ("lightning-lora fit: error: Lightning: `MPSAccelerator` can not run on your system since the accelerator is "
      "not available. The following accelerator(s) is available and can be passed into `accelerator` argument of "
      "`Trainer`: ['cpu']. Fix: change the Trainer, callback, model or data option it names in the config or on the "
      "command line (--print_config shows the resolved config).")),
])
def test_lightning_configuration_errors_are_one_line_and_exit_2(tmp_path, tiny_yaml, monkeypatch, capsys, extra,
                                                                expected):
    cfg = yaml.safe_load(tiny_yaml.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"})
    code, err, _ = run_command_line(monkeypatch, capsys, "fit", "--config", write_yaml(tmp_path, cfg),
                                    "--optimizer", "torch.optim.AdamW", *extra)
    assert code == 2
    assert not any("Traceback" in line for line in err)
    assert error_lines(err) == [expected]
