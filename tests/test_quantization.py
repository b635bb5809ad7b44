"""QLoRA (issue 15): an NF4 base through torchao (`quantize_base="nf4"`) and bitsandbytes-quantized
models as targets; do no harm bit for bit, byte counts, casts, merge bounds, checkpoints, PEFT files,
and the errors a user can cause."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama, randomize_lora_B
from lightning.pytorch import Callback
from torch import nn

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    unload,
    unmerge_adapter,
    unmerge_and_reinject,
)
from lightning_lora.quantization import (
    LoRALinear4bit,
    LoRALinear8bitLt,
    LoRANF4Linear,
    MissingDependencyError,
    NF4Linear,
    QuantizationError,
    bitsandbytes,
    dequantize_bnb_linear,
    dequantize_nf4,
    host_init_context,
    is_quantized_module,
    merge_dtype,
    modules_to_quantize,
    nf4_bytes,
    nf4_linear,
    quantize_base_modules,
    quantized_weight_bytes,
    scaler_block_size,
    torchao_nf4,
)
from lightning_lora.surgery import find_target_modules, lora_layers, output_head_names

QV = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize_base="nf4", quantize_base_modules="adapted")
ALL = LoRAConfig(r=4, target_modules="all-linear", quantize_base="nf4")


def tokens(n: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def quantized_twin(config: LoRAConfig) -> nn.Module:
    """The same tiny Llama with the same layers in NF4, and no adapters."""
    model = make_tiny_llama()
    quantize_base_modules(model, config, find_target_modules(model, config), heads=sorted(output_head_names(model)))
    return model


def quantized_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_quantized_module(m)]


# ============================================================================ config
def test_config_fields_validate_with_clear_messages():
    assert LoRAConfig(quantize_base="NF4").quantize_base == "nf4"
    assert LoRAConfig().quantize_base is None and LoRAConfig().quantize_base_modules is None
    # QLoRA's default: the whole frozen base in 4 bits (every Linear but the head and modules_to_save)
    assert LoRAConfig(quantize_base="nf4").quantize_base_modules == "all-linear"
    assert LoRAConfig(quantize_base="nf4", quantize_base_modules="adapted").quantize_base_modules == "adapted"
    # configs written before the default changed said "adapted" without quantize_base: still "no quantization"
    assert LoRAConfig.from_dict({**LoRAConfig().to_dict(), "quantize_base_modules": "adapted"}) == LoRAConfig()
    cases = [
        (dict(quantize_base="int4"),
         "quantize_base='int4' is invalid; expected one of 'nf4' or None (keep the base as it is)."),
        (dict(quantize_base="nf4", quantize_base_modules="everything"),
         "quantize_base_modules='everything' is invalid; expected 'adapted' or 'all-linear'."),
        (dict(quantize_base_modules="all-linear"),
         "quantize_base_modules='all-linear' needs quantize_base; set quantize_base='nf4' as well, or drop "
         "quantize_base_modules."),
    ]
    for kwargs, message in cases:
        with pytest.raises(LoRAConfigError) as err:
            LoRAConfig(**kwargs)
        assert str(err.value) == message
    # a base-mutating init (PiSSA / OLoRA): refused together with a quantized base
    assert LoRAConfig(init="pissa").init == "pissa"
    with pytest.raises(LoRAConfigError) as err:
        LoRAConfig(init="pissa", quantize_base="nf4")
    assert str(err.value) == ("init='pissa' cannot be combined with quantize_base='nf4': that initialisation "
                              "changes the base weights, which a quantized base cannot hold exactly; use "
                              "init='gaussian' or 'kaiming', or drop quantize_base.")


def test_callback_takes_the_new_fields():
    cb = LoRA(r=4, quantize_base="nf4", quantize_base_modules="all-linear")
    assert (cb.config.quantize_base, cb.config.quantize_base_modules) == ("nf4", "all-linear")
    assert LoRAConfig.from_dict(cb.config.to_dict()) == cb.config
    # a config written before the fields existed reads as "no quantization"
    old = {k: v for k, v in LoRAConfig().to_dict().items() if not k.startswith("quantize_")}
    assert LoRAConfig.from_dict(old) == LoRAConfig()


# ============================================================================ NF4: bytes
def test_nf4_bytes_are_exact():
    # 64 x 64: 2048 bytes of codes, 64 int8 block scales, 1 float32 scale of those (64 blocks per
    # group), the float32 mean of the scales, the 16-entry float32 code book
    assert nf4_bytes(torchao_nf4().to_nf4(torch.randn(64, 64), 64, 64)) == 2048 + 64 + 4 + 4 + 64
    assert scaler_block_size(64 * 64) == 64 and scaler_block_size(4096 * 4096) == 256
    layer = NF4Linear.from_linear(nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16))
    # 8 MiB codes + 256 Ki scales + 1024 bf16 second-level scales + bf16 mean + bf16 code book
    assert quantized_weight_bytes(layer) == 8_388_608 + 262_144 + 2_048 + 2 + 32 == 8_652_834
    assert quantized_weight_bytes(layer) / (4096 * 4096 * 2) < 0.258


def test_tiny_llama_bytes_with_adapters_on_q_v():
    model = make_tiny_llama()
    inject_lora(model, QV)
    # q: 64 x 64, v: 32 x 64 (fp32 weights: 4-byte second-level scales, mean and code book), 2 layers
    q = 2048 + 64 + 4 + 4 + 64
    v = 1024 + 32 + 4 + 4 + 64
    assert quantized_weight_bytes(model) == 2 * (q + v) == 6624
    assert sum(isinstance(m, LoRANF4Linear) for m in model.modules()) == 4


# ============================================================================ NF4: do no harm, keys, forward
@pytest.mark.parametrize("config", [QV, ALL,
                                    LoRAConfig(r=4, target_modules=["q_proj"], quantize_base="nf4",
                                               quantize_base_modules="all-linear")],
                         ids=["qv", "all-linear", "q-adapted-all-quantized"])
def test_injection_changes_no_output_bit_of_the_quantized_model(config):
    model = make_tiny_llama()
    twin = quantized_twin(config)
    keys = list(model.state_dict())
    inject_lora(model, config)
    assert [k for k in model.state_dict() if ".lora_" not in k] == keys  # base keys unchanged, in order
    assert quantized_paths(model) == quantized_paths(twin)
    assert len(quantized_paths(model)) == (4 if config.target_modules != "all-linear" and
                                           config.quantize_base_modules == "adapted" else 14)
    x = tokens()
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(twin, mode)()
        with torch.no_grad():
            assert torch.equal(model(x).logits, twin(x).logits), mode
    assert type(model.lm_head) is nn.Linear  # the output head stays dense


def test_all_linear_quantizes_everything_but_the_head_and_modules_to_save():
    model = make_tiny_llama()
    cfg = LoRAConfig(r=4, target_modules=["q_proj"], quantize_base="nf4", quantize_base_modules="all-linear",
                     modules_to_save=["o_proj"])
    picked = modules_to_quantize(model, cfg, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
                                 heads=["lm_head"], saved=["model.layers.0.self_attn.o_proj",
                                                           "model.layers.1.self_attn.o_proj"])
    assert picked == [f"model.layers.{i}.{p}" for i in range(2) for p in
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                       "mlp.down_proj")]
    inject_lora(model, cfg)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert model.model.layers[0].self_attn.o_proj.weight.requires_grad  # trained fully, so kept dense


LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")


def test_default_is_the_whole_frozen_base_in_4_bits_in_config_and_callback():
    # issue 20 item 7: QLoRA means every linear layer but the output head, not only the adapted ones
    assert LoRA(r=4, quantize_base="nf4").config.quantize_base_modules == "all-linear"
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize_base="nf4"))
    assert quantized_paths(model) == [f"model.layers.{i}.{p}" for i in range(2) for p in LAYER_LINEARS]
    assert type(model.lm_head) is nn.Linear
    assert quantized_weight_bytes(model) == 2 * (2 * (2048 + 64 + 4 + 4 + 64) + 2 * (1024 + 32 + 4 + 4 + 64)
                                                 + 3 * (4096 + 128 + 4 + 4 + 64))


def test_all_linear_leaves_exclude_modules_dense():
    # issue 20 item 8: exclude_modules keeps a layer out of the adapters and out of the 4-bit base
    model = make_tiny_llama()
    cfg = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=["down_proj"], quantize_base="nf4")
    inject_lora(model, cfg)
    assert quantized_paths(model) == [f"model.layers.{i}.{p}" for i in range(2) for p in LAYER_LINEARS
                                      if p != "mlp.down_proj"]
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    # a regex, matched at the prefix the callback uses (the network at "model" inside a LightningModule)
    picked = modules_to_quantize(make_tiny_llama(), LoRAConfig(exclude_modules=r"model\.model\.layers\.1\..*",
                                                               quantize_base="nf4"), [], heads=["lm_head"],
                                 prefix="model")
    assert picked == [f"model.layers.0.{p}" for p in LAYER_LINEARS]
    # the advice of the error for a layer NF4 cannot hold works: excluding it quantizes the rest
    net = nn.Sequential()
    net.add_module("q_proj", nn.Linear(64, 64))
    net.add_module("odd", nn.Linear(10, 3))
    with pytest.raises(QuantizationError, match=r"odd has a torch.float32 weight of shape \(3, 10\).*leave that "
                                                r"layer out \(exclude_modules\)"):
        inject_lora(net, LoRAConfig(r=2, target_modules=["q_proj"], quantize_base="nf4"))
    inject_lora(net, LoRAConfig(r=2, target_modules=["q_proj"], exclude_modules=["odd"], quantize_base="nf4"))
    assert type(net.q_proj) is LoRANF4Linear and type(net.odd) is nn.Linear


def test_quantized_forward_is_the_dequantised_weight_reference():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    layer = LoRANF4Linear(NF4Linear.from_linear(lin), r=4, alpha=8)
    x = torch.randn(5, 256)
    dequantised = layer.weight.get_original_weight()
    # fp32: exactly the linear map with the dequantised weight (torchao adds the bias after the matmul)
    assert torch.equal(layer(x), F.linear(x, dequantised) + lin.bias)
    # bf16 compute: the weight is dequantised into the input's dtype, then the same linear
    layer.to(torch.bfloat16)
    xb = x.bfloat16()
    assert torch.equal(layer(xb), F.linear(xb, dequantised.bfloat16()) + lin.bias.bfloat16())
    # NF4's own error on a Gaussian weight: ||W - deq(W)|| / ||W|| (measured 0.092 here)
    err = ((dequantised - lin.weight).norm() / lin.weight.norm()).item()
    assert 0.08 < err < 0.10, err


@pytest.mark.parametrize("shape", [(64, 64), (576, 576), (192, 576), (1536, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantisation_and_linear_are_torchaos_bit_for_bit(shape, dtype):
    torch.manual_seed(0)
    w = torchao_nf4().to_nf4(torch.randn(shape).to(dtype), 64, scaler_block_size(shape[0] * shape[1]))
    assert torch.equal(dequantize_nf4(w), w.get_original_weight())
    assert torch.equal(dequantize_nf4(w, torch.bfloat16), w.get_original_weight().to(torch.bfloat16))
    # forward and backward against torchao's own F.linear on an NF4Tensor (linear_nf4 + bias)
    bias = torch.randn(shape[0], dtype=dtype)
    x1 = torch.randn(3, 5, shape[1], dtype=dtype, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = nf4_linear(x1, w, bias), F.linear(x2, w, bias)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


def test_module_casts_and_moves_keep_nf4_weights():
    model = make_tiny_llama()
    inject_lora(model, ALL)
    nf4_before = {n: p for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"}
    assert len(nf4_before) == 14
    model.to(torch.bfloat16)  # what Lightning's bf16-true does
    after = dict(model.named_parameters())
    assert all(after[n] is p and type(p).__name__ == "NF4Tensor" for n, p in nf4_before.items())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.dense_dtype is torch.bfloat16 and layer.lora_A.weight.dtype is torch.float32  # adapter_dtype
    assert model.model.norm.weight.dtype is torch.bfloat16
    with torch.no_grad():
        assert model(tokens()).logits.dtype is torch.bfloat16
    model.half()
    assert layer.dense_dtype is torch.float16 and type(layer.weight).__name__ == "NF4Tensor"
    model.float().to("cpu")
    assert layer.dense_dtype is torch.float32 and type(layer.weight).__name__ == "NF4Tensor"
    # NF4 layers without adapters (the default quantizes every linear layer) keep their codes too, under every cast
    qv = make_tiny_llama()
    inject_lora(qv, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize_base="nf4"))
    plain = qv.model.layers[0].mlp.down_proj
    assert type(plain) is NF4Linear
    codes = plain.weight.quantized_data.clone()
    for cast in (lambda m: m.to(torch.float16), lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.float()):
        cast(nn.ModuleDict({"model": qv}))
        assert type(plain.weight).__name__ == "NF4Tensor" and torch.equal(plain.weight.quantized_data, codes)
    assert plain.dense_dtype is torch.float32
    # adapters that follow the base (adapter_dtype=None) take the dense dtype, never the codes' dtype
    other = make_tiny_llama()
    inject_lora(other, LoRAConfig(r=4, target_modules=["q_proj"], quantize_base="nf4", adapter_dtype=None))
    other.to(torch.bfloat16)
    assert other.model.layers[0].self_attn.q_proj.lora_A.weight.dtype is torch.bfloat16


def nf4_parts(weight: torch.Tensor) -> dict:
    names, context = weight.__tensor_flatten__()
    return {"context": {k: v for k, v in context.items() if k != "tensor_meta"}, "shape": tuple(weight.shape),
            "dtype": weight.dtype, **{n: getattr(weight, n) for n in names}}


def assert_exact_nf4_copy(copy_weight: torch.Tensor, weight: torch.Tensor) -> None:
    mine, theirs = nf4_parts(copy_weight), nf4_parts(weight)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(mine[key], value) and mine[key].data_ptr() != value.data_ptr(), key
        else:
            assert mine[key] == value, key


@pytest.mark.parametrize("shape", [(1, 64), (3, 448), (192, 576), (576, 576), (1536, 576), (4096, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepcopy_of_nf4_layers_is_exact_for_every_shape(shape, dtype):
    # issue 20 item 5: torchao's clone re-quantizes with a scaler block of 256 and failed for 576 x 576
    layer = NF4Linear.from_linear(nn.Linear(shape[1], shape[0], dtype=dtype))
    assert layer.weight.scaler_block_size == scaler_block_size(shape[0] * shape[1])
    twin = copy.deepcopy(layer)
    assert type(twin.weight).__name__ == "NF4Tensor" and not twin.weight.requires_grad
    assert_exact_nf4_copy(twin.weight, layer.weight)
    assert twin.dense_dtype is dtype and torch.equal(twin.bias, layer.bias) and twin.bias is not layer.bias
    x = torch.randn(2, shape[1], dtype=dtype)
    assert torch.equal(twin(x), layer(x))


def test_copies_of_a_model_with_an_nf4_base_are_exact():
    # SmolLM2's shapes (576 x 576 attention: scaler block 216), every linear layer in NF4, adapters on q, v
    model = make_tiny_llama(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize_base="nf4"))
    randomize_lora_B(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
    twin = copy.deepcopy(model)
    pairs = [(a, b) for a, b in zip(twin.parameters(), model.parameters())]
    assert len(pairs) == len(list(model.parameters())) == 29  # embedding, head, norms, 14 NF4 weights, 8 adapters
    for mine, theirs in pairs:
        if type(theirs).__name__ == "NF4Tensor":
            assert_exact_nf4_copy(mine, theirs)
        else:
            assert torch.equal(mine, theirs) and mine is not theirs and mine.requires_grad == theirs.requires_grad
    with torch.no_grad():
        assert torch.equal(twin(x).logits, expected)
    # a copy while merged keeps the 4-bit weight aside, and unmerges to the exact 4-bit base
    merge_adapter(model)
    merged = copy.deepcopy(model)
    unmerge_adapter(merged), unmerge_adapter(model)
    assert_exact_nf4_copy(merged.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        assert torch.equal(merged(x).logits, expected)
    # torch's AveragedModel deep-copies the model, and its first update copies every tensor in place
    averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    with torch.no_grad():
        assert torch.equal(averaged.module(x).logits, expected)


def test_training_changes_only_adapters_and_learns():
    model = make_tiny_llama().train()
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear", quantize_base="nf4"))
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(type(p).__name__ == "NF4Tensor" for n, p in frozen.items() if n.endswith("proj.weight"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = tokens(4, 12)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in frozen.values())


# ============================================================================ NF4: merge, unload, errors
def test_merge_and_unload_dequantises_adds_the_delta_and_rounds_once():
    model = make_tiny_llama()
    inject_lora(model, ALL)
    randomize_lora_B(model, std=0.05)
    exact = {n: (layer.weight.get_original_weight().float() + layer.delta_weight()) for n, layer in lora_layers(model)}
    x = tokens()
    with torch.no_grad():
        adapted = model(x).logits
    merge_and_unload(model)  # the rest of the model is float32: so are the merged weights
    for name, w in exact.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and merged.weight.dtype is torch.float32
        assert torch.equal(merged.weight, w)
    with torch.no_grad():
        assert (model(x).logits - adapted).abs().max().item() < 1e-5  # measured 2e-7

    # bf16: one rounding of the float32 sum, within half a bf16 ulp (relative 2**-8)
    model = make_tiny_llama()
    inject_lora(model, ALL)
    randomize_lora_B(model, std=0.05)
    exact = {n: (layer.weight.get_original_weight().float() + layer.delta_weight()) for n, layer in lora_layers(model)}
    merge_and_unload(model, dtype="bf16")
    for name, w in exact.items():
        merged = model.get_submodule(name).weight
        assert merged.dtype is torch.bfloat16
        assert torch.equal(merged, w.bfloat16())
        assert ((merged.float() - w).abs() <= w.abs() * 2**-8).all()


def test_merge_dtype_follows_the_model_after_bf16_true_and_undo_is_exact():
    model = make_tiny_llama()
    inject_lora(model, ALL)
    randomize_lora_B(model)
    model.to(torch.bfloat16)  # bf16-true
    assert merge_dtype(model) is torch.bfloat16
    nf4 = {n: layer.weight for n, layer in lora_layers(model)}
    x = tokens()
    with torch.no_grad():
        adapted = model(x).logits
    merge_and_unload(model, keep=True)
    assert not any(is_quantized_module(m) for m in model.modules())
    assert {p.dtype for n, p in model.named_parameters()} == {torch.bfloat16}
    with torch.no_grad():
        merged = model(x).logits
    assert (merged.float() - adapted.float()).abs().max().item() < 0.1  # bf16 logits of ~1; measured 0.03
    unmerge_and_reinject(model)
    assert all(model.get_submodule(n).weight is w for n, w in nf4.items())  # the very same 4-bit weights
    with torch.no_grad():
        assert torch.equal(model(x).logits, adapted)


def test_merge_adapter_and_unload_keep_the_quantized_base():
    model = make_tiny_llama()
    inject_lora(model, QV)
    randomize_lora_B(model)
    layer = model.model.layers[0].self_attn.q_proj
    nf4 = layer.weight
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    layer.merge()
    assert not layer.is_quantized and layer.weight.dtype is torch.float32
    with torch.no_grad():
        assert (model(x).logits - before).abs().max().item() < 1e-5
    layer.unmerge()
    assert layer.weight is nf4 and layer.is_quantized
    unload(model)
    assert type(model.model.layers[0].self_attn.q_proj) is NF4Linear
    reference = quantized_twin(QV)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


def test_errors_leave_the_model_as_it_was():
    # a layer NF4 cannot hold (30 values)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(10, 3))
    before = model.q_proj
    with pytest.raises(QuantizationError) as err:
        inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], quantize_base="nf4"))
    assert str(err.value) == ("quantize_base='nf4': q_proj has a torch.float32 weight of shape (3, 10), which NF4 "
                              "cannot store (it needs a floating-point weight with a multiple of 64 values); leave that "
                              "layer out (exclude_modules) or drop quantize_base.")
    assert model.q_proj is before and model.q_proj.weight.requires_grad
    # tied weights
    tied = make_tiny_llama(tie_word_embeddings=True)
    with pytest.raises(QuantizationError, match=r"the weight of lm_head is shared with model.embed_tokens.weight "
                                                r"\(tied weights\)"):
        inject_lora(tied, LoRAConfig(r=2, target_modules=["lm_head"], quantize_base="nf4"))
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight
    # a failure after quantizing (an adapter that cannot be built) puts the dense layers back
    model = make_tiny_llama()
    dense = {n: m for n, m in model.named_modules() if n.endswith("q_proj")}
    model.model.embed_tokens = bnb_embedding4bit(model.model.embed_tokens)
    with pytest.raises(QuantizationError, match="a bitsandbytes Embedding4bit"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"], quantize_base="nf4"))
    assert all(model.get_submodule(n) is m for n, m in dense.items())
    assert not hasattr(model, "lora_state")


def test_missing_torchao_names_the_pip_install(monkeypatch):
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now fails as if it were not installed
    model = make_tiny_llama()
    before = model.model.layers[0].self_attn.q_proj
    with pytest.raises(MissingDependencyError) as err:
        inject_lora(model, QV)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, LoRAError) and isinstance(err.value, ImportError)
    assert message.startswith("quantize_base='nf4' needs torchao, which is not installed (")
    assert message.endswith("run: pip install 'lightning-lora[qlora]'   (or: pip install 'torchao>=0.18')")
    assert model.model.layers[0].self_attn.q_proj is before


def test_missing_bitsandbytes_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependencyError) as err:
        bitsandbytes()
    assert "\n" not in str(err.value)
    assert str(err.value).endswith("run: pip install 'lightning-lora[qlora]'   (or: pip install 'bitsandbytes>=0.48')")


def test_host_init_context_builds_on_the_cpu_only_for_a_quantized_base():
    with torch.device("meta"):
        with host_init_context(QV):
            assert torch.empty(1).device.type == "cpu"
        with host_init_context(LoRAConfig()):
            assert torch.empty(1).device.type == "meta"


# ============================================================================ NF4: Lightning
@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_lightning_bf16_true_fit_checkpoint_resume_and_merge(tmp_path, use_dora):
    from lit_models import TinyLlamaModule, fit

    cfg = dict(r=8, alpha=16, target_modules="all-linear", quantize_base="nf4", use_dora=use_dora)
    module = TinyLlamaModule(lr=2e-2, gradient_checkpointing="non_reentrant")
    trainer = fit(module, [LoRA(**cfg, merge_on_fit_end=False)], tmp_path, max_steps=4, precision="bf16-true")
    for name, p in module.named_parameters():
        if name.endswith("_proj.weight"):
            assert type(p).__name__ == "NF4Tensor", name
        else:
            assert p.dtype is (torch.float32 if ".lora_" in name else torch.bfloat16), name
    path = tmp_path / "q.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(lora_state_dict(module))  # adapters only, no 4-bit base
    # A and B of 14 layers, and with DoRA their magnitude vectors
    assert len(ckpt["state_dict"]) == (42 if use_dora else 28) and all(".lora_" in k for k in ckpt["state_dict"])
    assert ckpt["lightning_lora"]["config"]["quantize_base"] == "nf4"
    trained = {k: v.clone() for k, v in lora_state_dict(module).items()}
    # resume into a fresh module: the adapters come back onto a freshly quantized base, then merge at the end
    resumed = TinyLlamaModule(lr=2e-2)
    x = tokens()
    seen = {}

    class Capture(Callback):
        def on_fit_end(self, trainer, pl_module):
            seen["adapters"] = {k: v.clone() for k, v in lora_state_dict(pl_module).items()}
            with torch.no_grad():
                seen["adapted"] = pl_module.eval()(x)

    trainer = fit(resumed, [Capture(), LoRA(**cfg)], tmp_path, max_steps=4, precision="bf16-true",
                  ckpt_path=str(path))
    assert trainer.global_step == 4
    assert all(torch.equal(trained[k], seen["adapters"][k]) for k in trained)
    q = resumed.model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype is torch.bfloat16  # merged: a plain bf16 model
    with torch.no_grad():
        assert (resumed(x).float() - seen["adapted"].float()).abs().max().item() < 0.1


def test_resume_without_quantization_shows_the_difference(tmp_path):
    from lit_models import TinyLlamaModule, fit

    module = TinyLlamaModule()
    trainer = fit(module, [LoRA(r=4, quantize_base="nf4", merge_on_fit_end=False)], tmp_path, max_steps=1)
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    with pytest.raises(LoRAError, match="quantize_base: None != 'nf4'"):
        fit(TinyLlamaModule(), [LoRA(r=4)], tmp_path, max_steps=2, ckpt_path=str(tmp_path / "q.ckpt"))


# ============================================================================ bitsandbytes
def bnb_embedding4bit(embedding: nn.Embedding) -> nn.Module:
    import bitsandbytes as bnb

    out = bnb.nn.Embedding4bit(embedding.num_embeddings, embedding.embedding_dim)
    out.weight = bnb.nn.Params4bit(embedding.weight.detach().clone(), requires_grad=False, module=out)
    return out.to("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    return path


def load_bnb(path, bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
             if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    # train mode: bitsandbytes repacks 4-bit weights for its CPU inference kernel (with bf16 scales) at the first
    # eval forward without grad; these tests compare training-time computations
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu").train()


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_layers_take_adapters_bit_exact_with_the_same_keys(tiny_dir, bits):
    model = load_bnb(tiny_dir, bits)
    keys = list(model.state_dict())
    assert any(k.endswith("q_proj.weight.absmax" if bits == 4 else "q_proj.SCB") for k in keys)
    x = tokens()
    with torch.no_grad():
        base = model(x).logits
    # eval mode: compared with a twin, as bitsandbytes changes its 4-bit scales in place on the CPU (repacked
    # with bf16 scales at the first eval forward, unpacked again by every state_dict() call)
    eval_base, eval_model = load_bnb(tiny_dir, bits), load_bnb(tiny_dir, bits)
    names = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    inject_lora(eval_model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    cls = LoRALinear4bit if bits == 4 else LoRALinear8bitLt
    assert len(names) == 6 and all(type(model.get_submodule(n)) is cls for n in names)
    assert [k for k in model.state_dict() if ".lora_" not in k] == keys  # bitsandbytes' own entries too
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)
        assert torch.equal(eval_model.eval()(x).logits, eval_base.eval()(x).logits)
    # training: gradients reach the adapters only
    loss = model(x, labels=x).loss
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert sorted(trained) == sorted(lora_state_dict(model))
    assert quantized_weight_bytes(model) == quantized_weight_bytes(load_bnb(tiny_dir, bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_merge_gives_a_plain_model_and_undo_restores_bitsandbytes(tiny_dir, bits, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_bnb(tiny_dir, bits)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model, std=0.05)
    layer = model.model.layers[0].self_attn.q_proj
    exact = dequantize_bnb_linear(layer._synced()) + layer.delta_weight()
    x = tokens()
    with torch.no_grad():
        adapted = model(x).logits
    merge_and_unload(model, keep=True)
    assert not any(is_quantized_module(m) for m in model.modules())
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear  # no adapter, dequantised all the same
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, exact)  # float32 model: no rounding
    assert getattr(model.config, "quantization_config", None) is None and not model.is_quantized
    with torch.no_grad():
        assert (model(x).logits - adapted).abs().max().item() < 1e-5  # measured 2e-7
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").train()
    assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert (reloaded(x).logits - adapted).abs().max().item() < 1e-5
    unmerge_and_reinject(model)
    assert model.is_quantized and model.config.quantization_config is not None
    up = model.model.layers[0].mlp.up_proj
    assert type(up).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    with torch.no_grad():
        assert torch.equal(model(x).logits, adapted)


def load_bnb_in(path, bits: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
             if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", dtype=dtype).train()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("base", ["bnb-8bit", "bnb-4bit", "nf4"])
def test_adapter_dtype_none_gives_the_models_dtype_on_a_quantized_base(tiny_dir, base, dtype):
    # issue 20 item 9: adapter_dtype=None asks for the model's dtype, never float32 by default nor the codes' dtype
    # (a bitsandbytes 8-bit layer without a bias keeps no record of the dtype it stands for)
    config = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], adapter_dtype=None)
    if base == "nf4":
        model = make_tiny_llama().to(dtype)
        inject_lora(model, LoRAConfig(**{**config.to_dict(), "quantize_base": "nf4"}))
    else:
        model = load_bnb_in(tiny_dir, 8 if base == "bnb-8bit" else 4, dtype)
        inject_lora(model, config)
    layers = [layer for _, layer in lora_layers(model)]
    assert len(layers) == 4 and all(layer.is_quantized for layer in layers)
    assert {(layer.lora_A.weight.dtype, layer.lora_B.weight.dtype, layer.dense_dtype) for layer in layers} == {
        (dtype, dtype, dtype)}
    randomize_lora_B(model)
    with torch.no_grad():
        assert model(tokens()).logits.dtype is dtype


def test_bnb_quantized_embedding_is_refused():
    model = make_tiny_llama()
    model.model.embed_tokens = bnb_embedding4bit(model.model.embed_tokens)
    with pytest.raises(QuantizationError) as err:
        inject_lora(model, LoRAConfig(r=2, target_modules=["embed_tokens"]))
    assert str(err.value) == ("a bitsandbytes Embedding4bit (a quantized embedding) cannot take a LoRA adapter; leave "
                              "it out of target_modules, or keep it unquantized when loading (BitsAndBytesConfig("
                              "llm_int8_skip_modules=[...]) naming it).")
    assert not any(isinstance(m, LoRANF4Linear) for m in model.modules()) and not hasattr(model, "lora_state")


def load_bnb4_stored_in(path, storage: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_quant_storage=storage)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu").train()


def codes_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized weight's stored codes (bitsandbytes 4-bit, 8-bit) as bytes (codes stored in a float dtype
    are NaN bit patterns too), by layer path."""
    return {n: m.weight.data.view(torch.uint8).clone() for n, m in model.named_modules()
            if n and is_quantized_module(m)}


def cast_dense_only(model: nn.Module, dtype: torch.dtype) -> None:
    """What a cast should do: every floating-point tensor but the quantized codes (and the float32 adapters) in
    `dtype`."""
    for name, module in model.named_modules():
        if ".lora_" in f".{name}":
            continue
        for key, p in module._parameters.items():
            if p is not None and p.is_floating_point() and not getattr(p, "bnb_quantized", False):
                p.data = p.data.to(dtype)
        for key, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(dtype)


CASTS = {"to-fp16": lambda m: m.to(torch.float16), "to-bf16": lambda m: m.to(dtype=torch.bfloat16),
         "half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16()}


@pytest.mark.parametrize("cast", sorted(CASTS))
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.uint8], ids=["bf16", "fp32", "uint8"])
def test_casts_never_touch_bnb_4bit_codes_adapted_or_not(tiny_dir, storage, cast):
    # issue 20 item 2: with the codes stored in a float dtype a cast converted them as numbers (bf16 storage under
    # 16-true: logits 0.73 off; fp32 storage under bf16: a crash in bitsandbytes)
    model, reference = load_bnb4_stored_in(tiny_dir, storage), load_bnb4_stored_in(tiny_dir, storage)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model)
    codes = codes_of(model)
    assert len(codes) == 14 and {m.weight.dtype for n, m in model.named_modules() if n in codes} == {storage}
    box = nn.ModuleDict({"model": model})  # as Lightning casts the LightningModule holding the network
    CASTS[cast](box)
    dtype = model.model.norm.weight.dtype
    assert dtype is (torch.float16 if cast in ("to-fp16", "half") else torch.bfloat16)
    after = codes_of(model)
    assert after.keys() == codes.keys() and all(torch.equal(after[n], c) for n, c in codes.items())
    assert {m.weight.dtype for n, m in model.named_modules() if n in codes} == {storage}
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"  # prints as bitsandbytes' layer
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype is torch.float32  # adapter_dtype
    # the logits are those of the same model with only its dense tensors cast, bit for bit
    inject_lora(reference, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    load_lora_state_dict(reference, lora_state_dict(model))
    cast_dense_only(reference, dtype)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)
    # unload gives bitsandbytes' own class back
    unload(model)
    assert all(type(m) in (bitsandbytes().nn.Linear4bit,) for n, m in model.named_modules() if n in codes)


def test_guarded_bnb_layers_copy_pickle_and_keep_their_type(tiny_dir):
    import io

    model = load_bnb4_stored_in(tiny_dir, torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bitsandbytes().nn.Linear4bit) and type(layer) is not bitsandbytes().nn.Linear4bit
    assert type(layer).__name__ == "Linear4bit" and type(layer).forward is bitsandbytes().nn.Linear4bit.forward
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(twin.model.layers[0].mlp.down_proj) is type(layer)
        nn.ModuleDict({"model": twin}).half()  # still guarded (transformers refuses .half() on the model itself)
        assert codes_of(twin).keys() == codes_of(model).keys()
        assert all(torch.equal(codes_of(twin)[n], c) for n, c in codes_of(model).items())
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x).logits, expected)


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_casts_never_touch_bnb_8bit_codes(tiny_dir, cast):
    model = load_bnb(tiny_dir, 8)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    codes = codes_of(model)
    scales = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".SCB")}
    assert len(codes) == 14 and len(scales) == 14
    assert {m.weight.dtype for n, m in model.named_modules() if n in codes} == {torch.int8}
    CASTS[cast](nn.ModuleDict({"model": model}))
    assert all(torch.equal(codes_of(model)[n], c) for n, c in codes.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in scales.items())


@pytest.mark.parametrize(("storage", "precision"), [(torch.bfloat16, "16-true"), (torch.float32, "bf16-true")],
                         ids=["bf16-storage-16-true", "fp32-storage-bf16-true"])
def test_lightning_precision_leaves_bnb_4bit_codes_alone(tiny_dir, tmp_path, storage, precision):
    from lit_models import TinyLlamaModule, fit

    class Bnb(TinyLlamaModule):
        def __init__(self):
            super().__init__(lr=2e-2)
            self.model = load_bnb4_stored_in(tiny_dir, storage)

    module = Bnb()
    codes = codes_of(module.model)
    fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=2, precision=precision)
    after = codes_of(module.model)
    assert len(after) == 14 and all(torch.equal(after[n], c) for n, c in codes.items())
    assert {m.weight.dtype for n, m in module.model.named_modules() if n in codes} == {storage}
    assert module.model.model.norm.weight.dtype is (torch.float16 if precision == "16-true" else torch.bfloat16)
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(module))  # it trained


def test_bnb_layer_not_quantized_yet_is_refused():
    import bitsandbytes as bnb

    model = nn.Sequential()
    model.add_module("q_proj", bnb.nn.Linear4bit(64, 64, quant_type="nf4"))  # never moved: still float32
    with pytest.raises(QuantizationError, match=r"has not quantized its weight yet \(it is still torch.float32\)"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))


def test_lightning_bf16_true_fit_on_a_bnb_model_checkpoints_only_adapters_and_resumes(tiny_dir, tmp_path):
    from lit_models import TinyLlamaModule, fit

    class Bnb(TinyLlamaModule):
        def __init__(self):
            super().__init__(lr=2e-2)
            self.model = load_bnb(tiny_dir, 4)

    module = Bnb()
    trainer = fit(module, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=3, precision="bf16-true")
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    ckpt = torch.load(tmp_path / "b.ckpt", map_location="cpu", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(lora_state_dict(module)) and len(ckpt["state_dict"]) == 8
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(module))
    # bf16-true cast the rest of the model, not bitsandbytes' codes; the adapters stay float32
    q = module.model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype is torch.uint8 and q.lora_A.weight.dtype is torch.float32
    assert module.model.model.norm.weight.dtype is torch.bfloat16
    # resume into a fresh bitsandbytes module: the adapters come back exactly
    trained = {k: v.clone() for k, v in lora_state_dict(module).items()}
    resumed = Bnb()
    fit(resumed, [LoRA(r=4, merge_on_fit_end=False)], tmp_path, max_steps=3, precision="bf16-true",
        ckpt_path=str(tmp_path / "b.ckpt"))
    assert all(torch.equal(v, lora_state_dict(resumed)[k]) for k, v in trained.items())


# ============================================================================ PEFT files
def peft_adapter_on_bnb(tiny_dir, out, use_dora: bool = False) -> torch.Tensor:
    """A PEFT adapter (q, v, r=4) on a bitsandbytes 4-bit tiny Llama with random B (and, with DoRA, moved
    magnitudes), saved to `out`; returns PEFT's logits for `tokens()`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_bnb(tiny_dir, 4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   use_dora=use_dora))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        expected = peft_model(tokens()).logits
    peft_model.save_pretrained(out)
    return expected


def test_peft_adapter_trained_on_bitsandbytes_loads_onto_ours_and_back(tiny_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    expected = peft_adapter_on_bnb(tiny_dir, tmp_path / "peft")
    x = tokens()
    # onto our adapters on the same bitsandbytes base
    ours = load_bnb(tiny_dir, 4)
    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == 4 and all(isinstance(ours.get_submodule(n), LoRALinear4bit) for n in names)
    with torch.no_grad():
        assert (ours(x).logits - expected).abs().max().item() < 1e-6  # measured 0.0
    # and back: PEFT loads what we save, same keys
    save_adapter(ours, tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = PeftModel.from_pretrained(load_bnb(tiny_dir, 4), tmp_path / "ours").train()  # from_pretrained: eval
    with torch.no_grad():
        assert (back(x).logits - expected).abs().max().item() < 1e-6
    # onto our own NF4 base (torchao): the same tensors on nearly the same 4-bit weights (both NF4 in blocks
    # of 64; the scales are quantized differently: 0.16% .. 0.27% apart, against NF4's own 9% error)
    dense = make_tiny_llama().train()
    load_adapter(dense, tmp_path / "peft", quantize_base="nf4")
    assert all(isinstance(dense.get_submodule(n), LoRANF4Linear) for n in names)
    sd = lora_state_dict(dense)
    peft_sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted("base_model.model." + k for k in sd) == sorted(peft_sd)
    assert all(torch.equal(sd[k], peft_sd["base_model.model." + k]) for k in sd)
    for name in names:
        ours_w = dense.get_submodule(name).dequantized_weight()
        bnb_w = dequantize_bnb_linear(ours.get_submodule(name)._synced())
        assert ((ours_w - bnb_w).norm() / bnb_w.norm()).item() < 0.005


def test_qdora_on_bitsandbytes_matches_peft_both_ways(tiny_dir, tmp_path):
    # DoRA on a 4-bit base (QDoRA), as PEFT: the magnitude and the weight norm come from the dequantised weight
    from peft import PeftModel
    from safetensors.torch import load_file

    expected = peft_adapter_on_bnb(tiny_dir, tmp_path / "peft", use_dora=True)
    x = tokens()
    ours = load_bnb(tiny_dir, 4)
    names = load_adapter(ours, tmp_path / "peft")
    layer = ours.get_submodule(names[0])
    assert isinstance(layer, LoRALinear4bit) and layer.use_dora
    with torch.no_grad():
        assert (ours(x).logits - expected).abs().max().item() < 1e-5
    save_adapter(ours, tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    back = PeftModel.from_pretrained(load_bnb(tiny_dir, 4), tmp_path / "ours").train()
    with torch.no_grad():
        assert (back(x).logits - expected).abs().max().item() < 1e-5
    # a fresh injection starts at the magnitude of the dequantised rows: the quantized base's function
    fresh = load_bnb(tiny_dir, 4)
    with torch.no_grad():
        base = fresh(x).logits
    inject_lora(fresh, LoRAConfig(r=4, alpha=8, use_dora=True))
    layer = fresh.get_submodule(names[0])
    assert torch.equal(layer.lora_magnitude_vector.detach(), layer.dequantized_weight().norm(dim=1))
    with torch.no_grad():
        assert (fresh(x).logits - base).abs().max().item() < 1e-5


def test_qdora_on_nf4_trains_merges_and_unmerges():
    torch.manual_seed(0)
    model = make_tiny_llama().train()
    x = tokens()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear", quantize_base="nf4",
                                  use_dora=True))
    layers = dict(lora_layers(model))
    assert all(isinstance(m, LoRANF4Linear) and m.use_dora for m in layers.values())
    magnitudes = [m.lora_magnitude_vector for m in layers.values()]
    start = [m.detach().clone() for m in magnitudes]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # dropout on: DoRA's dropout branch multiplies by the dequantised weight
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(m, s) for m, s in zip(magnitudes, start))  # the magnitudes train
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        merge_and_unload(model, keep=True)
        assert not any(is_quantized_module(m) for m in model.modules())
        merged = model(x).logits
        # one float32 rounding of the rescaled dequantised weights
        assert (merged - adapted).abs().max().item() < 1e-5
        unmerge_and_reinject(model)  # the very same 4-bit weights come back
        assert all(isinstance(m, LoRANF4Linear) and m.is_quantized for _, m in lora_layers(model))
        assert torch.equal(model(x).logits, adapted)


# ============================================================================ SmolLM2 (real weights)
@pytest.mark.integration
def test_smollm2_nf4_bytes_errors_and_do_no_harm(smollm2_path):
    from lightning_lora.hub import load_causal_lm

    dense = load_causal_lm(smollm2_path).eval()
    model = load_causal_lm(smollm2_path).eval()
    inject_lora(model, LoRAConfig(r=8, target_modules="all-linear", quantize_base="nf4"))
    quantized = [m for m in model.modules() if is_quantized_module(m)]
    assert len(quantized) == 210  # 30 layers x 7 projections; embeddings and the (tied) head stay bf16/fp32
    values = sum(m.weight.numel() for m in quantized)
    assert values == 106_168_320
    assert quantized_weight_bytes(model) == 54_784_440
    assert quantized_weight_bytes(model) / (2 * values) <= 0.30  # 0.2580 of their bf16 bytes
    # NF4's own error on the real weights: ||W - deq(W)|| / ||W|| per layer (measured 0.092 .. 0.102)
    errors = [((m.dequantized_weight() - dense.get_submodule(n).weight).norm() / dense.get_submodule(n).weight.norm())
              .item() for n, m in model.named_modules() if isinstance(m, LoRANF4Linear)]
    assert 0.09 < min(errors) and max(errors) < 0.105
    x = torch.tensor([[1, 504, 2210, 314, 260, 3575, 282, 4649, 30, 2]])
    with torch.no_grad():
        injected = model(x).logits
        # the quantized forward is the dequantised-weight reference, layer by layer (fp32: exact)
        layer = model.model.layers[3].mlp.down_proj
        h = torch.randn(2, 5, 1536)
        assert torch.equal(layer(h), F.linear(h, layer.weight.get_original_weight()))
    assert math.isfinite(model(x, labels=x).loss.item())
    # do no harm: the injected model computes exactly what the same quantized model without adapters computes
    unload(model)
    assert {type(m) for m in model.modules() if is_quantized_module(m)} == {NF4Linear}
    with torch.no_grad():
        assert torch.equal(model(x).logits, injected)


# ============================================================================ the 12 GB config
def test_llama_qlora_config_asks_for_a_4bit_base_on_one_gpu(capsys):
    from pathlib import Path

    import yaml

    from lightning_lora.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "llama-3-8b-qlora.yaml"
    code = main(["fit", "--config", str(config), "--print_config"])
    out = capsys.readouterr()
    assert code == 0, out.err
    cfg = yaml.safe_load(out.out)
    lora = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == "lightning_lora.LoRA"][0]["init_args"]
    assert (lora["quantize_base"], lora["quantize_base_modules"]) == ("nf4", "all-linear")
    assert lora["r"] == 8 and lora["target_modules"] == ["q_proj", "v_proj"] and lora["adapter_dtype"] == "float32"
    trainer = cfg["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", 1, "bf16-true")
    model = cfg["model"]["init_args"]
    assert model["gradient_checkpointing"] is True and model["dtype"] == "bfloat16"
    assert cfg["data"]["init_args"]["tokenizer"] is None  # the model's
