"""Model surgery: do no harm, merge, PEFT parity, gradients, parameter counts, state dicts, errors."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, randomize_lora_B
from torch import nn

from lightning_lora import (
    LoRAConfig,
    LoRAError,
    count_parameters,
    disable_lora,
    get_lora_config,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    parameter_summary,
    unmerge_adapter,
    unmerge_and_reinject,
)
from lightning_lora.layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from lightning_lora.surgery import (
    STATE_ATTR,
    LayerRow,
    LoRAState,
    MergedAdapters,
    find_target_modules,
    forget_merged,
    has_lora,
    is_merged,
    lora_layers,
    lora_states,
    merged_config,
)

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]
LLAMA_PATHS = [f"self_attn.{p}" for p in LLAMA_LINEAR[:4]] + [f"mlp.{p}" for p in LLAMA_LINEAR[4:]]
GPT2_PATHS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


# ---------------------------------------------------------------------------------------------- helpers


def _ids(vocab: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _make(kind: str) -> nn.Module:
    return {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2, "llama_cls": _make_tiny_llama_cls}[kind]()


def _make_tiny_llama_cls() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, pad_token_id=0, num_labels=3)).eval()


def _vocab(model: nn.Module) -> int:
    return model.config.vocab_size


def _lora_keys(names: list[str]) -> list[str]:
    return [f"{n}.lora_{ab}.weight" for n in names for ab in "AB"]


def _types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def _assert_plain_like(model: nn.Module, base: nn.Module) -> None:
    """`model` is a plain model again: exactly `base`'s module types and state-dict keys."""
    assert not has_lora(model)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert [k for k in model.state_dict() if "lora_" in k] == []
    assert list(model.state_dict()) == list(base.state_dict())
    assert _types(model) == _types(base)
    with pytest.raises(LoRAError, match="has no LoRA adapters"):
        get_lora_config(model)


def _check_grads(model: nn.Module, expected_trainable: set[str]) -> None:
    """Only `expected_trainable` require and receive gradients; everything else stays untouched."""
    named = dict(model.named_parameters())
    assert expected_trainable <= set(named)
    assert {n for n, p in named.items() if p.requires_grad} == expected_trainable
    for name, param in named.items():
        if name in expected_trainable:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name


def _adapted_names(kind: str, suffixes: list[str]) -> list[str]:
    """The module paths that a suffix list adapts in the tiny (2-layer) models, in named_modules() order."""
    prefix, paths = ("transformer.h", GPT2_PATHS) if kind == "gpt2" else ("model.layers", LLAMA_PATHS)
    return [f"{prefix}.{i}.{p}" for i in range(2) for p in paths if p.rsplit(".", 1)[1] in suffixes]


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_base(smollm2_path):
    """Input ids and the base logits of the real SmolLM2-135M-Instruct, computed once per module."""
    from lightning_lora.hub import load_causal_lm

    model = load_causal_lm(smollm2_path).eval()
    ids = _ids(1000, n=8)
    return ids, _logits(model, ids)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_do_no_harm_smollm2(smollm2, smol_base, targets):
    ids, base = smol_base
    names = inject_lora(smollm2, LoRAConfig(r=8, target_modules=targets))
    if targets == "all-linear":
        assert len(names) == 30 * 7 and "lm_head" not in names
        assert {n.rsplit(".", 1)[-1] for n in names} == set(LLAMA_LINEAR)
    else:
        assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
        assert len(names) == 60
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight  # the tie is untouched
    assert torch.equal(_logits(smollm2, ids), base)


def test_parameter_counts_smollm2(smollm2):
    base_total = 134_515_008
    assert count_parameters(smollm2) == (base_total, base_total)  # fp32, lm_head tied to embed_tokens
    inject_lora(smollm2, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    per_layer = 8 * (576 + 576) + 8 * (576 + 192)
    assert per_layer == 9216 + 6144
    assert 30 * per_layer == 460_800
    assert count_parameters(smollm2) == (460_800, base_total + 460_800)
    summary = parameter_summary(smollm2)
    assert summary.rows == [LayerRow("q_proj", (576, 576), 30, 8, 30 * 576 * 576, 30 * 9216),
                            LayerRow("v_proj", (192, 576), 30, 8, 30 * 192 * 576, 30 * 6144)]
    assert f"trainable 460,800 of {base_total + 460_800:,} parameters" in str(summary)


# ---------------------------------------------------------------------------------------------- do no harm (tiny)


@pytest.mark.parametrize(("kind", "targets", "layer_cls", "expected_names"), [
    ("llama", ["q_proj", "v_proj"], LoRALinear, _adapted_names("llama", ["q_proj", "v_proj"])),
    ("llama", "all-linear", LoRALinear, _adapted_names("llama", LLAMA_LINEAR)),
    ("llama", ["embed_tokens"], LoRAEmbedding, ["model.embed_tokens"]),
    ("gpt2", ["c_attn"], LoRAConv1D, _adapted_names("gpt2", ["c_attn"])),
    ("gpt2", "all-linear", LoRAConv1D, _adapted_names("gpt2", GPT2_LINEAR)),  # not lm_head
    ("gpt2", ["wte"], LoRAEmbedding, ["transformer.wte"]),
])
def test_do_no_harm_tiny(kind, targets, layer_cls, expected_names):
    model = _make(kind)
    ids = _ids(_vocab(model))
    base = _logits(model, ids)
    names = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    assert names == expected_names
    assert all(type(model.get_submodule(n)) is layer_cls for n in names)
    assert torch.equal(_logits(model, ids), base)


# ---------------------------------------------------------------------------------------------- targeting


def test_target_names_exact():
    model = make_tiny_llama()
    names = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert [n for n, _ in lora_layers(model)] == names
    assert get_lora_config(model).target_modules == ["q_proj", "v_proj"]


def test_all_linear_excludes_output_heads():
    llama = make_tiny_llama()
    names = inject_lora(llama, LoRAConfig(target_modules="all-linear"))
    assert names == _adapted_names("llama", LLAMA_LINEAR)
    assert type(llama.lm_head) is nn.Linear

    cls = _make_tiny_llama_cls()
    names = inject_lora(cls, LoRAConfig(target_modules="all-linear"))
    assert names == _adapted_names("llama", LLAMA_LINEAR)
    assert type(cls.score) is nn.Linear


def test_suffix_matching_is_on_dot_boundaries():
    block = nn.Module()
    block.q_proj = nn.Linear(4, 4)
    block.xq_proj = nn.Linear(4, 4)
    model = nn.Sequential(OrderedDict(a=block))
    assert find_target_modules(model, LoRAConfig(target_modules=["q_proj"])) == ["a.q_proj"]
    assert find_target_modules(model, LoRAConfig(target_modules=["a.q_proj"])) == ["a.q_proj"]
    assert find_target_modules(model, LoRAConfig(target_modules=["xq_proj"])) == ["a.xq_proj"]


def test_regex_target_matches_whole_path():
    model = make_tiny_llama()
    cfg = LoRAConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj")
    assert find_target_modules(model, cfg) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert find_target_modules(model, LoRAConfig(target_modules=r".*\.0\..*_proj")) == [
        n for n in _adapted_names("llama", LLAMA_LINEAR) if ".0." in n]
    with pytest.raises(LoRAError, match="matched no module"):
        find_target_modules(model, LoRAConfig(target_modules="q_proj"))  # a regex is not a suffix


def test_exclude_modules():
    model = make_tiny_llama()
    cfg = LoRAConfig(target_modules="all-linear", exclude_modules=["down_proj", "layers.1.self_attn.k_proj"])
    expected = [n for n in _adapted_names("llama", LLAMA_LINEAR)
                if not n.endswith("down_proj") and n != "model.layers.1.self_attn.k_proj"]
    assert find_target_modules(model, cfg) == expected
    cfg = LoRAConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\..*")
    assert find_target_modules(model, cfg) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_rank_and_alpha_pattern_on_injected_layers():
    model = make_tiny_llama()
    cfg = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 4}, alpha_pattern={"v_proj": 2})
    inject_lora(model, cfg)
    got = {n: (layer.r, layer.scaling, tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape))
           for n, layer in lora_layers(model)}
    assert got == {
        "model.layers.0.self_attn.q_proj": (2, 8.0, (2, 64), (64, 2)),
        "model.layers.0.self_attn.v_proj": (8, 0.25, (8, 64), (32, 8)),
        "model.layers.1.self_attn.q_proj": (2, 8.0, (2, 64), (64, 2)),
        "model.layers.1.self_attn.v_proj": (4, 0.5, (4, 64), (32, 4)),
    }
    rs = make_tiny_llama()
    inject_lora(rs, LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert {layer.scaling for _, layer in lora_layers(rs)} == {8 / math.sqrt(4)}


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_and_zero_B(init):
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init=init))
    A = torch.cat([layer.lora_A.weight.flatten() for _, layer in lora_layers(model)])  # 8 x (4 x 64)
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)
    if init == "kaiming":
        assert A.abs().max() <= bound
    else:
        assert abs(A.std().item() - 1 / 4) < 0.02
        assert A.abs().max() > 2 * bound


def test_adapters_follow_the_base_modes_eval():
    """Regression: adapters injected into an eval-mode model had lora_dropout in training mode."""
    model = make_tiny_llama()  # eval mode
    inject_lora(model, LoRAConfig(r=4, dropout=0.5, target_modules="all-linear"))
    randomize_lora_B(model, std=0.2)
    assert not any(m.training for m in model.modules())
    ids = _ids(128)
    assert torch.equal(_logits(model, ids), _logits(model, ids))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live


# ---------------------------------------------------------------------------------------------- merge

MERGE_CASES = [
    ("llama", [*LLAMA_LINEAR, "embed_tokens"]),
    ("gpt2", [*GPT2_LINEAR, "wte"]),  # GPT-2's wte is tied to lm_head
]


@pytest.mark.parametrize(("kind", "targets"), MERGE_CASES)
def test_merge_and_unload_fp32_gives_a_plain_model_with_the_adapted_function(kind, targets, tmp_path):
    model, reference = _make(kind), _make(kind)
    ids = _ids(_vocab(model))
    base = _logits(model, ids)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_lora_B(model, std=0.02)
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max() > 1e-2  # the update is not trivial

    assert merge_and_unload(model) is model
    _assert_plain_like(model, reference)
    merged = _logits(model, ids)
    assert (merged - adapted).abs().max() < 1e-5
    assert model.training is False

    if kind == "gpt2":  # the tie is undone so that lm_head keeps computing with the base embedding
        assert model.lm_head.weight is not model.transformer.wte.weight
        assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
        assert model.config.tie_word_embeddings is False

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    _assert_plain_like(reloaded, reference)
    assert torch.equal(_logits(reloaded, ids), merged)


def test_merge_and_unload_bf16_base():
    model, reference = make_tiny_llama().to(torch.bfloat16), make_tiny_llama().to(torch.bfloat16)
    ids = _ids(128)
    base = _logits(model, ids)
    names = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_B(model, std=0.05)
    adapted = _logits(model, ids)
    assert (adapted.float() - base.float()).abs().max() > 0.1
    expected_w = {n: (model.get_submodule(n).weight.float() + model.get_submodule(n).delta_weight()).to(torch.bfloat16)
                  for n in names}
    merge_and_unload(model)
    _assert_plain_like(model, reference)
    for name in names:
        assert model.get_submodule(name).weight.dtype is torch.bfloat16
        assert torch.equal(model.get_submodule(name).weight, expected_w[name])  # one rounding, from fp32
    merged = _logits(model, ids)
    assert merged.dtype is torch.bfloat16
    torch.testing.assert_close(merged.float(), adapted.float(), atol=2e-2, rtol=2e-2)


def test_merge_adapter_unmerge_adapter_round_trip():
    model = make_tiny_llama()
    ids = _ids(128)
    names = inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    randomize_lora_B(model)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    adapted = _logits(model, ids)

    merge_adapter(model)
    merge_adapter(model)  # idempotent
    assert all(layer.merged for _, layer in lora_layers(model))
    assert [n for n, _ in lora_layers(model)] == names  # adapters kept
    for n in names:
        expected = weights[n] + model.get_submodule(n).delta_weight()
        assert torch.equal(model.get_submodule(n).weight, expected)
    assert (_logits(model, ids) - adapted).abs().max() < 1e-5

    unmerge_adapter(model)
    assert not any(layer.merged for _, layer in lora_layers(model))
    for n in names:
        assert (model.get_submodule(n).weight - weights[n]).abs().max() < 1e-6
    assert (_logits(model, ids) - adapted).abs().max() < 1e-5



def _ours(module: nn.Module) -> list[str]:
    """The attributes of the package on `module` and every module inside it (path.name)."""
    return [f"{path}.{name}".lstrip(".") for path, m in module.named_modules() for name in m.__dict__
            if name.startswith("lora_") and not isinstance(m, LoRALayer)]


def test_a_kept_merge_is_the_one_record_of_the_model():
    outer = nn.Module()
    outer.net = make_tiny_llama()
    config = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    base_keys = list(outer.state_dict())
    inject_lora(outer.net, config)
    randomize_lora_B(outer.net)
    ids = _ids(128)
    adapted = _logits(outer.net, ids)
    assert _ours(outer) == ["net.lora_state"] and isinstance(outer.net.lora_state, LoRAState)

    merge_and_unload(outer, keep=True)   # merged from outside the injection root: the record moves there
    record = outer.__dict__[STATE_ATTR]
    assert isinstance(record, MergedAdapters) and [p for p, _ in record.states] == ["net"]
    assert _ours(outer) == ["lora_state"] and lora_states(outer) == [] and not has_lora(outer)
    assert is_merged(outer) and merged_config(outer) == config and not is_merged(outer.net)
    assert list(outer.state_dict()) == base_keys   # the record is no Module / Parameter: state dict unchanged

    assert unmerge_and_reinject(outer) == ["net.model.layers.0.self_attn.q_proj", "net.model.layers.0.self_attn.v_proj",
                                           "net.model.layers.1.self_attn.q_proj", "net.model.layers.1.self_attn.v_proj"]
    assert _ours(outer) == ["net.lora_state"] and not is_merged(outer)
    assert (_logits(outer.net, ids) - adapted).abs().max() < 1e-5


def test_forget_merged_and_a_new_injection_replace_a_kept_merge():
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    merge_and_unload(model, keep=True)
    assert _ours(model) == ["lora_state"] and is_merged(model)
    forget_merged(model)
    assert _ours(model) == [] and not is_merged(model) and merged_config(model) is None
    forget_merged(model)  # nothing to forget: no error

    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    merge_and_unload(model, keep=True)
    with pytest.raises(LoRAError, match="matched no module"):   # a failed injection leaves the kept merge
        inject_lora(model, LoRAConfig(r=2, target_modules=["nothing"]))
    assert is_merged(model)
    inject_lora(model, LoRAConfig(r=2, target_modules=["k_proj"]))   # the merged model is the new base
    assert _ours(model) == ["lora_state"] and not is_merged(model) and get_lora_config(model).r == 2


def test_disable_lora():
    model = make_tiny_llama()
    ids = _ids(128)
    base = _logits(model, ids)
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear"))
    randomize_lora_B(model)
    adapted = _logits(model, ids)
    assert not torch.equal(adapted, base)
    with disable_lora(model) as inner:
        assert inner is model
        assert torch.equal(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), adapted)

    with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
        raise RuntimeError("boom")
    assert all(layer.lora_enabled for _, layer in lora_layers(model))  # restored after an exception

    merge_adapter(model)
    with disable_lora(model):
        assert not any(layer.merged for _, layer in lora_layers(model))
        assert (_logits(model, ids) - base).abs().max() < 1e-5
    assert all(layer.merged for _, layer in lora_layers(model))
    assert (_logits(model, ids) - adapted).abs().max() < 1e-5


def _train_saved_modules(model: nn.Module, seed: int = 2) -> None:
    """What training does to `modules_to_save`: every parameter and float buffer changes, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in model.lora_state.modules_to_save:
            for t in [*model.get_submodule(path).parameters(), *model.get_submodule(path).buffers()]:
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=gen) * 0.5)


def test_disable_lora_runs_the_original_task_head_as_peft_does():
    # issue 20 item 1: a trained score head (added to modules_to_save by default) stayed in use
    model = _make_tiny_llama_cls()
    base_model = copy.deepcopy(model)
    ids = _ids(128)
    base = model(ids).logits.detach()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert model.lora_state.modules_to_save == ["score"]
    randomize_lora_B(model)
    _train_saved_modules(model)
    trained = model(ids).logits.detach()
    assert not torch.allclose(trained, base, atol=1e-2)
    score = model.score.weight
    with disable_lora(model):
        assert torch.equal(model(ids).logits, base)
        assert model.score.weight is not score and not model.score.weight.requires_grad
    assert model.score.weight is score and score.requires_grad  # the trained head, for the optimizer
    assert torch.equal(model(ids).logits, trained)
    # PEFT's disable_adapter() on the same trained model gives the same numbers, bit for bit
    twin = _peft_twin(base_model, model, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                      task_type="SEQ_CLS")
    with torch.no_grad():
        twin.base_model.model.score.modules_to_save["default"].weight.copy_(score)
        assert torch.equal(twin(ids).logits, trained)
        with twin.disable_adapter():
            assert torch.equal(twin(ids).logits, base)


def test_disable_lora_runs_original_modules_to_save_with_buffers():
    # an MLP with modules_to_save=["lin1"] (was 1.2 off), and a module with buffers (BatchNorm running stats)
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(lin1=nn.Linear(8, 16), norm=nn.BatchNorm1d(16), act=nn.ReLU(),
                                      q_proj=nn.Linear(16, 16), out=nn.Linear(16, 4))).eval()
    x = torch.randn(5, 8)
    base = model(x).detach()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lin1", "norm"]))
    assert sorted(model.lora_state.originals) == ["lin1.bias", "lin1.weight", "norm.bias", "norm.num_batches_tracked",
                                                  "norm.running_mean", "norm.running_var", "norm.weight"]
    randomize_lora_B(model)
    _train_saved_modules(model)
    trained = model(x).detach()
    assert (trained - base).abs().max() > 0.1
    with disable_lora(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), trained)
    # the originals follow device and dtype casts of the model (moved once, then reused)
    model.double()
    with disable_lora(model):
        assert torch.allclose(model(x.double()), base.double(), atol=1e-6)
        assert model.lin1.weight.dtype is torch.float64
    assert model.lora_state.originals["lin1.weight"].dtype is torch.float64
    assert torch.allclose(model(x.double()), trained.double(), atol=1e-6)


def test_disable_lora_with_tied_modules_to_save_and_a_resized_vocabulary():
    # lm_head tied to embed_tokens trains an untied copy; inside disable_lora the tie (the original) is back
    model = make_tiny_llama(tie_word_embeddings=True)
    model.resize_token_embeddings(136)  # added tokens: the embeddings are carried with the adapters
    ids = _ids(136)
    base = _logits(model, ids)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    assert model.lora_state.embedding_keys == ["model.embed_tokens.weight", "lm_head.weight"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    randomize_lora_B(model)
    _train_saved_modules(model)
    trained = _logits(model, ids)
    assert not torch.allclose(trained, base, atol=1e-2)
    with disable_lora(model):
        assert model.lm_head.weight is model.model.embed_tokens.weight  # the original, tied Parameter
        assert torch.equal(_logits(model, ids), base)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(_logits(model, ids), trained)
    # embeddings carried for the resized vocabulary but not trained: the resized base runs
    plain = make_tiny_llama()
    plain.resize_token_embeddings(136)
    base = _logits(plain, ids)
    inject_lora(plain, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert plain.lora_state.embedding_keys == ["model.embed_tokens.weight", "lm_head.weight"]
    randomize_lora_B(plain)
    with disable_lora(plain):
        assert torch.equal(_logits(plain, ids), base)
    # resized after injection: a tied original is the live embedding (resized too, so it runs); an untied
    # module_to_save's frozen copy cannot run on the new vocabulary, said so
    model.resize_token_embeddings(140)
    with disable_lora(model):
        assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (140, 64)
    untied = make_tiny_llama()
    inject_lora(untied, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm", "lm_head"]))
    trained_norm = untied.model.norm.weight
    untied.resize_token_embeddings(140)
    with pytest.raises(LoRAError) as err, disable_lora(untied):
        pass
    assert str(err.value) == ("disable_lora: lm_head.weight has shape (140, 64) but had (128, 64) when the adapters "
                              "were injected (a vocabulary resized after inject_lora?), so the base function is not "
                              "defined for it; resize the embeddings before injecting.")
    assert untied.lm_head.weight.shape == (140, 64) and all(layer.lora_enabled for _, layer in lora_layers(untied))
    assert untied.model.norm.weight is trained_norm  # swapped in before the error, put back


def test_disable_lora_after_merges():
    model = _make_tiny_llama_cls()
    ids = _ids(128)
    base = model(ids).logits.detach()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model)
    _train_saved_modules(model)
    # merged but kept (merge_adapter): unmerged for the block, the original head runs
    merge_adapter(model)
    with disable_lora(model):
        assert (model(ids).logits - base).abs().max() < 1e-5
    assert all(layer.merged for _, layer in lora_layers(model))
    # merged and unloaded (merge_and_unload(keep=True), as at the end of fit): refused, then undone
    trained = model(ids).logits.detach()
    merge_and_unload(model, keep=True)
    with pytest.raises(LoRAError) as err, disable_lora(model):
        pass
    assert str(err.value) == ("disable_lora: the adapters of this model are merged into its weights "
                              "(merge_and_unload, e.g. at the end of fit), so it no longer has a base function to "
                              "switch to; call unmerge_and_reinject(model) first, or use the base model.")
    unmerge_and_reinject(model)
    assert (model(ids).logits - trained).abs().max() < 1e-5
    with disable_lora(model):  # the originals of injection, not the merged model's head
        assert (model(ids).logits - base).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- PEFT parity


def _peft_twin(base: nn.Module, ours: nn.Module, **lora_kwargs):
    """PEFT's model for the same config, built on a copy of the base, with our A and B copied in."""
    import peft
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    twin = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **lora_kwargs))
    peft_sd = twin.state_dict()
    ours_names = [n for n, _ in lora_layers(ours)]
    peft_names = [n.removeprefix("base_model.model.") for n, m in twin.named_modules() if isinstance(m, PeftLoraLayer)]
    assert peft_names == ours_names  # the same modules are adapted
    sd = {}
    for name, layer in lora_layers(ours):
        prefix = f"base_model.model.{name}"
        if isinstance(layer, LoRAEmbedding):
            keys = (f"{prefix}.lora_embedding_A.default", f"{prefix}.lora_embedding_B.default")
        else:
            keys = (f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight")
        for key, ours_w in zip(keys, (layer.lora_A.weight, layer.lora_B.weight)):
            assert peft_sd[key].shape == ours_w.shape, key
            sd[key] = ours_w.detach().clone()
        peft_layer = twin.get_submodule(prefix)
        assert peft_layer.r["default"] == layer.r
        assert peft_layer.scaling["default"] == pytest.approx(layer.scaling, rel=1e-12)
    result = twin.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    return twin.eval()


# ---------------------------------------------------------------------------------------------- gradients


def _backward(model: nn.Module) -> None:
    ids = _ids(_vocab(model))
    model(input_ids=ids).logits.float().square().mean().backward()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapters_and_chosen_biases_get_gradients(bias):
    model = make_tiny_gpt2()
    names = inject_lora(model, LoRAConfig(r=4, target_modules=["c_attn"], bias=bias))
    expected = set(_lora_keys(names))
    if bias == "all":
        expected |= {n for n, _ in model.named_parameters() if n.endswith(".bias")}
        assert "transformer.ln_f.bias" in expected and "transformer.h.1.mlp.c_fc.bias" in expected
    elif bias == "lora_only":
        expected |= {f"{n}.bias" for n in names}
    assert len(expected) == {"none": 4, "all": 4 + 6 * 2 + 1, "lora_only": 6}[bias]
    _backward(model)
    _check_grads(model, expected)
    assert sorted(lora_state_dict(model)) == sorted(expected)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


def test_modules_to_save_head_trains_and_is_saved():
    model = _make_tiny_llama_cls()
    names = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
    assert type(model.score) is nn.Linear
    assert model.score.bias is None
    expected = set(_lora_keys(names)) | {"score.weight"}
    ids = _ids(128)
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    _check_grads(model, expected)
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(expected)
    assert torch.equal(sd["score.weight"], model.score.weight)


def test_modules_to_save_wins_over_targets():
    model = make_tiny_llama()
    names = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear
    expected = set(_lora_keys(names)) | {f"model.layers.{i}.self_attn.v_proj.weight" for i in range(2)}
    _backward(model)
    _check_grads(model, expected)


# ---------------------------------------------------------------------------------------------- counts


def test_parameter_counts_4096_linear():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(q_proj=nn.Linear(4096, 4096, bias=False)))
    inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj"]))
    assert count_parameters(model) == (65_536, 16_777_216 + 65_536)
    summary = parameter_summary(model)
    assert summary.rows == [LayerRow("q_proj", (4096, 4096), 1, 8, 16_777_216, 65_536)]
    text = str(summary)
    for fragment in ("16,777,216", "65,536", "0.39%", "99.6%", "4096 x 4096"):
        assert fragment in text, fragment
    assert text.splitlines()[-1] == "trainable 65,536 of 16,842,752 parameters (0.3891%)"


def test_parameter_counts_tiny_llama_and_tied_gpt2():
    model = make_tiny_llama()
    base_trainable, base_total = count_parameters(model)
    assert base_trainable == base_total
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    per_layer = 4 * (64 + 64) + 4 * (64 + 32)  # q 64->64, v 64->32 (2 kv heads of 16)
    assert count_parameters(model) == (2 * per_layer, base_total + 2 * per_layer)

    gpt2 = make_tiny_gpt2()
    total = sum(p.numel() for p in {id(p): p for p in gpt2.parameters()}.values())
    assert count_parameters(gpt2) == (total, total)  # wte/lm_head tie counted once


# ---------------------------------------------------------------------------------------------- state dicts


def test_load_lora_state_dict_reports_every_problem_at_once():
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    sd = lora_state_dict(model)
    before = {k: v.clone() for k, v in sd.items()}
    bad = {k: torch.ones_like(v) for k, v in sd.items()}
    del bad["model.layers.0.self_attn.q_proj.lora_A.weight"]
    bad["model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 64)
    bad["model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(32, 8)
    with pytest.raises(LoRAError) as info:
        load_lora_state_dict(model, bad)
    msg = str(info.value)
    assert "missing keys (1): model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "unexpected keys (1): model.layers.0.self_attn.k_proj.lora_A.weight" in msg
    assert ("shape mismatches (1): model.layers.1.self_attn.v_proj.lora_B.weight: "
            "checkpoint (32, 8) vs model (32, 4)") in msg
    assert "same LoRA config" in msg
    after = lora_state_dict(model)
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing was loaded


# ---------------------------------------------------------------------------------------------- errors


def test_inject_twice_is_an_error():
    model = make_tiny_llama()
    inject_lora(model, LoRAConfig(r=4))
    with pytest.raises(LoRAError, match=r"already has LoRA adapters \(\['default'\]\), one named 'default'; pass another adapter_name=") as info:
        inject_lora(model, LoRAConfig(r=4, target_modules=["k_proj"]))
    assert "merge_and_unload(model)" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert [type(m) for m in model.model.layers[0].self_attn.children()].count(nn.Linear) == 2  # k_proj, o_proj


@pytest.mark.parametrize("targets", [["qproj"], r".*\.attn\.q_proj"])
def test_target_matching_nothing_lists_linear_modules(targets):
    model = make_tiny_llama()
    with pytest.raises(LoRAError) as info:
        inject_lora(model, LoRAConfig(target_modules=targets))
    msg = str(info.value)
    assert f"target_modules={targets!r} matched no module" in msg
    assert "Linear modules in this model end with: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head." in msg
    assert "'all-linear'" in msg
    assert not has_lora(model) and not hasattr(model, "_lora_config")


def test_exclude_everything_matches_nothing():
    with pytest.raises(LoRAError, match="matched no module"):
        inject_lora(make_tiny_llama(), LoRAConfig(target_modules=["q_proj"], exclude_modules=["self_attn.q_proj"]))


@pytest.mark.parametrize(("kind", "targets", "path", "type_name"), [
    ("llama", r"model\.layers\.0", "model.layers.0", "LlamaDecoderLayer"),
    ("llama", ["input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
    ("llama", ["self_attn"], "model.layers.0.self_attn", "LlamaAttention"),
    ("gpt2", ["ln_1"], "transformer.h.0.ln_1", "LayerNorm"),
])
def test_target_of_unsupported_type(kind, targets, path, type_name):
    model = _make(kind)
    with pytest.raises(LoRAError) as info:
        inject_lora(model, LoRAConfig(target_modules=targets))
    msg = str(info.value)
    assert f"matched {path!r} of type {type_name}" in msg
    assert "supported types: nn.Linear, transformers Conv1D, nn.Embedding" in msg
    if type_name == "LlamaAttention":
        assert "e.g. q_proj, k_proj, v_proj, o_proj." in msg  # the Linear layers inside it
    assert not has_lora(model)


def test_modules_to_save_matching_nothing():
    model = _make_tiny_llama_cls()
    with pytest.raises(LoRAError) as info:
        inject_lora(model, LoRAConfig(target_modules=["q_proj"], modules_to_save=["score", "classifier"]))
    msg = str(info.value)
    assert "modules_to_save=['score', 'classifier']: ['classifier'] matched no module" in msg
    assert "score" in msg.split("end with:")[1]
    assert not has_lora(model)


def test_other_misuse():
    model = make_tiny_llama()
    with pytest.raises(TypeError, match="config must be a LoRAConfig, got dict"):
        inject_lora(model, {"r": 8})  # type: ignore[arg-type]
    with pytest.raises(LoRAError, match="has no LoRA adapters"):
        lora_state_dict(model)
    inject_lora(model, LoRAConfig(r=4))
    with pytest.raises(LoRAError, match="not an adapter layer"):
        merge_and_unload(model.model.layers[0].self_attn.q_proj)


def test_no_adapter_inside_a_module_to_save():
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    names = inject_lora(model, LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["mlp"]))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = model.model.layers[0].mlp
    assert type(mlp.up_proj) is torch.nn.Linear and mlp.up_proj.weight.requires_grad
    assert "model.layers.0.mlp.up_proj.weight" in lora_state_dict(model)
