"""Issue 22: `target_parameters`: LoRA on plain nn.Parameters named by path suffix, as PEFT 0.21's `ParamWrapper`.

A 3-D parameter of E experts gets one rank-r delta per expert, stored PEFT's way: A (r*E, in) with expert e's rows
at e*r:(e+1)*r, B (out, r*E) with expert e's columns at e, E+e, 2E+e, ... (B.reshape(out, r, E)[:, :, e]).
(E, out, in) parameters (Qwen3-MoE, no `is_transposed`) take delta[e] = s * B_e A_e, (E, in, out) parameters
(GPT-OSS, `is_transposed=True`) take its transpose. A 2-D parameter (out, in) is one Linear-like delta.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from peft_parity import (
    ATOL,
    LoraConfig,
    PeftModel,
    adapter_shapes,
    check_lifecycle,
    check_peft_parity,
    check_step0,
    peft_file_tensors,
    randomize_ours,
)
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAError,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    save_adapter,
)

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))


def qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, pad_token_id=0)).eval()


def gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    return GptOssForCausalLM(GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2, max_position_embeddings=32, pad_token_id=0)).eval()


MODELS = {"qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}


def run(model) -> torch.Tensor:
    return model(IDS).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_expert_adapters_have_peft_shapes_and_start_exact(name):
    config = LoRAConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = check_step0(MODELS[name], run, config)
    shapes = adapter_shapes(model)
    experts = {k: v for k, v in shapes.items() if ".experts." in k}
    # 2 layers x 2 parameters x (A, B); E=4, r=2, hidden 16, expert intermediate 8
    assert len(experts) == 8
    assert sorted(set(experts.values())) == sorted({(8, 16), (16, 8), (8, 8)})
    assert sum(".q_proj." in k for k in shapes) == 4


@pytest.mark.parametrize("name", list(MODELS))
def test_expert_adapters_lifecycle(name):
    check_lifecycle(MODELS[name], run, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("targets", [EXPERTS, ["experts.down_proj"]])
def test_expert_adapters_match_peft_both_ways(tmp_path, name, targets):
    check_peft_parity(tmp_path, MODELS[name], run,
                      LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets),
                      LoRAConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=targets), lr=0.2)


def test_target_parameters_alone_with_empty_target_modules(tmp_path):
    """PEFT writes `target_modules: []` next to `target_parameters`; the same config works here."""
    config = LoRAConfig(r=2, alpha=4, target_modules=[], target_parameters=EXPERTS)
    check_step0(gpt_oss, run, config)
    check_peft_parity(tmp_path, gpt_oss, run, LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS), config,
                      lr=0.2)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(EXPERTS)


def test_two_dimensional_parameter(tmp_path):
    """A 2-D parameter read functionally (GPT-OSS's router weight, F.linear(x, self.weight)): a Linear-like delta."""
    config = LoRAConfig(r=2, alpha=4, target_modules=[], target_parameters=["mlp.router.weight"])
    model = check_step0(gpt_oss, run, config)
    assert sorted(set(adapter_shapes(model).values())) == [(2, 16), (4, 2)]
    check_peft_parity(tmp_path, gpt_oss, run, LoraConfig(r=2, lora_alpha=4, target_parameters=["mlp.router.weight"]),
                      config, lr=0.2)


@pytest.mark.parametrize("name, out_in", [("qwen3_moe", True), ("gpt_oss", False)])
def test_merged_expert_weight_is_one_delta_per_expert_in_peft_layout(tmp_path, name, out_in):
    factory = MODELS[name]
    model = factory()
    inject_lora(model, LoRAConfig(r=2, alpha=6, target_modules=[], target_parameters=["layers.0.mlp.experts.down_proj"]))
    randomize_ours(model)
    save_adapter(model, tmp_path / "ad")
    files = peft_file_tensors(tmp_path / "ad")
    (a,) = [v for k, v in files.items() if k.endswith("lora_A.weight")]
    (b,) = [v for k, v in files.items() if k.endswith("lora_B.weight")]
    E, r = 4, 2
    with torch.no_grad():
        adapted = run(model)
        w0 = factory().model.layers[0].mlp.experts.down_proj.detach()
        merged = merge_and_unload(model)
        w1 = merged.model.layers[0].mlp.experts.down_proj
        for e in range(E):
            delta = 3.0 * b.reshape(b.shape[0], r, E)[:, :, e] @ a[e * r:(e + 1) * r]
            torch.testing.assert_close(w1[e] - w0[e], delta if out_in else delta.T, atol=ATOL, rtol=0)
        torch.testing.assert_close(run(merged), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(dropout=0.1), r"dropout=0.1.*target_parameters"),
    (dict(use_dora=True), r"use_dora.*target_parameters|DoRA.*target_parameters"),
    (dict(target_parameters=["mlp.experts.no_such_proj"]), r"target_parameters=.*no_such_proj.*matched no parameter"),
    (dict(target_parameters=["input_layernorm.weight"]), r"input_layernorm.weight.*1-D|1 dimension"),
    (dict(target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"]),
     r"q_proj.*both target_modules and target_parameters"),
])
def test_refusals_are_clear(options, message):
    kwargs = dict(r=2, target_modules=[], target_parameters=EXPERTS)
    kwargs.update(options)
    model = qwen3_moe()
    reference = run(model).detach()
    with pytest.raises(LoRAError, match=message):
        inject_lora(model, LoRAConfig(**kwargs))
    assert not any(".lora_" in k for k in model.state_dict())
    assert torch.equal(run(model), reference)


class MoELM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = qwen3_moe()
        self.losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-2)


def trainer(tmp_path, max_steps: int, callback: LoRA) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                     accelerator="cpu", devices=1)


def test_moe_lm_trains_expert_adapters_through_the_callback(tmp_path):
    """A tiny Qwen3-MoE trained a few steps with adapters on q/v and on both expert tensors: loss falls, the
    adapter-only checkpoint holds no base weight, a resume runs, PEFT loads the export, merged == adapted."""
    ids = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=4)
    lora = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    module = MoELM()
    t = trainer(tmp_path, 10, LoRA(merge_on_fit_end=False, adapter_dir=str(tmp_path / "adapter"), **lora))
    t.fit(module, loader)
    assert module.losses[-1] < module.losses[0] - 0.1
    assert all(p.requires_grad == (".lora_" in n) for n, p in module.named_parameters())

    t.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert saved and all(".lora_" in k for k in saved)
    assert sum(".experts." in k for k in saved) == 8

    resumed = MoELM()
    trainer(tmp_path, 12, LoRA(merge_on_fit_end=False, **lora)).fit(resumed, loader, ckpt_path=tmp_path / "last.ckpt")
    assert len(resumed.losses) == 2

    with torch.no_grad():
        adapted = module(ids)
        pm = PeftModel.from_pretrained(qwen3_moe(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(pm(ids).logits, adapted, atol=ATOL, rtol=0)
        loaded = qwen3_moe()
        load_adapter(loaded, tmp_path / "adapter")
        torch.testing.assert_close(loaded(ids).logits, adapted, atol=ATOL, rtol=0)
        assert set(lora_state_dict(loaded)) == {k.removeprefix("model.") for k in saved}
        merged = merge_and_unload(module)
        torch.testing.assert_close(merged(ids), adapted, atol=ATOL, rtol=0)


def test_fsdp_is_refused_at_setup():
    """Under FSDP2 (`shard_lora_model`, what ModelParallelStrategy's setup runs) and FSDP1 (`prepare_fsdp1`, before
    FSDPStrategy wraps anything) parameter adapters are refused with one clear error, before any process group."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_lora.fsdp import shard_lora_model
    from lightning_lora.strategies import prepare_fsdp1

    config = LoRAConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS)
    message = (r"^model.layers.0.mlp.experts.lora.gate_up_proj \(\w+\): target_parameters is not supported under FSDP "
               r"\(ModelParallelStrategy / FSDPStrategy\) yet: the adapter builds W \+ delta")
    with pytest.raises(LoRAError, match=message):
        shard_lora_model(qwen3_moe(), config=config)
    model = qwen3_moe()
    inject_lora(model, config)
    with pytest.raises(LoRAError, match=message):
        prepare_fsdp1(FSDPStrategy(), model)


def test_estimate_counts_expert_adapters_and_their_effective_weights(tmp_path, capsys):
    """r*E*(in + out) adapter parameters per expert stack, and the W + delta copies the forward keeps."""
    from transformers import Qwen3MoeConfig

    from lightning_lora.cli import main
    from lightning_lora.estimate import estimate_memory

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    plain = estimate_memory(config, r=8, target_modules=["q_proj"], seq_len=16)
    est = estimate_memory(config, r=8, target_modules=["q_proj"], target_parameters=EXPERTS, seq_len=16)
    # per layer: gate_up (4, 16, 16) -> 8*4*(16+16); down (4, 16, 8) -> 8*4*(8+16)
    assert est.lora.trainable_params - plain.lora.trainable_params == 2 * (8 * 4 * 32 + 8 * 4 * 24)
    # bf16 W + delta of both stacks in both layers kept for backward, plus the gradient of the largest
    assert est.lora.effective_weights == 2 * (4 * 16 * 16 + 4 * 16 * 8) * 2 + 4 * 16 * 16 * 2
    assert plain.lora.effective_weights == 0
    assert est.lora.activations - plain.lora.activations == est.lora.effective_weights
    checkpointed = estimate_memory(config, r=8, target_modules=["q_proj"], target_parameters=EXPERTS, seq_len=16,
                                   gradient_checkpointing=True)
    assert checkpointed.lora.effective_weights == (4 * 16 * 16 + 4 * 16 * 8) * 2 + 4 * 16 * 16 * 2
    assert any("W + delta" in note for note in est.notes)
    assert {row.name for row in est.modules} >= {"gate_up_proj", "down_proj", "q_proj"}

    config.save_pretrained(tmp_path / "moe")
    argv = ["estimate", "--model", str(tmp_path / "moe"), "--target-modules", "q_proj", "--seq-len", "16",
            "--target-parameters", *EXPERTS]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "W + delta (target_parameters)" in out and f"{est.lora.trainable_params:,}" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["target_parameters"] == EXPERTS


def test_config_options_and_quantized_owner_are_refused():
    from collections import OrderedDict

    from torch import nn

    from lightning_lora import LoRAConfigError

    with pytest.raises(LoRAConfigError, match="target_parameters=.*list of parameter names"):
        LoRAConfig(target_parameters="mlp.experts.down_proj")
    with pytest.raises(LoRAConfigError, match="init='pissa' cannot be combined with target_parameters"):
        LoRAConfig(target_modules=[], target_parameters=EXPERTS, init="pissa")
    with pytest.raises(LoRAConfigError, match="target_modules is empty"):
        LoRAConfig(target_modules=[], target_parameters=[])
    config = LoRAConfig(target_modules=[], target_parameters=EXPERTS)
    assert LoRAConfig.from_dict(config.to_dict()) == config

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), act=nn.ReLU(), fc2=nn.Linear(64, 64)))
    x = torch.randn(2, 64)
    reference = model(x).detach()
    with pytest.raises(LoRAError, match="fc1.weight|Linear.weight.*quantize"):
        inject_lora(model, LoRAConfig(r=2, target_modules=[], target_parameters=["fc1.weight"], quantize_base="nf4"))
    assert type(model.fc1) is nn.Linear and type(model.fc1.weight) is nn.Parameter
    assert torch.equal(model(x), reference)
    # a dense Linear weight works as PEFT's ParamWrapper does (one delta, no dropout)
    inject_lora(model, LoRAConfig(r=2, target_modules=[], target_parameters=["fc1.weight"]))
    assert torch.equal(model(x), reference) and type(model.fc1).__name__ == "LoRAParameterHost"
    assert model.fc1.in_features == 64 and isinstance(model.fc1.owner, nn.Linear)
