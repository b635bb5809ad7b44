"""PEFT on-disk format: ours -> PEFT, PEFT -> ours, checkpoints, and bad input (real `peft`, CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, randomize_lora_B
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora import LoRAConfig, LoRAError, inject_lora, lora_state_dict
from lightning_lora.layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from lightning_lora.peft_format import (
    AdapterFormatError,
    UnsupportedAdapterError,
    checkpoint_to_peft,
    from_peft_key,
    load_adapter,
    peft_to_state_dict,
    read_checkpoint,
    save_adapter,
)
from lightning_lora.peft_format.keys import _LayerInfo, _to_peft_key

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import (  # noqa: E402
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
pytestmark = pytest.mark.filterwarnings("ignore")


def make_tiny_seq_cls(seed: int = 0):
    """A 2-layer LlamaForSequenceClassification with a `score` head (3 labels)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, pad_token_id=0, num_labels=3)).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def file_keys(directory) -> tuple[set[str], dict]:
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
        return set(f.keys()), f.metadata()


def assert_peft_loads_exactly(directory, fresh_base: nn.Module) -> PeftModel:
    """PEFT loads `directory` with no missing/unexpected adapter keys, and expects exactly the file's keys."""
    pm = PeftModel.from_pretrained(fresh_base, str(directory)).eval()
    result = set_peft_model_state_dict(pm, load_peft_weights(str(directory), device="cpu"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if ".default" in k] == []
    expected = set(get_peft_model_state_dict(pm, save_embedding_layers=False))
    assert file_keys(directory)[0] == expected
    return pm


def bump_trainable_extras(model: nn.Module) -> None:
    """Change trainable biases / modules_to_save so that they matter in the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                p.add_(0.05 * torch.randn_like(p))


# ---------------------------------------------------------------------------------------------------------------------
# ours -> PEFT
# ---------------------------------------------------------------------------------------------------------------------
def test_save_plain_llama_json_metadata_and_keys(tmp_path):
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model)
    model.name_or_path = "my-org/tiny-llama"
    out = save_adapter(model, tmp_path / "adapter")

    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys, metadata = file_keys(out)
    assert metadata == {"format": "pt"}
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                    for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "my-org/tiny-llama",
        "revision": None, "peft_version": "0.22.0", "inference_mode": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "exclude_modules": None, "bias": "none", "use_rslora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
        "init_lora_weights": True, "use_dora": False, "lora_bias": False, "layers_to_transform": None,
        "layers_pattern": None, "layer_replication": None,
    }
    tensors = load_file(str(out / "adapter_model.safetensors"))
    q = model.model.layers[1].self_attn.q_proj
    assert torch.equal(tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"], q.lora_B.weight)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)

    pm = assert_peft_loads_exactly(out, make_tiny_llama())
    assert pm.peft_config["default"].lora_dropout == 0.05
    torch.testing.assert_close(logits(pm), logits(model), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(pm), logits(make_tiny_llama()), atol=1e-4)  # the adapter matters


@pytest.mark.parametrize("variant", ["rslora_patterns", "modules_to_save", "gpt2_conv1d", "embedding", "wrapper"])
def test_save_variants_load_in_peft_with_equal_logits(tmp_path, variant):
    factory = make_tiny_llama
    if variant == "rslora_patterns":
        cfg = LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear", exclude_modules=["o_proj"],
                         rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"q_proj": 3})
    elif variant == "modules_to_save":
        factory = make_tiny_seq_cls
        cfg = LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    elif variant == "gpt2_conv1d":
        factory = make_tiny_gpt2
        cfg = LoRAConfig(r=2, alpha=4, target_modules="all-linear", bias="lora_only")
    elif variant == "embedding":
        cfg = LoRAConfig(r=4, alpha=8, target_modules=["embed_tokens", "k_proj"])
    else:  # regex and pattern written against the wrapper's paths (model.model.layers...)
        cfg = LoRAConfig(r=4, alpha=8, target_modules=r"model\.model\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)",
                         rank_pattern={r"model\.model\.layers\.0\.self_attn\.q_proj": 2}, bias="all")
    model = factory()
    holder: nn.Module = model
    if variant == "wrapper":  # injected through a LightningModule-like wrapper: keys relative to the network
        holder = nn.Module()
        holder.model = model
        inject_lora(holder, cfg)
    else:
        inject_lora(model, cfg)
    randomize_lora_B(holder)
    bump_trainable_extras(holder)
    out = save_adapter(holder, tmp_path / "adapter")
    if variant == "wrapper":  # the callback/mixin pass the network and the config that lives on the wrapper
        again = save_adapter(model, tmp_path / "again", config=cfg)
        assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
        assert (again / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()

    keys, _ = file_keys(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert all(k.startswith("base_model.model.") for k in keys)
    if variant == "rslora_patterns":
        assert saved["use_rslora"] is True
        assert saved["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
        assert saved["exclude_modules"] == ["o_proj"]
        assert saved["rank_pattern"] == {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}
        assert saved["alpha_pattern"] == {"q_proj": 3}
        assert load_file(str(out / "adapter_model.safetensors"))[
            "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (6, 128)
    elif variant == "modules_to_save":
        assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
        assert "base_model.model.score.weight" in keys
        assert not any("modules_to_save" in k for k in keys)
    elif variant == "gpt2_conv1d":
        assert saved["fan_in_fan_out"] is True and saved["bias"] == "lora_only"
        assert saved["target_modules"] == ["c_attn", "c_proj", "c_fc"]
        assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
        assert "base_model.model.transformer.h.0.attn.c_attn.bias" not in keys
    elif variant == "embedding":
        assert {"base_model.model.model.embed_tokens.lora_embedding_A",
                "base_model.model.model.embed_tokens.lora_embedding_B"} <= keys
        assert not any("embed_tokens.lora_A" in k for k in keys)
    else:  # re-expressed relative to the network, and checked with PEFT's matching rules
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert not any(k.startswith("base_model.model.model.model.") for k in keys)
        assert saved["target_modules"] == ["q_proj", "up_proj"]
        assert saved["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2}

    pm = assert_peft_loads_exactly(out, factory())
    torch.testing.assert_close(logits(pm), logits(model), atol=1e-5, rtol=0)


def test_save_smollm2_peft_logits_and_reload(tmp_path, smollm2, smollm2_path):
    """The real SmolLM2-135M-Instruct (one forward costs ~1-2 s on a busy CPU, so two forwards only)."""
    from lightning_lora.hub import load_causal_lm

    inject_lora(smollm2, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    randomize_lora_B(smollm2, std=0.05)
    ids = torch.tensor([[1, 42, 314, 2718, 9, 77]])
    out = save_adapter(smollm2, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == smollm2_path
    pm = assert_peft_loads_exactly(out, load_causal_lm(smollm2_path).eval())
    with torch.no_grad():
        ours, theirs = smollm2(ids).logits, pm(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # back into a fresh base with our loader: the very same adapter tensors
    base = load_causal_lm(smollm2_path).eval()
    names = load_adapter(base, out)
    assert len(names) == 2 * 30 + 1
    mine, reloaded = lora_state_dict(smollm2), lora_state_dict(base)
    assert mine.keys() == reloaded.keys()
    assert all(torch.equal(mine[k], reloaded[k]) for k in mine)


def test_save_refuses_existing_dir_and_overwrites_atomically(tmp_path, monkeypatch):
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists and is not empty.*overwrite=True"):
        save_adapter(model, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, out, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directory left behind
    monkeypatch.undo()

    save_adapter(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_adapter(model, empty)  # an existing empty directory is fine
    assert (empty / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# PEFT -> ours
# ---------------------------------------------------------------------------------------------------------------------
PEFT_VARIANTS = {
    "plain": (make_tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "rslora_patterns": (make_tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                                              rank_pattern={"k_proj": 2}, alpha_pattern={r"layers\.0\.mlp\.up_proj": 5},
                                              task_type="CAUSAL_LM")),
    "modules_to_save": (make_tiny_seq_cls, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="SEQ_CLS")),
    "gpt2_conv1d": (make_tiny_gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], bias="all",
                                         fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "embedding": (make_tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"],
                                        task_type="CAUSAL_LM")),
    "layers_regex_exclude": (make_tiny_llama, dict(r=3, lora_alpha=6, target_modules=["q_proj", "gate_proj"],
                                                   layers_to_transform=[1], exclude_modules=["gate_proj"])),
    "regex": (make_tiny_llama, dict(r=2, lora_alpha=2, target_modules=r".*\.(0|1)\.self_attn\.(k|v)_proj",
                                    init_lora_weights="gaussian")),
}


def make_peft_adapter(directory, variant: str) -> tuple[nn.Module, torch.Tensor]:
    """A PEFT-written adapter (get_peft_model + save_pretrained) with random B / heads; returns (factory, logits)."""
    factory, kwargs = PEFT_VARIANTS[variant]
    pm = get_peft_model(factory(), LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.eval()
    pm.save_pretrained(str(directory))
    return factory, logits(pm)


@pytest.mark.parametrize("variant", [v for v in PEFT_VARIANTS if v != "plain"])  # plain: test_conformance
def test_load_peft_written_adapters(tmp_path, variant):
    factory, expected = make_peft_adapter(tmp_path / "peft", variant)
    base = factory()
    names = load_adapter(base, tmp_path / "peft")
    torch.testing.assert_close(logits(base), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(factory()), expected, atol=1e-4)
    assert all(not p.requires_grad for p in base.parameters())
    if variant == "layers_regex_exclude":
        assert names == ["model.layers.1.self_attn.q_proj"]
    if variant == "regex":
        assert names == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("k_proj", "v_proj")]
    if variant == "embedding":
        assert isinstance(base.model.embed_tokens, LoRAEmbedding)
    if variant == "modules_to_save":
        assert "score.weight" in lora_state_dict(base)


def test_load_trainable_and_peft_spellings(tmp_path):
    _, expected = make_peft_adapter(tmp_path / "peft", "embedding")
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    # rewrite with other spellings PEFT also produces: no prefix, adapter name inside the key
    respelled = {}
    for key, value in tensors.items():
        key = key.removeprefix("base_model.model.")
        key = key.replace("lora_A.weight", "lora_A.default.weight")
        key = key.replace("lora_embedding_B", "lora_embedding_B.default")
        respelled[key] = value
    other = tmp_path / "respelled"
    other.mkdir()
    save_file(respelled, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    (other / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())

    base = make_tiny_llama()
    load_adapter(base, other, trainable=True)
    torch.testing.assert_close(logits(base), expected, atol=1e-5, rtol=0)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert from_peft_key("base_model.model.x.q_proj.base_layer.bias") == "x.q_proj.bias"
    sd = peft_to_state_dict(other, prefix="model")
    assert {"model.model.embed_tokens.lora_A.weight", "model.model.layers.0.self_attn.o_proj.lora_A.weight"} <= set(sd)


def test_load_all_linear_string_and_refuse_double_injection(tmp_path):
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    randomize_lora_B(model)
    out = save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["target_modules"] = "all-linear"  # PEFT's shorthand, e.g. in a hand-written config
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    base = make_tiny_llama()
    names = load_adapter(base, out)
    assert len(names) == 14 and "lm_head" not in names
    torch.testing.assert_close(logits(base), logits(model), atol=1e-5, rtol=0)
    before = {k: v.clone() for k, v in lora_state_dict(base).items()}
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        load_adapter(base, out)
    after = lora_state_dict(base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------------------
# Lightning adapter-only checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def make_checkpoint(path, lm: nn.Module, config: LoRAConfig, base: str | None = None,
                    task_type: str | None = "CAUSAL_LM") -> nn.Module:
    """What the LoRA callback writes: it injects into the LightningModule (network at `self.model`) and keeps
    only the adapter keys."""
    module = nn.Module()
    module.model = lm
    inject_lora(module, config)
    randomize_lora_B(module)
    torch.save({"epoch": 1, "global_step": 3, "state_dict": lora_state_dict(module),
                "lightning_lora": {"version": 1, "config": config.to_dict(), "model_prefix": "model",
                                   "base_model_name_or_path": base, "task_type": task_type}}, path)
    return module


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("kind", ["all_linear", "module_paths"])
def test_checkpoint_to_peft_and_back(tmp_path, with_base, kind):
    base_dir = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_dir)
    if kind == "all_linear":
        cfg = LoRAConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2})
    else:  # a regex and patterns over the LightningModule's paths (model.model.layers...), as the callback sees them
        cfg = LoRAConfig(r=4, alpha=8, target_modules=r"model\.model\.layers\.\d\.self_attn\.(q|v)_proj",
                         rank_pattern={r"model\.model\.layers\.1\.self_attn\.v_proj": 2},
                         alpha_pattern={r"model\.model\.layers\.0\.self_attn\.q_proj": 3})
    module = make_checkpoint(tmp_path / "a.ckpt", make_tiny_llama(), cfg, base=str(base_dir) if with_base else None)
    ckpt = read_checkpoint(tmp_path / "a.ckpt")
    assert ckpt.model_prefix == "model" and ckpt.config == cfg
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in ckpt.state_dict

    out = checkpoint_to_peft(tmp_path / "a.ckpt", tmp_path / "peft")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == (str(base_dir) if with_base else None)
    if kind == "module_paths":  # re-expressed relative to the network
        assert saved["rank_pattern"] == {r"model\.layers\.1\.self_attn\.v_proj": 2}
        assert saved["alpha_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 3}
        paths = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
        assert saved["target_modules"] == (["q_proj", "v_proj"] if with_base else paths)
    elif with_base:  # architecture known: the short suffix list is verified against every module
        assert saved["rank_pattern"] == {"down_proj": 2}
        assert saved["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:  # all-linear without the architecture: explicit module paths
        assert "model.layers.1.mlp.down_proj" in saved["target_modules"] and len(saved["target_modules"]) == 14
    pm = assert_peft_loads_exactly(out, make_tiny_llama())
    torch.testing.assert_close(logits(pm), logits(module.model), atol=1e-5, rtol=0)

    fresh = nn.Module()
    fresh.model = make_tiny_llama()
    names = load_adapter(fresh, tmp_path / "a.ckpt")
    assert names[0] == "model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(logits(fresh.model), logits(module.model), atol=1e-5, rtol=0)


def test_checkpoint_embedding_needs_architecture(tmp_path):
    make_checkpoint(tmp_path / "e.ckpt", make_tiny_llama(), LoRAConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(AdapterFormatError, match="model.embed_tokens.*embedding.*--base-model"):
        checkpoint_to_peft(tmp_path / "e.ckpt", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    base_dir = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_dir)
    out = checkpoint_to_peft(tmp_path / "e.ckpt", tmp_path / "peft", base_model_name_or_path=str(base_dir))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in file_keys(out)[0]
    assert_peft_loads_exactly(out, make_tiny_llama())


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing changed
# ---------------------------------------------------------------------------------------------------------------------
def snapshot(directory) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(directory.iterdir())}


def assert_untouched(model: nn.Module, reference: torch.Tensor) -> None:
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(".lora_" in k for k in model.state_dict())
    torch.testing.assert_close(logits(model), reference, atol=0, rtol=0)


@pytest.fixture
def peft_dir(tmp_path):
    make_peft_adapter(tmp_path / "peft", "plain")
    return tmp_path / "peft"


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (dict(peft_type="IA3"), r"peft_type='IA3' is not supported.*LoRA adapters only"),
    (dict(layer_replication=[[0, 2], [1, 2]]), r"layer_replication=.*layer replication.*not supported"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa'.*changes the base weights"),
    (dict(lora_bias=True), r"lora_bias=True"),
    (dict(some_future_option={"x": 1}), r"unknown LoRA option\(s\) some_future_option"),
])
def test_unsupported_config_is_a_clear_error(peft_dir, change, message):
    edit_config(peft_dir, **change)
    base = make_tiny_llama()
    reference = logits(base)
    with pytest.raises(UnsupportedAdapterError, match=message) as info:
        load_adapter(base, peft_dir)
    assert str(peft_dir / "adapter_config.json") in str(info.value)
    assert_untouched(base, reference)


def test_missing_and_corrupt_files(peft_dir, tmp_path):
    base = make_tiny_llama()
    reference = logits(base)
    weights = peft_dir / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors is corrupt or truncated"):
        load_adapter(base, peft_dir)
    weights.unlink()
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors is missing"):
        load_adapter(base, peft_dir)
    weights.write_bytes(data)
    (peft_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is missing"):
        load_adapter(base, peft_dir)
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_adapter(base, tmp_path / "nowhere")
    assert_untouched(base, reference)

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "epoch": 0}, bad)
    with pytest.raises(AdapterFormatError, match="was not written with lightning-lora's LoRA callback"):
        read_checkpoint(bad)
    make_checkpoint(bad, make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(AdapterFormatError, match=r"bad\.ckpt is not a readable PyTorch checkpoint"):
        load_adapter(base, bad)
    assert_untouched(base, reference)


def test_shape_mismatch_leaves_model_untouched(peft_dir):
    other = make_tiny_llama(hidden_size=32, intermediate_size=64)  # adapter was made for hidden size 64
    reference = logits(other)
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: .*shape mismatches.*lora_A.weight"):
        load_adapter(other, peft_dir)
    assert_untouched(other, reference)
    with pytest.raises(AdapterFormatError, match="matches no module"):
        load_adapter(make_tiny_gpt2(), peft_dir)


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    from conftest import make_tiny_llama

    from lightning_lora import LoRAConfig, inject_lora, save_adapter

    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=2))
    save_adapter(model, tmp_path / "adapter")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        mode = stat.S_IMODE((tmp_path / "adapter" / name).stat().st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))


def test_save_adapter_reads_back_what_it_wrote_and_lands_nothing_when_it_differs(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4))
    real = safetensors.torch.save_file

    def short_write(tensors, path, metadata=None):  # a disk that silently loses one tensor
        real(dict(list(tensors.items())[1:]), path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", short_write)
    with pytest.raises(AdapterFormatError, match="the adapter read back differs from what was written; nothing was "
                                                 "written"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and list(tmp_path.iterdir()) == []


def test_peft_keys_come_from_the_layer_types_answers():
    """`peft_format.keys` asks the adapter class for PEFT's tensor names; a new layer type that names them
    differently needs no change there."""

    class Renamed(LoRALinear):
        @classmethod
        def peft_tensor_names(cls) -> dict[str, str]:
            return {"lora_A.weight": "lora_down", "lora_B.weight": "lora_up"}

    layers = {"m.q": _LayerInfo(LoRALinear, 2, 2.0), "m.c": _LayerInfo(LoRAConv1D, 2, 2.0),
              "m.e": _LayerInfo(LoRAEmbedding, 2, 2.0), "m.r": _LayerInfo(Renamed, 2, 2.0)}
    assert [_to_peft_key(f"m.{n}.lora_A.weight", layers) for n in "qcer"] == [
        "base_model.model.m.q.lora_A.weight", "base_model.model.m.c.lora_A.weight",
        "base_model.model.m.e.lora_embedding_A", "base_model.model.m.r.lora_down"]
    assert _to_peft_key("m.r.lora_B.weight", layers) == "base_model.model.m.r.lora_up"
    assert _to_peft_key("m.q.lora_magnitude_vector", layers) == "base_model.model.m.q.lora_magnitude_vector"
    assert _to_peft_key("m.q.bias", layers) == "base_model.model.m.q.base_layer.bias"
