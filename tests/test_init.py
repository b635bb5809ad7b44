"""PiSSA / OLoRA initialisation (issue 17 point 3): step 0, PEFT parity, the residual base never mistaken."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from lit_models import TinyLlamaModule, fit
from torch import nn

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    save_adapter,
)
from lightning_lora.peft_format import UnsupportedAdapterError, checkpoint_to_peft
from lightning_lora.surgery import lora_layers
from lightning_lora.variants import pissa as base_init

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

pytestmark = pytest.mark.filterwarnings("ignore")
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
INITS = ["pissa", "pissa_niter_4", "olora"]
MODELS = {"llama": (make_tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (make_tiny_gpt2, ["c_attn", "c_proj"])}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def train(model: nn.Module, steps: int = 10, lr: float = 1e-2, params=None) -> None:
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params if params is not None else lora_parameters(model), lr=lr)
    model.train()
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks (GPT-2 has dropout) in every model trained
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ------------------------------------------------------------------------------------------------ step 0
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_step0_function_is_the_base_and_the_base_is_the_residual(init, arch):
    factory, targets = MODELS[arch]
    base = factory()
    reference, original = logits(base), weights(base)
    model = factory()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets, init=init))
    assert (logits(model) - reference).abs().max().item() <= 1e-5
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_A.weight, layer.lora_init_A) and torch.equal(layer.lora_B.weight, layer.lora_init_B)
        w_oi = layer.weight_oi()
        orig = original[f"{name}.weight"]
        orig_oi = orig.T if arch == "gpt2" else orig
        assert not torch.allclose(w_oi, orig_oi, atol=1e-3)  # the base really is the residual
        torch.testing.assert_close(w_oi + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight, orig_oi,
                                   atol=1e-6, rtol=0)
        assert not layer.weight.requires_grad
    if init.startswith("pissa"):  # the adapter holds the principal part: ||scaling B A|| is the top-r energy
        name, layer = next(iter(lora_layers(model)))
        top = torch.linalg.svdvals(original[f"{name}.weight"])[:4].norm()
        energy = (layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).norm()
        torch.testing.assert_close(energy, top, atol=1e-4 if init == "pissa" else 0.1 * top.item(), rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft_bit_for_bit(init):
    factory, targets = MODELS["llama"]
    ours = factory()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets, init=init))
    pm = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    sd = pm.state_dict()
    for name, layer in lora_layers(ours):
        key = f"base_model.model.{name}"
        assert torch.equal(layer.weight, sd[f"{key}.base_layer.weight"])
        assert torch.equal(layer.lora_A.weight, sd[f"{key}.lora_A.default.weight"])
        assert torch.equal(layer.lora_B.weight, sd[f"{key}.lora_B.default.weight"])


def test_pissa_on_conv1d_equals_peft_bit_for_bit():
    factory, targets = MODELS["gpt2"]
    ours = factory()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets, init="pissa"))
    pm = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    sd = pm.state_dict()
    for name, layer in lora_layers(ours):
        assert torch.equal(layer.weight, sd[f"base_model.model.{name}.base_layer.weight"])
        assert torch.equal(layer.lora_B.weight, sd[f"base_model.model.{name}.lora_B.default.weight"])


def test_pissa_niter_is_deterministic_and_leaves_the_global_rng_alone():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4, generator=gen) @ torch.diag(torch.tensor([10.0, 8.0, 6.0, 4.0])) @ torch.randn(
        4, 24, generator=gen) + 0.01 * torch.randn(32, 24, generator=gen)
    state = torch.get_rng_state()
    a1, b1 = base_init.pissa(w, r=4, scaling=2.0, niter=2)
    assert torch.equal(torch.get_rng_state(), state)
    a2, b2 = base_init.pissa(w, r=4, scaling=2.0, niter=2)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    full_a, full_b = base_init.pissa(w, r=4, scaling=2.0)
    torch.testing.assert_close(b1 @ a1, full_b @ full_a, atol=1e-3, rtol=0)  # the same principal part


# ------------------------------------------------------------------------------------------------ PEFT parity
@pytest.mark.parametrize("init, arch", [("pissa", "llama"), ("pissa_niter_4", "llama"), ("olora", "llama"),
                                        ("pissa", "gpt2"), ("pissa_niter_4", "gpt2")])
def test_parity_with_peft_after_10_adamw_steps(init, arch):
    """Identical tensors (PEFT's own init is bit-identical for pissa/olora; for pissa_niter, whose random start
    differs, ours are copied into PEFT's model), then 10 AdamW steps each. PEFT's OLoRA does not run on Conv1D."""
    factory, targets = MODELS[arch]
    ours = factory()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets, init=init))
    torch.manual_seed(0)
    pm = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    sd = pm.state_dict()
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            key = f"base_model.model.{name}"
            sd[f"{key}.base_layer.weight"].copy_(layer.weight)
            sd[f"{key}.lora_A.default.weight"].copy_(layer.lora_A.weight)
            sd[f"{key}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    assert (logits(ours) - logits(pm)).abs().max().item() <= 1e-5
    train(ours)
    train(pm, params=[p for p in pm.parameters() if p.requires_grad])
    assert (logits(ours) - logits(pm)).abs().max().item() <= 1e-5
    assert (logits(ours) - logits(factory())).abs().max().item() > 1e-2  # training did something


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("variant", ["pissa", "olora-gpt2", "pissa_niter-rslora-patterns", "pissa-dora"])
def test_save_adapter_is_a_plain_lora_delta_for_the_original_base(tmp_path, variant):
    arch = "gpt2" if "gpt2" in variant else "llama"
    factory, targets = MODELS[arch]
    init = {"pissa": "pissa", "olora-gpt2": "olora", "pissa_niter-rslora-patterns": "pissa_niter_4",
            "pissa-dora": "pissa"}[variant]
    kwargs: dict = {}
    if "patterns" in variant:
        kwargs = {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}
    model = factory()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets, init=init, use_dora="dora" in variant,
                                  **kwargs))
    train(model, steps=5)
    trained = logits(model)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    if "rslora" in variant:
        assert cfg["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
        assert cfg["rank_pattern"] == {"v_proj": 4} and cfg["alpha_pattern"] == {"down_proj": pytest.approx(3 * 2 ** 0.5)}
    else:
        assert cfg["lora_alpha"] == 16
    for loaded in (PeftModel.from_pretrained(factory(), str(tmp_path / "a")).eval(), factory()):
        if not isinstance(loaded, PeftModel):
            load_adapter(loaded, tmp_path / "a")
            assert all(getattr(layer, "lora_init_A", None) is None for _, layer in lora_layers(loaded))
        assert (logits(loaded) - trained).abs().max().item() <= 1e-4


def test_peft_converted_pissa_loads_and_unconverted_is_refused(tmp_path):
    factory, targets = MODELS["llama"]
    pm = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain LoRA
    pm.save_pretrained(str(tmp_path / "initial"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    train(pm, steps=5, params=[p for p in pm.parameters() if p.requires_grad])
    trained = logits(pm)
    pm.save_pretrained(str(tmp_path / "raw"))
    pm.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8
    model = factory()
    load_adapter(model, tmp_path / "converted")
    assert (logits(model) - trained).abs().max().item() <= 1e-4
    base = factory()
    with pytest.raises(UnsupportedAdapterError, match=r"init_lora_weights='pissa'.*changes the base weights.*"
                                                      r"path_initial_model_for_weight_conversion"):
        load_adapter(base, tmp_path / "raw")
    assert not list(lora_layers(base))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_holds_initial_adapters_and_loads_and_exports_for_the_original_base(tmp_path):
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, init="pissa", merge_on_fit_end=False)], tmp_path, max_steps=3)
    path = tmp_path / "p.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    q = "model.model.layers.0.self_attn.q_proj"
    assert sorted(k for k in ckpt["state_dict"] if k.startswith(q)) == [
        f"{q}.lora_A.weight", f"{q}.lora_B.weight", f"{q}.lora_init_A", f"{q}.lora_init_B"]
    assert ckpt["lightning_lora"]["config"]["init"] == "pissa"
    module.model.eval()
    trained = logits(module.model)
    fresh = make_tiny_llama()  # the original base: the checkpoint's residual is rebuilt from it
    load_adapter(fresh, path)
    assert torch.equal(logits(fresh), trained)
    checkpoint_to_peft(path, tmp_path / "exported", base_model_name_or_path=None)
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["r"] == 8
    pm = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "exported")).eval()
    assert (logits(pm) - trained).abs().max().item() <= 1e-4


@pytest.mark.parametrize("options", [{"init": "pissa_niter_2"}, {"use_dora": True}, {"use_dora": True, "init": "olora"}],
                         ids=["pissa_niter", "dora", "dora-olora"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, options):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callback():
        return LoRA(r=4, merge_on_fit_end=False, **options)

    full = TinyLlamaModule(scheduler=True)
    fit(full, [callback()], tmp_path / "full", max_steps=-1, max_epochs=2)
    first = TinyLlamaModule(scheduler=True)
    fit(first, [callback(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], tmp_path / "a",
        max_steps=-1, max_epochs=1, enable_checkpointing=True)
    resumed = TinyLlamaModule(scheduler=True)
    trainer = fit(resumed, [callback()], tmp_path / "b", max_steps=-1, max_epochs=2,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full.state_dict()[k], v) for k, v in resumed.state_dict().items())


def test_initial_adapters_of_another_run_rebuild_the_residual(monkeypatch):
    """A0, B0 computed elsewhere (another device, another SVD) replace ours: the base becomes their residual."""
    factory, targets = MODELS["llama"]
    config = LoRAConfig(r=4, alpha=8, target_modules=targets, init="pissa_niter_1")
    trained_model = factory()
    inject_lora(trained_model, config)
    train(trained_model, steps=5)
    trained, state = logits(trained_model), lora_state_dict(trained_model)
    monkeypatch.setattr(base_init, "SVD_LOWRANK_SEED", 123)  # a different random start: other A0, B0
    for load in ("load_lora_state_dict", "module.load_state_dict"):
        model = factory()
        inject_lora(model, config)
        first = next(layer for _, layer in lora_layers(model))
        assert not torch.allclose(first.lora_init_B, state["model.layers.0.self_attn.q_proj.lora_init_B"], atol=1e-2)
        if load == "load_lora_state_dict":
            load_lora_state_dict(model, state)
        else:
            assert model.load_state_dict(state, strict=False).unexpected_keys == []
        assert (logits(model) - trained).abs().max().item() <= 1e-5
        torch.testing.assert_close(first.lora_init_B, state["model.layers.0.self_attn.q_proj.lora_init_B"])


# ------------------------------------------------------------------------------------------------ model operations
# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "PiSSA", "loftq", 3])
def test_bad_init_names(init):
    with pytest.raises(LoRAConfigError, match=r"init=.* is invalid; expected one of gaussian, kaiming, pissa, "
                                              r"pissa_niter_N, olora"):
        LoRAConfig(init=init)


def test_embedding_and_quantized_and_too_large_rank_are_refused():
    model = make_tiny_llama()
    with pytest.raises(LoRAConfigError, match=r"init='olora' cannot adapt the embedding\(s\) \['model.embed_tokens'\]"):
        inject_lora(model, LoRAConfig(target_modules=["embed_tokens", "q_proj"], init="olora"))
    assert not list(lora_layers(model))
    q = nn.Sequential()
    q.add_module("q_proj", nn.Linear(4, 4))
    q.q_proj.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(LoRAError, match=r"init='pissa' needs a floating-point base weight, got torch.int8.*quantized"):
        inject_lora(q, LoRAConfig(r=2, target_modules=["q_proj"], init="pissa"))
    with pytest.raises(LoRAError, match=r"init='pissa' with r=6 needs r <= min\(out, in\) = 4 for the weight of 0 "
                                        r"\(shape \(8, 4\)\); lower r, or give this module a smaller rank with rank_pattern"):
        inject_lora(nn.Sequential(nn.Linear(4, 8)), LoRAConfig(r=6, target_modules=["0"], init="pissa"))


def test_pissa_with_a_quantized_base_config_is_an_error():
    LoRAConfig(init="pissa")
    LoRAConfig(quantize_base="nf4")
    for init in ("pissa", "pissa_niter_4", "olora"):
        with pytest.raises(LoRAConfigError, match=rf"init='{init}' cannot be combined with quantize_base='nf4': that "
                                                  "initialisation changes the base weights"):
            LoRAConfig(init=init, quantize_base="nf4")


@pytest.mark.integration
def test_smollm2_step0_and_peft_init(smollm2, smollm2_path):
    """SmolLM2: step 0 within float error of the base (W_res is rounded to float32 once per layer, as in PEFT:
    with r=16 on every linear layer and the full SVD, 7.3e-5 on logits of magnitude ~30 for both), and our
    q/v PiSSA bit-identical to PEFT's."""
    from lightning_lora.hub import load_causal_lm

    ids = torch.tensor([[1, 422, 1034, 314, 253, 1670, 30, 2]])
    with torch.no_grad():
        reference = smollm2(ids).logits
    every_linear = load_causal_lm(smollm2_path).eval()
    inject_lora(every_linear, LoRAConfig(r=16, alpha=32, target_modules="all-linear", init="pissa_niter_4"))
    with torch.no_grad():
        assert (every_linear(ids).logits - reference).abs().max().item() <= 2e-4
    inject_lora(smollm2, LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"], init="pissa"))
    with torch.no_grad():
        assert (smollm2(ids).logits - reference).abs().max().item() <= 1e-4
    pm = get_peft_model(load_causal_lm(smollm2_path).eval(),
                        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    sd = pm.state_dict()
    for name, layer in lora_layers(smollm2):
        assert torch.equal(layer.weight, sd[f"base_model.model.{name}.base_layer.weight"])
        assert torch.equal(layer.lora_A.weight, sd[f"base_model.model.{name}.lora_A.default.weight"])


def test_mixin_load_from_checkpoint_with_pissa_and_dora(tmp_path):
    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, init="olora", use_dora=True, merge_on_fit_end=False)], tmp_path, max_steps=3)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = TinyLlamaModule.load_from_checkpoint(tmp_path / "m.ckpt")
    module.eval()
    loaded.eval()
    assert torch.equal(logits(loaded.model), logits(module.model))
    assert torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight,
                       module.model.model.layers[0].self_attn.q_proj.weight)  # the same residual base
