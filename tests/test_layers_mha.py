"""Issue 22: LoRA on nn.MultiheadAttention as a module, as PEFT 0.21's `lora.MultiheadAttention` does it.

One adapter on the packed in-projection (A: r x E, B: 3E x r, delta added to `in_proj_weight`) and one on
`out_proj` (A: r x E, B: E x r); PEFT's files hold them as `<mha>.lora_A.weight` and
`<mha>.base_layer.out_proj.lora_A.weight`. `all-linear` adapts the attention module instead of refusing its
`out_proj`.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

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
    peft_mha_backward_fixed,
    peft_mha_backward_misses_out_proj_delta,
    randomize_ours,
)
from torch import nn
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

E = 16


class AttnNet(nn.Module):
    """Self-attention followed by a Linear head."""

    def __init__(self, **mha) -> None:
        super().__init__()
        kw = dict(batch_first=True)
        kw.update(mha)
        self.attn = nn.MultiheadAttention(E, 2, **kw)
        self.head = nn.Linear(E, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.attn.batch_first:
            x = x.transpose(0, 1)
        out, weights = self.attn(x, x, x, need_weights=True)
        if not self.attn.batch_first:
            out = out.transpose(0, 1)
        # contiguous: on a non-contiguous 3-D input torch's matmul folds the batch dimensions only when the weight
        # requires grad, so the head (frozen by inject_lora, not adapted) would differ from the base's in the last
        # bit for a reason that has nothing to do with the adapters
        out = out.contiguous()
        return torch.cat([self.head(out).flatten(1), weights.flatten(1)], dim=1)


def attn_net(seed: int = 0, **mha) -> nn.Module:
    torch.manual_seed(seed)
    return AttnNet(**mha).eval()


X = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(3))


def run(model: nn.Module) -> torch.Tensor:
    return model(X)


MHA_CASES = [dict(), dict(batch_first=False), dict(bias=False), dict(add_bias_kv=True)]


@pytest.fixture
def peft_mha_fixed():
    """PEFT's `lora.MultiheadAttention` with the gradients of its own forward (see
    `peft_parity.peft_mha_backward_fixed`)."""
    with peft_mha_backward_fixed():
        yield


def test_peft_mha_backward_bug_is_known():
    """Documents why `peft_mha_fixed` exists; when PEFT is fixed this fails: drop the fixture then."""
    assert peft_mha_backward_misses_out_proj_delta()


def test_peft_before_0_22_files_count_the_out_proj_delta_twice(tmp_path):
    """PEFT < 0.22 applied an attention's out_proj delta twice; PEFT >= 0.22 doubles out_proj's lora_B of such a file
    (no `peft_version`, or a release before 0.22.0) when it loads it, and so do we: both give the same outputs. Our
    own files say `peft_version` 0.22.0 (the delta counted once)."""
    model = attn_net()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["attn"]))
    randomize_ours(model)
    save_adapter(model, tmp_path / "new")
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["peft_version"] == "0.22.0"
    for name, version in (("old", "0.21.2"), ("unversioned", None)):
        shutil.copytree(tmp_path / "new", tmp_path / name)
        edited = {k: v for k, v in config.items() if k != "peft_version"} | ({"peft_version": version} if version else {})
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(edited))
        ours = attn_net()
        load_adapter(ours, tmp_path / name)
        torch.testing.assert_close(ours.attn.out_proj.lora_B.weight, 2 * model.attn.out_proj.lora_B.weight)
        torch.testing.assert_close(ours.attn.lora_B.weight, model.attn.lora_B.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = PeftModel.from_pretrained(attn_net(), str(tmp_path / name)).eval()
        x = torch.randn(2, 5, E)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mha", MHA_CASES)
def test_mha_step0_shapes_and_lifecycle(mha):
    config = LoRAConfig(r=4, alpha=8, target_modules=["attn"])
    model = check_step0(lambda: attn_net(**mha), run, config)
    assert sorted(adapter_shapes(model).values()) == sorted([(4, E), (3 * E, 4), (4, E), (E, 4)])
    check_lifecycle(lambda: attn_net(**mha), run, config)


@pytest.mark.parametrize("mha", MHA_CASES[:3])
@pytest.mark.parametrize("options", [dict(), dict(use_rslora=True), dict(bias="all")])
def test_mha_matches_peft_both_ways(tmp_path, mha, options, peft_mha_fixed):
    check_peft_parity(tmp_path, lambda: attn_net(**mha), run,
                      LoraConfig(r=4, lora_alpha=8, target_modules=["attn"], **options),
                      LoRAConfig(r=4, alpha=8, target_modules=["attn"], **options))


def test_mha_in_projection_gradient_reaches_A_and_B():
    model = attn_net()
    inject_lora(model, LoRAConfig(r=4, target_modules=["attn"]))
    randomize_ours(model)
    model(X).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def encoder_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True)


def test_all_linear_adapts_the_attention_module():
    """`all-linear` on a model holding an nn.MultiheadAttention adapts the attention module (in- and
    out-projection) and the Linear layers, instead of refusing `self_attn.out_proj`."""
    model = encoder_layer()
    names = inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    assert sorted(names) == ["linear1", "linear2", "self_attn"]
    model = encoder_layer()
    assert inject_lora(model, LoRAConfig(r=4, target_modules=["self_attn"])) == ["self_attn"]


def test_targeting_out_proj_alone_names_the_attention_module():
    """`out_proj` cannot take an adapter of its own (its parent reads `out_proj.weight`); the error says to name
    the attention module instead."""
    with pytest.raises(LoRAError, match=r"['\"]self_attn['\"]"):
        inject_lora(encoder_layer(), LoRAConfig(r=4, target_modules=["out_proj"]))


def test_mha_with_separate_kdim_vdim_is_a_clear_error():
    with pytest.raises(LoRAError, match=r"kdim|vdim"):
        inject_lora(attn_net(kdim=8, vdim=8), LoRAConfig(r=4, target_modules=["attn"]))


def test_mha_refuses_dora():
    with pytest.raises(LoRAError, match=r"DoRA|use_dora"):
        inject_lora(attn_net(), LoRAConfig(r=4, target_modules=["attn"], use_dora=True))


def transformer_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_transformer_encoder_matches_peft(tmp_path, peft_mha_fixed):
    """nn.TransformerEncoder (train mode: PEFT's adapters are bypassed by the fused eval fast path)."""
    factory = lambda: transformer_encoder().train()  # noqa: E731
    targets = ["self_attn", "linear1", "linear2"]
    config = LoRAConfig(r=4, alpha=8, target_modules=targets)
    check_step0(factory, run, config)
    check_lifecycle(factory, run, config)
    check_peft_parity(tmp_path, factory, run, LoraConfig(r=4, lora_alpha=8, target_modules=targets), config)


@pytest.mark.parametrize("targets", [["self_attn"], ["linear1"], "all-linear"])
def test_eval_fast_path_does_not_bypass_adapters(targets):
    """In eval mode without gradients nn.TransformerEncoderLayer runs a fused kernel that reads
    `self_attn.in_proj_weight`, `out_proj.weight` and `linear1.weight` directly; an adapted layer must not take
    it (PEFT 0.21 silently returns the base model's output there)."""
    model = transformer_encoder().eval()
    inject_lora(model, LoRAConfig(r=4, target_modules=targets))
    randomize_ours(model)
    model.train()
    with torch.no_grad():
        adapted = model(X)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), adapted, atol=ATOL, rtol=0)
        merged = merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(merged(X), adapted, atol=ATOL, rtol=0)


class EncoderRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = transformer_encoder()
        self.head = nn.Linear(E, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self(x) - y).square().mean()
        self.log("loss", loss)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def test_transformer_encoder_trains_through_the_callback(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 5, E, generator=gen), torch.randn(8, 5, generator=gen))
    module = EncoderRegressor()
    module.losses = []
    trainer = L.Trainer(max_steps=12, callbacks=[LoRA(r=4, alpha=8, target_modules="all-linear",
                                                      merge_on_fit_end=False)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert module.losses[-1] < 0.7 * module.losses[0]
    x = data.tensors[0]
    module.train()  # compare outside the fused eval path
    with torch.no_grad():
        adapted = module(x)
        merged = merge_and_unload(module)
        torch.testing.assert_close(merged(x), adapted, atol=ATOL, rtol=0)


def test_mha_adapters_are_refused_under_fsdp():
    """FSDP (ModelParallelStrategy's FSDP2 plan, FSDPStrategy's FSDP1) is refused at setup, before any process
    group is needed: the attention reads its weights and adapters directly, outside FSDP's gathering hooks."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_lora.fsdp import shard_lora_model
    from lightning_lora.strategies import prepare_fsdp1

    message = (r"^attn \(MultiheadAttention\): MultiheadAttention adapters are not supported under FSDP "
               r"\(ModelParallelStrategy / FSDPStrategy\) yet: .*Train on one device or with DDP")
    with pytest.raises(LoRAError, match=message):
        shard_lora_model(attn_net(), config=LoRAConfig(r=4, target_modules=["attn"]))
    model = attn_net()
    inject_lora(model, LoRAConfig(r=4, target_modules=["attn"]))
    with pytest.raises(LoRAError, match=message):
        prepare_fsdp1(FSDPStrategy(), model)


def test_parameter_table_counts_both_projections():
    """The parameter table (`parameter_summary`, the estimate's per-module rows) counts the in-projection's
    adapter (r * (E + 3E)) and out_proj's (r * 2E): 6 r E in all."""
    from lightning_lora import count_parameters, parameter_summary

    model = encoder_layer()
    inject_lora(model, LoRAConfig(r=4, target_modules=["self_attn"]))
    rows = {row.name: row for row in parameter_summary(model).rows}
    assert (rows["self_attn"].shape, rows["self_attn"].full, rows["self_attn"].lora) == ((3 * E, E), 3 * E * E,
                                                                                       4 * (E + 3 * E))
    assert (rows["out_proj"].shape, rows["out_proj"].full, rows["out_proj"].lora) == ((E, E), E * E, 4 * 2 * E)
    assert count_parameters(model)[0] == 6 * 4 * E
    assert "self_attn" in str(parameter_summary(model))


def test_mha_dropout_is_a_clear_error():
    with pytest.raises(LoRAError, match=r"dropout=0.1 has no effect on a MultiheadAttention adapter.*exclude"):
        inject_lora(attn_net(), LoRAConfig(r=4, target_modules=["attn"], dropout=0.1))
    model = encoder_layer()  # all-linear with dropout: the attention module is named as the way out
    with pytest.raises(LoRAError, match="dropout"):
        inject_lora(model, LoRAConfig(r=4, target_modules="all-linear", dropout=0.1))
    assert inject_lora(model, LoRAConfig(r=4, target_modules="all-linear", dropout=0.1,
                                         exclude_modules=["self_attn"])) == ["linear1", "linear2"]


def test_first_step_probe_counts_the_attention_as_run():
    """The callback's first-step check (`AdapterProbe`) watches the attention module, not its out_proj child
    (which never runs on its own: the attention reads its weight)."""
    from lightning_lora.surgery import AdapterProbe

    model = attn_net()
    inject_lora(model, LoRAConfig(r=4, target_modules=["attn"]))
    probe = AdapterProbe(model)
    model(X)
    assert probe.close() == []


def test_peft_key_translation_both_ways():
    from lightning_lora.peft_format.keys import from_peft_key

    assert from_peft_key("base_model.model.attn.base_layer.out_proj.lora_A.weight") == "attn.out_proj.lora_A.weight"
    assert from_peft_key("base_model.model.attn.base_layer.out_proj.base_layer.bias") == "attn.out_proj.bias"
    assert from_peft_key("base_model.model.attn.lora_B.default.weight") == "attn.lora_B.weight"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("targets", [["self_attn"], "all-linear"])
def test_eval_with_padding_mask_runs_the_adapters_on_nested_tensors(targets):
    """nn.TransformerEncoder (enable_nested_tensor, the default) turns a padded batch into a nested tensor in eval
    mode without gradients; the adapters run on it and compute what they compute in train mode."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    inject_lora(model, LoRAConfig(r=4, target_modules=targets))
    randomize_ours(model)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    model.train()
    with torch.no_grad():
        adapted = model(X, src_key_padding_mask=mask)
    model.eval()
    with torch.no_grad():
        out = model(X, src_key_padding_mask=mask)
    torch.testing.assert_close(out[0], adapted[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :3], adapted[1, :3], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mha", MHA_CASES)
def test_mha_step0_bit_exact_in_inference_mode(mha):
    """`torch.inference_mode` (Lightning's validation and prediction) gives the base's bits too."""
    base, model = attn_net(**mha), attn_net(**mha)
    inject_lora(model, LoRAConfig(r=4, target_modules=["attn"]))
    with torch.inference_mode():
        assert torch.equal(model(X), base(X))


def test_checkpoint_to_peft_from_keys_alone_refuses_the_nested_out_proj(tmp_path):
    """Without the base architecture an adapter-only checkpoint's keys cannot tell an attention's out_proj (PEFT:
    inside its parent's base_layer) from a Linear: the conversion asks for the base model instead of guessing."""
    from lightning_lora import AdapterFormatError
    from lightning_lora.peft_format import checkpoint_to_peft

    module = nn.Module()
    module.model = attn_net()
    config = LoRAConfig(r=4, target_modules=["attn"])
    inject_lora(module, config)
    torch.save({"epoch": 1, "global_step": 3, "state_dict": lora_state_dict(module),
                "lightning_lora": {"version": 1, "config": config.to_dict(), "model_prefix": "model",
                                   "base_model_name_or_path": None, "task_type": None}}, tmp_path / "a.ckpt")
    with pytest.raises(AdapterFormatError, match=r"'attn.out_proj' sits inside another adapted module.*--base-model"):
        checkpoint_to_peft(tmp_path / "a.ckpt", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
