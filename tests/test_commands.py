"""`lightning-lora export` / `lightning-lora merge`: outputs load in plain transformers / PEFT, user errors exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GATED_REPO, HUB_REPO, make_tiny_llama, randomize_lora_B
from safetensors import safe_open
from torch import nn

from lightning_lora import LoRAConfig, inject_lora, lora_state_dict
from lightning_lora.cli import main
from lightning_lora.peft_format import save_adapter

pytestmark = pytest.mark.filterwarnings("ignore")
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, prog: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"lightning-lora {prog}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(directory.rglob("*"))}


def make_checkpoint(path: Path, config: LoRAConfig, base: str | None = None, seed: int = 0) -> nn.Module:
    """An adapter-only checkpoint as the LoRA callback writes it (network at `self.model`); returns the module."""
    module = nn.Module()
    module.model = make_tiny_llama(seed)
    inject_lora(module, config)  # the callback injects into the LightningModule
    randomize_lora_B(module)
    torch.save({"epoch": 0, "global_step": 2, "state_dict": lora_state_dict(module),
                "lightning_lora": {"version": 1, "config": config.to_dict(), "model_prefix": "model",
                                   "base_model_name_or_path": base, "task_type": "CAUSAL_LM"}}, path)
    return module


@pytest.fixture
def tiny_base_dir(tmp_path) -> Path:
    directory = tmp_path / "tiny-base"
    make_tiny_llama().save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_adapter(tmp_path) -> tuple[Path, torch.Tensor]:
    """A PEFT directory for the tiny Llama written by save_adapter, and the unmerged logits."""
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_B(model)
    return save_adapter(model, tmp_path / "tiny-adapter"), logits(model)


# ---------------------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------------------
def test_merge_smollm2_loads_in_plain_transformers(tmp_path, capsys, smollm2, smollm2_path):
    from transformers import AutoModelForCausalLM

    inject_lora(smollm2, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_lora_B(smollm2, std=0.05)
    adapter = save_adapter(smollm2, tmp_path / "adapter")
    ids = torch.tensor([[1, 42, 314, 2718, 9, 77]])
    unmerged = logits(smollm2, ids)

    code, _, err = run(capsys, "merge", "--base", "smollm2-135m-instruct", "--adapter", adapter, "--out",
                       tmp_path / "merged")
    assert code == 0, err
    assert "Loading base model" in err and "Merging 90 adapter layers" in err and "Writing merged model" in err
    assert "reloads with AutoModelForCausalLM.from_pretrained and gives the same logits on 8 tokens" in err
    out = tmp_path / "merged"
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no LoRA code
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    # fp32 noise floor of this 30-layer model (logits up to ~35): unmerged fp32 vs fp64 differ by ~3e-5, so merged vs
    # unmerged is checked at 1e-4 here; the tiny Llama merge below is held to 1e-5.
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temporary directories left


def test_merge_checkpoint_fp32_and_bf16(tmp_path, capsys, tiny_base_dir):
    module = make_checkpoint(tmp_path / "a.ckpt", LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    unmerged = logits(module.model)
    from transformers import AutoModelForCausalLM

    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", tmp_path / "a.ckpt",
                       "--out", tmp_path / "m32")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "m32")) == ["config.json", "generation_config.json", "model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m32").eval()
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=0)

    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", tmp_path / "a.ckpt",
                       "--out", tmp_path / "m16", "--dtype", "bf16")
    assert code == 0, err
    with safe_open(str(tmp_path / "m16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "m16" / "config.json").read_text())["dtype"] == "bfloat16"
    merged16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged16), unmerged, atol=0.05, rtol=0.05)


def test_merge_tied_embedding_adapter(tmp_path, capsys):
    """An adapter on embed_tokens of a model whose lm_head shares that weight: the merge must not change lm_head."""
    from transformers import AutoModelForCausalLM

    make_tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "tied-base")
    model = make_tiny_llama(tie_word_embeddings=True)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_lora_B(model, std=0.3)
    adapter = save_adapter(model, tmp_path / "adapter")
    code, _, err = run(capsys, "merge", "--base", tmp_path / "tied-base", "--adapter", adapter, "--out", tmp_path / "m")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)


def test_merge_overwrite(tmp_path, capsys, tiny_base_dir, tiny_adapter):
    adapter, unmerged = tiny_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    before = snapshot(out)
    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", adapter, "--out", out)
    assert_user_error(code, err, "merge", str(out), "already exists", "--overwrite")
    assert snapshot(out) == before

    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", adapter, "--out", out, "--overwrite")
    assert code == 0, err
    assert "old.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), unmerged, atol=1e-5, rtol=0)


def _edit(directory: Path, **changes) -> None:
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("problem, needles", [
    ("peft_type", ["peft_type='PREFIX_TUNING' is not supported"]),
    ("dora", ["use_dora=True", "DoRA"]),
    ("truncated", ["adapter_model.safetensors is corrupt or truncated"]),
    ("no_config", ["adapter_config.json is missing"]),
    ("shape", ["shape mismatches", "lora_A.weight"]),
    ("missing_adapter", ["does not exist"]),
    ("missing_base", ["'some-org/not-a-cached-model' was not found: not a local directory, not in the Hugging Face "
                      "cache", "HF_HUB_OFFLINE=1 forbids downloading it",
                      "hf download some-org/not-a-cached-model"]),
])
def test_merge_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, tiny_base_dir, tiny_adapter, problem, needles):
    adapter, _ = tiny_adapter
    base = tiny_base_dir
    if problem == "peft_type":
        _edit(adapter, peft_type="PREFIX_TUNING")
    elif problem == "dora":
        _edit(adapter, use_dora=True)
    elif problem == "truncated":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif problem == "no_config":
        (adapter / "adapter_config.json").unlink()
    elif problem == "shape":  # adapter made for hidden size 64, base has 32
        base = tmp_path / "small-base"
        make_tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(base)
    elif problem == "missing_adapter":
        adapter = tmp_path / "no-such-adapter"
    else:
        base = "some-org/not-a-cached-model"
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "merged")
    assert_user_error(code, err, "merge", *needles)
    assert not (tmp_path / "merged").exists()
    assert snapshot(tmp_path) == before


def test_merge_and_export_fetch_a_hub_base(tmp_path, capsys, local_hub, tiny_lm_dir, tiny_adapter):
    """`--base ID` is downloaded into the Hugging Face cache (a local Hub) as transformers does; the result is
    the one a local directory of the same model gives."""
    adapter, _ = tiny_adapter
    code, _, err = run(capsys, "merge", "--base", tiny_lm_dir, "--adapter", adapter, "--out", tmp_path / "local")
    assert code == 0, err
    code, _, err = run(capsys, "merge", "--base", HUB_REPO, "--adapter", adapter, "--out", tmp_path / "hub")
    assert code == 0, err
    assert (tmp_path / "hub" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    assert (tmp_path / "hub" / "tokenizer.json").read_bytes() == (tmp_path / "local" / "tokenizer.json").read_bytes()
    assert (tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").is_file()

    code, _, err = run(capsys, "merge", "--base", GATED_REPO, "--adapter", adapter, "--out", tmp_path / "gated")
    assert_user_error(code, err, "merge", f"Model '{GATED_REPO}' is gated and no Hugging Face token was found",
                      "set HF_TOKEN=hf_...")
    assert not (tmp_path / "gated").exists()

    make_checkpoint(tmp_path / "a.ckpt", LoRAConfig(r=4, target_modules=["q_proj"]), base=HUB_REPO)
    code, _, err = run(capsys, "export", tmp_path / "a.ckpt", tmp_path / "peft")
    assert code == 0, err
    assert f"loads onto the architecture of {HUB_REPO} and holds the checkpoint's 4 tensors" in err


def test_help_and_usage_errors(capsys):
    for sub in ("merge", "export"):
        code, out, _ = run(capsys, sub, "--help")
        assert code == 0 and f"usage: lightning-lora {sub}" in out and "--overwrite" in out
    code, _, err = run(capsys, "merge", "--base", "x")
    assert code == 2 and "the following arguments are required: --adapter, --out" in err
    code, _, err = run(capsys, "merge", "--base", "x", "--adapter", "a", "--out", "o", "--dtype", "int8")
    assert code == 2 and "invalid choice: 'int8'" in err


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------
def test_export_loads_in_peft_and_console_script(tmp_path, capsys, tiny_base_dir):
    from peft import PeftModel

    module = make_checkpoint(tmp_path / "a.ckpt", LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "k_proj"]),
                             base=str(tiny_base_dir))
    code, _, err = run(capsys, "export", tmp_path / "a.ckpt", tmp_path / "peft")
    assert code == 0, err
    assert "Converting" in err and "Wrote PEFT adapter" in err
    assert f"loads onto the architecture of {tiny_base_dir} and holds the checkpoint's 8 tensors" in err
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_base_dir) and cfg["target_modules"] == ["q_proj", "k_proj"]
    pm = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm), logits(module.model), atol=1e-5, rtol=0)

    # the installed console script, once, end to end
    script = Path(sys.executable).with_name("lightning-lora")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(script), "export", str(tmp_path / "a.ckpt"), str(tmp_path / "peft2"),
                           "--base-model", "my-org/tiny"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert ("loads onto the checkpoint's layer shapes (my-org/tiny's config.json is not available here) and holds "
            "the checkpoint's 8 tensors") in proc.stderr
    written = json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "my-org/tiny"
    assert (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()


def test_export_errors(tmp_path, capsys):
    make_checkpoint(tmp_path / "a.ckpt", LoRAConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "export", tmp_path / "a.ckpt", out)
    assert_user_error(code, err, "export", "already exists", "--overwrite")
    assert snapshot(tmp_path) == before

    truncated = tmp_path / "t.ckpt"
    truncated.write_bytes((tmp_path / "a.ckpt").read_bytes()[:200])
    code, _, err = run(capsys, "export", truncated, tmp_path / "peft-t")
    assert_user_error(code, err, "export", "t.ckpt is not a readable PyTorch checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "plain.ckpt")
    code, _, err = run(capsys, "export", tmp_path / "plain.ckpt", tmp_path / "peft-p")
    assert_user_error(code, err, "export", "was not written with lightning-lora's LoRA callback")
    code, _, err = run(capsys, "export", tmp_path / "missing.ckpt", tmp_path / "peft-m")
    assert_user_error(code, err, "export", "missing.ckpt does not exist")
    assert not any((tmp_path / n).exists() for n in ("peft-t", "peft-p", "peft-m"))

    code, _, err = run(capsys, "export", tmp_path / "a.ckpt", out, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------------------------------------------------------
# a checkpoint written by the real LoRA callback during Trainer.fit
# ---------------------------------------------------------------------------------------------------------------------
def test_export_and_merge_a_real_callback_checkpoint(tmp_path, capsys, tiny_base_dir):
    import lightning as L
    from peft import PeftModel
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM

    from lightning_lora import LoRA

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.05})
            self.model = make_tiny_llama().train()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    data = DataLoader(TensorDataset(torch.randint(1, 128, (8, 10), generator=torch.Generator().manual_seed(0))),
                      batch_size=4)
    module = LM()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                        merge_on_fit_end=False, log_every_n_steps=1)])
    trainer.fit(module, data)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    module.model.eval()
    trained = logits(module.model)
    assert not torch.allclose(trained, logits(make_tiny_llama()), atol=1e-4)  # training changed the adapters

    code, _, err = run(capsys, "export", ckpt, tmp_path / "peft")
    assert code == 0, err
    pm = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm), trained, atol=1e-5, rtol=0)
    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", ckpt, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# a command never reports success for an output that cannot be used (issue 13, kind 4)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_base_dir(tmp_path) -> Path:
    """A base of another size (hidden 32): adapters for the tiny Llama (hidden 64) do not fit it."""
    directory = tmp_path / "small-base"
    make_tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("how", ["recorded", "--base-model"])
def test_export_for_a_base_it_does_not_fit_exits_2_and_writes_nothing(tmp_path, capsys, tiny_base_dir,
                                                                         small_base_dir, how):
    config = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    if how == "recorded":
        make_checkpoint(tmp_path / "a.ckpt", config, base=str(small_base_dir))
        extra = []
    else:
        make_checkpoint(tmp_path / "a.ckpt", config, base=str(tiny_base_dir))
        extra = ["--base-model", small_base_dir]
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "export", tmp_path / "a.ckpt", tmp_path / "peft", *extra)
    assert_user_error(code, err, "export")
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith(
        f"lightning-lora export: error: the exported adapter does not load onto {small_base_dir}, the base model its "
        f"adapter_config.json names: {tmp_path / 'peft' / 'adapter_model.safetensors'}: The adapter state dict does "
        "not fit this model: shape mismatches (8): model.layers.0.self_attn.q_proj.lora_A.weight: checkpoint (2, 64) "
        "vs model (2, 32);")
    assert line.endswith("model.layers.0.self_attn.v_proj.lora_A.weight: checkpoint (2, 64) vs model (2, 32) ... and 5 "
                         "more. Check that the adapter was trained for this model with the same LoRA config (r, "
                         "target_modules, rank_pattern). Pass --base-model naming the model the adapter was trained on.")
    assert snapshot(tmp_path) == before  # no output directory, no temporary directory
    # the right base: the same checkpoint exports and says what was checked
    code, _, err = run(capsys, "export", tmp_path / "a.ckpt", tmp_path / "peft", "--base-model", tiny_base_dir)
    assert code == 0, err
    assert f"loads onto the architecture of {tiny_base_dir} and holds the checkpoint's 8 tensors" in err


def test_verify_export_catches_a_directory_that_differs_from_the_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    from lightning_lora.commands import verify_export
    from lightning_lora.errors import CommandError
    from lightning_lora.peft_format import checkpoint_to_peft

    make_checkpoint(tmp_path / "a.ckpt", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = checkpoint_to_peft(tmp_path / "a.ckpt", tmp_path / "peft")
    assert verify_export(out, tmp_path / "a.ckpt") == ("loads onto the checkpoint's layer shapes and holds the "
                                                       "checkpoint's 8 tensors")
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({**tensors, key: tensors[key] + 1.0}, str(weights), metadata={"format": "pt"})
    with pytest.raises(CommandError) as err:
        verify_export(out, tmp_path / "a.ckpt")
    assert str(err.value) == ("the exported adapter's 8 tensors differ from the checkpoint's 8 (shapes, dtypes or "
                              "values).")
    del tensors[key]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CommandError) as err:
        verify_export(out, tmp_path / "a.ckpt", shown_as="out/adapter")
    assert str(err.value).startswith(
        "the exported adapter does not hold the checkpoint's adapters: out/adapter/adapter_model.safetensors: The "
        "adapter state dict does not fit this model: missing keys (1): model.layers.1.self_attn.v_proj.lora_B.weight")


def _bad_adapter(tmp_path, problem: str) -> Path:
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model, std=1e6 if problem == "overflow" else 0.02)
    if problem == "nan":
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.lora_B.weight[0, 0] = float("nan")
    return save_adapter(model, tmp_path / f"adapter-{problem}")


@pytest.mark.parametrize("problem, dtype, message", [
    ("nan", "fp32", ("the merged model has non-finite weights (inf or nan) in 1 tensor(s): "
                    "model.layers.0.self_attn.q_proj.weight: the adapter {adapter} holds non-finite values, or the "
                    "merged weights overflow fp32; check the adapter (a training run that diverged leaves nan in it).")),
    ("overflow", "fp16", ("the merged model has non-finite weights (inf or nan) in 4 tensor(s): "
                         "model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.v_proj.weight, "
                         "model.layers.1.self_attn.q_proj.weight ... and 1 more: the adapter {adapter} holds non-finite values, "
                         "or the merged weights overflow fp16; check the adapter, or merge with --dtype fp32.")),
])
def test_merge_that_gives_an_unusable_model_exits_2_and_writes_nothing(tmp_path, capsys, tiny_base_dir, problem,
                                                                       dtype, message):
    adapter = _bad_adapter(tmp_path, problem)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", adapter, "--out", tmp_path / "merged",
                       "--dtype", dtype)
    assert_user_error(code, err, "merge")
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"lightning-lora merge: error: {message.format(adapter=adapter)}"]
    assert snapshot(tmp_path) == before


def test_merge_of_large_adapter_values_in_bf16_is_checked_and_written(tmp_path, capsys, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    adapter = _bad_adapter(tmp_path, "overflow")  # overflows fp16, not bf16 (fp32's range)
    code, _, err = run(capsys, "merge", "--base", tiny_base_dir, "--adapter", adapter, "--out", tmp_path / "m",
                       "--dtype", "bf16")
    assert code == 0, err
    assert "reloads with AutoModelForCausalLM.from_pretrained and gives the same logits on 8 tokens" in err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    assert torch.isfinite(logits(reloaded)).all()


def test_verify_merged_catches_a_directory_that_does_not_reproduce_the_merge(tmp_path):
    from lightning_lora.commands import merged_logits, verify_merged
    from lightning_lora.errors import CommandError

    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    expected = merged_logits(model)
    assert expected.shape == (1, 8, 128)
    assert verify_merged(tmp_path / "m", expected, "fp32") == (
        "reloads with AutoModelForCausalLM.from_pretrained and gives the same logits on 8 tokens")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))  # config != the merge
    with pytest.raises(CommandError, match=r"^the merged model reloaded from disk computes different logits than "
                                           r"the merged model in memory \(max difference [0-9.e+-]+ on 8 tokens, "
                                           r"allowed [0-9.e+-]+\); its saved weights or config do not match the "
                                           r"merge\.$"):
        verify_merged(tmp_path / "m", expected, "fp32")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(CommandError) as err:
        verify_merged(tmp_path / "m", expected, "fp32")
    assert str(err.value) == ("the merged model written does not reload with from_pretrained (SafetensorError: Error "
                              "while deserializing header: invalid header length).")


def test_merge_base_that_is_not_a_model_exits_2(tmp_path, capsys, tiny_adapter):
    adapter, _ = tiny_adapter
    base = tmp_path / "not-a-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, _, err = run(capsys, "merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "m")
    assert_user_error(code, err, "merge", f"--base {base}: cannot load a causal language model from it (",
                      "pass a transformers model directory with config.json and weights.")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------------------------
# a base of another shape: one short line with the fix (issue 20, item 10)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recorded", [True, False])
def test_merge_onto_a_base_of_another_shape_is_one_short_line(tmp_path, capsys, tiny_base_dir, small_base_dir,
                                                              recorded):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir) if recorded else make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_B(model)
    adapter = save_adapter(model, tmp_path / "adapter")
    code, _, err = run(capsys, "merge", "--base", small_base_dir, "--adapter", adapter, "--out", tmp_path / "merged")
    assert_user_error(code, err, "merge")
    [line] = [line for line in err.splitlines() if "error:" in line]
    fix = f" The adapter was trained on {tiny_base_dir}: pass --base {tiny_base_dir}." if recorded else ""
    assert line == (
        f"lightning-lora merge: error: {adapter / 'adapter_model.safetensors'}: The adapter state dict does not fit "
        "this model: shape mismatches (28): model.layers.0.mlp.down_proj.lora_A.weight: checkpoint (4, 128) vs model "
        "(4, 64); model.layers.0.mlp.down_proj.lora_B.weight: checkpoint (64, 4) vs model (32, 4); "
        "model.layers.0.mlp.gate_proj.lora_A.weight: checkpoint (4, 64) vs model (4, 32) ... and 25 more. Check that "
        "the adapter was trained for this model with the same LoRA config (r, target_modules, rank_pattern)." + fix)
    assert not (tmp_path / "merged").exists()
