"""GGUF export (`lightning_lora.gguf_export`, `merge --format gguf`, `export --format gguf`): files read back with
transformers' GGUF loader and `gguf.GGUFReader`, checked against the bundled llama.cpp SmolLM2 file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, randomize_lora_B

from lightning_lora import LoRAConfig, inject_lora, lora_state_dict, merge_and_unload
from lightning_lora.cli import main
from lightning_lora.commands import merged_logits
from lightning_lora.peft_format import save_adapter

gguf = pytest.importorskip("gguf")
from lightning_lora.errors import UnsupportedArchitectureError  # noqa: E402
from lightning_lora.gguf_export import (
    MIN_COSINE,
    SUPPORTED_ARCHITECTURES,
    base_gguf_tensors,
    check_adapter_gguf,
    check_input_ids,
    ollama_template,
    read_adapter_gguf,
    reference_logits,
    verify_model_gguf,
    write_adapter_gguf,
    write_model_gguf,
    write_modelfile,
)
from lightning_lora.gguf_export.tensors import _unpermute_qk  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token byte-level BPE tokenizer with ChatML special tokens, trained in code (the GGUF round trip of
    SmolLM2's 49152-token vocabulary takes ~30 s; it is covered once by the integration tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world! naïve café",
                             "user assistant system"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHATML)


def tiny_model(kind: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of each supported architecture (hidden 64), norms and biases randomised so that the
    norm offset and the bias mapping are exercised."""
    import transformers

    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 256, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 2}
    torch.manual_seed(seed)
    if kind == "llama":
        model = make_tiny_llama(seed, **common)
    else:
        config_class, model_class, extra = {
            "mistral": ("MistralConfig", "MistralForCausalLM", {}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 128}),  # the reader assumes 128
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
            "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
        }[kind]
        config = getattr(transformers, config_class)(**common, **extra)
        model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def reader_tensors(path_or_reader) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (GGML type, transformers-order shape)} of a GGUF file (or of an open `GGUFReader`)."""
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(str(path_or_reader))
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist()))) for t in reader.tensors}


# ---------------------------------------------------------------------------------------------------------------------
# the merged model
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "outtypes"), [
    ("llama", ("f32", "f16", "bf16", "q8_0")),
    ("mistral", ("f32", "q8_0")),
    ("qwen2", ("f32", "q8_0")),
    ("qwen3", ("bf16", "q8_0")),
    ("gemma2", ("f32", "q8_0")),
    ("gemma3_text", ("f16", "q8_0")),
])
def test_tiny_model_round_trips_through_transformers_gguf_loader(tmp_path, tokenizer, kind, outtypes):
    model = tiny_model(kind, len(tokenizer))
    tokens = check_input_ids(tokenizer)
    assert tokens[0, :3].tolist() == tokenizer.convert_tokens_to_ids(["<|im_start|>", "user", "Ċ"])  # the chat prompt
    expected = reference_logits(model, tokens)
    for outtype in outtypes:  # a base directory named exactly "mistral" must still read back
        path = write_model_gguf(model, tokenizer, tmp_path / f"m.{outtype}.gguf", outtype, name=kind)
        checked = verify_model_gguf(path, expected, outtype, tokenizer)
        cosine = float(checked.split("cosine ")[1].split()[0])
        assert cosine >= MIN_COSINE[outtype], checked
        assert checked.endswith("same tokenizer and chat template")

        reader = gguf.GGUFReader(str(path))
        arch = SUPPORTED_ARCHITECTURES[kind]
        fields = {k: f.contents() for k, f in reader.fields.items()}
        assert fields["general.architecture"] == arch
        assert fields["general.type"] == "model"
        assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype]
        assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 64
        assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
        assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
        assert fields["tokenizer.chat_template"] == CHATML
        assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        tensors = reader_tensors(path)
        tied = kind.startswith("gemma")
        assert ("output.weight" in tensors) is not tied
        assert tensors["token_embd.weight"][1] == (len(tokenizer), 64)
        assert tensors["blk.1.attn_q.weight"][1] == tuple(model.model.layers[1].self_attn.q_proj.weight.shape)
        assert tensors["blk.0.attn_norm.weight"] == ("F32", (64,))  # 1-D tensors stay f32
        two_d = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
        assert tensors["blk.0.ffn_down.weight"][0] == two_d
        if kind == "qwen2":
            assert tensors["blk.0.attn_q.bias"] == ("F32", (64,))
        if kind in ("qwen3", "gemma3_text"):
            assert "blk.0.attn_q_norm.weight" in tensors and "blk.0.attn_k_norm.weight" in tensors
        if kind == "gemma2":
            assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(tensors)


def test_byte_fallback_tokenizer_is_written_as_llama_cpp_sentencepiece_vocabulary(tmp_path):
    """Llama 2 / Mistral / Gemma style: BPE with byte fallback -> `tokenizer.ggml.model = llama`, byte tokens typed
    BYTE, scores by merge rank; transformers' reader rebuilds a tokenizer that encodes the same ids."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world! [INST] [/INST]"] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] "
                      "+ ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    model = make_tiny_llama(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tokens = check_input_ids(tokenizer)
    path = write_model_gguf(model, tokenizer, tmp_path / "spm.gguf", "f32")
    checked = verify_model_gguf(path, reference_logits(model, tokens), "f32", tokenizer, tokens=tokens)
    assert checked.endswith("same tokenizer and chat template")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    types = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], strict=True))
    assert types["<0x41>"] == gguf.TokenType.BYTE and types["<s>"] == gguf.TokenType.CONTROL
    assert types["<unk>"] == gguf.TokenType.UNKNOWN
    assert fields["tokenizer.ggml.scores"][:3] == [0.0, -1.0, -2.0]
    assert Path(write_modelfile(path, tokenizer)).read_text().count("[INST]") >= 2


def test_llama_q_k_rows_are_permuted_and_gemma_norms_offset_as_llama_cpp_writes_them(tmp_path, tokenizer):
    llama = tiny_model("llama", len(tokenizer))
    path = write_model_gguf(llama, tokenizer, tmp_path / "llama.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    q = llama.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = llama.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    v = llama.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q)
    np.testing.assert_array_equal(_unpermute_qk(stored["blk.0.attn_q.weight"], 4, 4), q)
    np.testing.assert_array_equal(_unpermute_qk(stored["blk.0.attn_k.weight"], 4, 2), k)
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], v)

    gemma = tiny_model("gemma2", len(tokenizer))
    path = write_model_gguf(gemma, tokenizer, tmp_path / "gemma.gguf", "f32")
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    norm = gemma.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(stored["blk.0.attn_norm.weight"], norm + np.float32(1.0))


def test_unsupported_architectures_and_adapters_are_refused(tmp_path, tokenizer, tiny_gpt2):
    with pytest.raises(UnsupportedArchitectureError, match="model_type='gpt2' cannot be written as GGUF; supported "
                                                           "architectures: llama, mistral, qwen2, qwen3, gemma2, "
                                                           "gemma3_text"):
        write_model_gguf(tiny_gpt2, tokenizer, tmp_path / "x.gguf")
    qwen3 = tiny_model("qwen3", len(tokenizer))
    qwen3.config.head_dim = 16
    with pytest.raises(UnsupportedArchitectureError, match="head_dim=16: transformers' GGUF reader assumes"):
        write_model_gguf(qwen3, tokenizer, tmp_path / "x.gguf")
    gemma = tiny_model("gemma2", len(tokenizer))
    gemma.lm_head.weight = torch.nn.Parameter(gemma.lm_head.weight.detach() + 0.01)  # untied, trained
    with pytest.raises(UnsupportedArchitectureError, match=r"lm_head.weight; the GGUF would be incomplete \(llama.cpp "
                                                           r"has no output head apart from the embedding for gemma2\)"):
        write_model_gguf(gemma, tokenizer, tmp_path / "x.gguf")
    llama = tiny_model("llama", len(tokenizer))
    inject_lora(llama, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="still has LoRA adapters; merge them first"):
        write_model_gguf(llama, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="outtype='q4_0' is not supported; expected one of f32, f16, q8_0, bf16"):
        write_model_gguf(tiny_model("llama", len(tokenizer)), tokenizer, tmp_path / "x.gguf", "q4_0")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_existing_file_is_kept_without_overwrite(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    path = write_model_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        write_model_gguf(model, tokenizer, path, "f32")
    assert path.read_bytes() == before
    write_model_gguf(model, tokenizer, path, "f32", overwrite=True)
    assert len(path.read_bytes()) > len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_verification_catches_a_file_that_does_not_compute_the_model(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    path = write_model_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    other = merged_logits(tiny_model("llama", len(tokenizer), seed=1))
    with pytest.raises(ValueError, match=r"computes different logits than the merged model \(cosine"):
        verify_model_gguf(path, other, "f32")


# ---------------------------------------------------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------------------
def test_modelfile_for_chatml_llama3_and_unknown_templates(tmp_path, tokenizer):
    gguf_file = tmp_path / "model.q8_0.gguf"
    text = write_modelfile(gguf_file, tokenizer).read_text()
    lines = text.splitlines()
    assert lines[1] == "FROM ./model.q8_0.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' \
           '<|im_start|>assistant\n"""' in text
    assert lines[-2:] == ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    with pytest.raises(FileExistsError):
        write_modelfile(gguf_file, tokenizer)

    template, stops = ollama_template("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}")
    assert "<|eot_id|>" in template and stops == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    text = write_modelfile(gguf_file, chat_template="{{ messages }}", overwrite=True).read_text()
    assert "TEMPLATE" not in text and "Ollama reads it from the GGUF's tokenizer.chat_template" in text


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_dirs(tmp_path, tokenizer):
    """A tiny Llama base directory with the tokenizer, and a PEFT adapter for it."""
    base = tmp_path / "base"
    model = tiny_model("llama", len(tokenizer))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora_B(model, std=0.05)
    adapter = save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    merge_and_unload(model)
    return base, adapter, merged_logits(model.eval())


def test_merge_format_gguf_writes_one_verified_file_and_a_modelfile(tmp_path, capsys, tiny_dirs):
    base, adapter, expected = tiny_dirs
    out = tmp_path / "gguf"
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--format", "gguf",
                 "--outtype", "q8_0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Writing GGUF (q8_0)" in err and "Checking the GGUF with transformers' GGUF loader" in err
    assert "same tokenizer and chat template" in err
    assert sorted(os.listdir(out)) == ["Modelfile", "model.q8_0.gguf"]
    assert (out / "Modelfile").read_text().splitlines()[1] == "FROM ./model.q8_0.gguf"
    assert "general.name" in gguf.GGUFReader(str(out / "model.q8_0.gguf")).fields
    checked = verify_model_gguf(out / "model.q8_0.gguf", expected, "q8_0")
    assert float(checked.split("cosine ")[1].split()[0]) >= 0.999

    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--format", "gguf"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists and is not empty" in err
    assert sorted(os.listdir(out)) == ["Modelfile", "model.q8_0.gguf"]


def test_merge_format_gguf_of_an_unsupported_architecture_exits_2_and_writes_nothing(tmp_path, capsys, tiny_gpt2):
    base = tmp_path / "gpt2"
    tiny_gpt2.save_pretrained(base)
    inject_lora(tiny_gpt2, LoRAConfig(r=2, target_modules=["c_attn"]))
    adapter = save_adapter(tiny_gpt2, tmp_path / "adapter")
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--format", "gguf"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("lightning-lora merge: error:"))
    assert "model_type='gpt2' cannot be written as GGUF; supported architectures: llama, mistral" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "gpt2"]


# ---------------------------------------------------------------------------------------------------------------------
# the LoRA adapter GGUF
# ---------------------------------------------------------------------------------------------------------------------
def _checkpoint(path: Path, model: torch.nn.Module, config: LoRAConfig, base: str) -> None:
    module = torch.nn.Module()
    module.model = model
    inject_lora(module, config)
    randomize_lora_B(module, std=0.05)
    torch.save({"epoch": 0, "global_step": 1, "state_dict": lora_state_dict(module),
                "lightning_lora": {"version": 1, "config": config.to_dict(), "model_prefix": "model",
                                   "base_model_name_or_path": base, "task_type": "CAUSAL_LM"}}, path)


def test_export_format_gguf_writes_llama_cpp_lora_pairs(tmp_path, capsys, tokenizer, tiny_dirs):
    base, _, _ = tiny_dirs
    config = LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    _checkpoint(tmp_path / "a.ckpt", tiny_model("llama", len(tokenizer)), config, str(base))
    out = tmp_path / "lora"
    code = main(["export", str(tmp_path / "a.ckpt"), str(out), "--format", "gguf"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "a lora_a/lora_b pair for each of the 8 adapted layers" in err
    assert sorted(os.listdir(out)) == ["adapter.f32.gguf"]
    meta, tensors = read_adapter_gguf(out / "adapter.f32.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 16.0 and meta["general.architecture"] == "llama"
    assert sorted(tensors) == sorted(f"blk.{i}.{t}.weight.lora_{ab}" for i in (0, 1)
                                     for t in ("attn_q", "attn_k", "attn_v", "ffn_down") for ab in "ab")
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)   # r x in
    assert tensors["blk.0.attn_q.weight.lora_b"].shape == (64, 4)   # out x r
    assert tensors["blk.1.attn_k.weight.lora_b"].shape == (32, 4)
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape == (4, 128)
    # every pair named and shaped as a tensor of the merged model's GGUF
    model_file = write_model_gguf(tiny_model("llama", len(tokenizer)), tokenizer, tmp_path / "m.gguf", "f32")
    base_tensors = base_gguf_tensors(model_file)
    for name, values in tensors.items():
        out_features, in_features = base_tensors[name.rsplit(".", 1)[0]]
        assert values.shape[1 if name.endswith("lora_a") else 0] == (in_features if name.endswith("a") else out_features)


def test_adapter_gguf_folds_rslora_and_rank_pattern_and_permutes_b(tmp_path, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    meta = tiny_model("llama", len(tokenizer))
    inject_lora(model, LoRAConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"v_proj": 2},
                                  target_modules=["q_proj", "v_proj"]))
    randomize_lora_B(model, std=0.05)
    adapter = save_adapter(model, tmp_path / "adapter")
    path = write_adapter_gguf(adapter, tmp_path / "a.gguf", meta, "f32")
    assert "8 adapted layers" not in check_adapter_gguf(path, adapter, meta)  # 4 layers, every delta equal
    _, tensors = read_adapter_gguf(path)
    # llama.cpp applies alpha / r * B A with r from the tensor: B carries rsLoRA's sqrt(r) / r ratio
    a = model.model.layers[0].self_attn.v_proj.lora_A.weight.detach()
    b = model.model.layers[0].self_attn.v_proj.lora_B.weight.detach()
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_a"], a.numpy())
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], (b * (2 / 2 ** 0.5)).numpy(), rtol=1e-6)
    bq = model.model.layers[0].self_attn.q_proj.lora_B.weight.detach().numpy() * 2.0  # sqrt(4) / 4 * 4
    np.testing.assert_allclose(_unpermute_qk(tensors["blk.0.attn_q.weight.lora_b"], 4, 4), bq, rtol=1e-6)


def test_adapter_gguf_refuses_what_llama_cpp_cannot_apply(tmp_path, tokenizer):
    meta = tiny_model("llama", len(tokenizer))
    for name, config in (("dora", LoRAConfig(r=2, use_dora=True, target_modules=["q_proj"])),
                         ("saved", LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])),
                         ("embedding", LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"]))):
        model = tiny_model("llama", len(tokenizer))
        inject_lora(model, config)
        adapter = save_adapter(model, tmp_path / name)
        with pytest.raises(ValueError, match="merge it instead|Merge it instead"):
            write_adapter_gguf(adapter, tmp_path / f"{name}.gguf", meta)
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------------------------------------------------------------
# the real SmolLM2 (llama.cpp's own file is the reference)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_merge_q8_0_and_adapter_match_the_bundled_llama_cpp_file(tmp_path, capsys, smollm2):
    from lightning_lora.hub import bundled_gguf

    reference = os.path.join(*bundled_gguf("smollm2-135m-instruct"))
    inject_lora(smollm2, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    randomize_lora_B(smollm2, std=0.05)
    adapter = save_adapter(smollm2, tmp_path / "adapter")

    code = main(["merge", "--base", "smollm2-135m-instruct", "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                 "--format", "gguf", "--outtype", "q8_0"])
    err = capsys.readouterr().err
    assert code == 0, err
    cosine = float(err.split("logits cosine ")[1].split()[0])
    assert cosine >= 0.999, err
    written = tmp_path / "m" / "model.q8_0.gguf"
    assert written.stat().st_size == 144_810_784  # 138.1 MiB: 2-D tensors q8_0, norms f32, llama.cpp tokenizer
    reader, ref_reader = gguf.GGUFReader(str(written)), gguf.GGUFReader(reference)  # 49152 tokens: ~8 s a parse
    ours, theirs = reader_tensors(reader), reader_tensors(ref_reader)
    assert {k: v[1] for k, v in ours.items()} == {k: v[1] for k, v in theirs.items()}  # llama.cpp's names and shapes
    fields, ref_fields = reader.fields, ref_reader.fields
    for key in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.vocab_size",
                "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert fields[key].contents() == ref_fields[key].contents(), key

    code = main(["export", str(adapter), str(tmp_path / "lora"), "--format", "gguf", "--outtype", "f16",
                 "--base-model", "smollm2-135m-instruct"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "pair for each of the 150 adapted layers" in err and f"(checked against {reference})" in err
    _, tensors = read_adapter_gguf(tmp_path / "lora" / "adapter.f16.gguf")
    assert len(tensors) == 300
    for name, values in tensors.items():
        out_features, in_features = theirs[name.rsplit(".", 1)[0]][1]
        assert values.shape == ((4, in_features) if name.endswith("lora_a") else (out_features, 4)), name


# ---------------------------------------------------------------------------------------------------------------------
# the callback option
# ---------------------------------------------------------------------------------------------------------------------
def test_callback_writes_the_verified_merged_gguf_at_fit_end(tmp_path, tokenizer):
    from lit_models import TinyLlamaModule, fit

    from lightning_lora import LoRA

    class WithTokenizer(TinyLlamaModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model("llama", len(tokenizer)).train()
            self.tokenizer = tokenizer

    module = WithTokenizer()
    target = tmp_path / "export" / "model.q8_0.gguf"
    fit(module, [LoRA(r=4, target_modules="all-linear", merged_gguf=str(target), gguf_outtype="q8_0")], tmp_path,
        max_steps=3)
    assert sorted(p.name for p in target.parent.iterdir()) == ["Modelfile", "model.q8_0.gguf"]  # no temporary file
    tokens = check_input_ids(tokenizer)
    checked = verify_model_gguf(target, reference_logits(module.model.eval(), tokens), "q8_0", tokenizer)
    assert float(checked.split("cosine ")[1].split()[0]) >= MIN_COSINE["q8_0"]
    assert reader_tensors(target)["blk.0.attn_q.weight"][0] == "Q8_0"


def test_callback_gguf_options_are_validated():
    from lightning_lora import LoRA

    with pytest.raises(ValueError, match="merged_gguf is set but merge_on_fit_end=False"):
        LoRA(merged_gguf="m.gguf", merge_on_fit_end=False)
    with pytest.raises(ValueError, match="gguf_outtype='q4_k' is invalid; expected one of f32, f16, bf16, q8_0"):
        LoRA(merged_gguf="m.gguf", gguf_outtype="q4_k")


# ---------------------------------------------------------------------------------------------------------------------
# rotary scaling
# ---------------------------------------------------------------------------------------------------------------------
def test_llama3_rope_freqs_and_linear_scaling_are_written_as_llama_cpp_reads_them(tmp_path, tokenizer):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, rope_parameters=llama3)
    tokens = check_input_ids(tokenizer)
    path = write_model_gguf(model, tokenizer, tmp_path / "llama3.gguf", "f32")
    checked = verify_model_gguf(path, reference_logits(model, tokens), "f32", tokenizer, tokens, config=model.config)
    assert "cosine 1.000000" in checked
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    # llama.cpp divides each rotary frequency by rope_freqs: the ratio of transformers' default and llama3 ones
    default, _ = ROPE_INIT_FUNCTIONS["linear"](type(model.config)(**{**model.config.to_dict(), "rope_parameters": {
        "rope_type": "linear", "factor": 1.0, "rope_theta": 10000.0}}))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
    np.testing.assert_allclose(stored["rope_freqs.weight"], (default / scaled).numpy(), rtol=1e-5)
    assert stored["rope_freqs.weight"].shape == (8,) and stored["rope_freqs.weight"][-1] == 8.0

    import transformers

    qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})).eval()
    path = write_model_gguf(qwen2, tokenizer, tmp_path / "qwen2.gguf", "f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    assert fields["qwen2.rope.scaling.type"] == "linear" and fields["qwen2.rope.scaling.factor"] == 4.0
    checked = verify_model_gguf(path, reference_logits(qwen2, tokens), "f32", tokenizer, tokens, config=qwen2.config)
    assert "cosine 1.000000" in checked

    qwen2.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    with pytest.raises(UnsupportedArchitectureError, match="rope_type='longrope' rotary scaling is not written"):
        write_model_gguf(qwen2, tokenizer, tmp_path / "x.gguf")


def test_merge_in_bf16_is_compared_in_float32(tmp_path, capsys, tiny_dirs):
    base, adapter, _ = tiny_dirs
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "bf16"),
                 "--dtype", "bf16", "--format", "gguf", "--outtype", "bf16"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert float(err.split("logits cosine ")[1].split()[0]) >= 0.9999999  # bf16 weights, exact in the file
    assert reader_tensors(tmp_path / "bf16" / "model.bf16.gguf")["blk.0.attn_q.weight"][0] == "BF16"


def test_export_format_gguf_errors_exit_2_and_write_nothing(tmp_path, capsys, tokenizer, tiny_dirs):
    _, adapter, _ = tiny_dirs
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    _checkpoint(tmp_path / "nobase.ckpt", tiny_model("llama", len(tokenizer)), config, None)
    other = write_model_gguf(make_tiny_llama(hidden_size=32, vocab_size=len(tokenizer)), tokenizer,
                             tmp_path / "other.gguf", "f32")
    cases = [
        (["export", str(tmp_path / "nobase.ckpt"), str(tmp_path / "o1"), "--format", "gguf"],
         "names no base model; pass --base-model"),
        (["export", str(adapter), str(tmp_path / "o2"), "--format", "gguf", "--base-gguf", str(other)],
         "other.gguf: has blk.0.ffn_down.weight of shape (32, 128), the adapter needs (64, 128)"),
        (["export", str(tmp_path / "missing"), str(tmp_path / "o3"), "--format", "gguf"], "does not exist"),
    ]
    for argv, needle in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        line = next(line for line in err.splitlines() if line.startswith("lightning-lora export: error:"))
        assert needle in line, line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o1", "o2", "o3", ".o"))]


def test_gguf_options_without_format_gguf_are_an_error(tmp_path, capsys, tiny_dirs):
    base, adapter, _ = tiny_dirs
    for argv, prog, needle in (
            (["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--outtype",
              "q8_0"], "merge", "--outtype only apply with --format gguf; add --format gguf, or drop them."),
            (["export", str(adapter), str(tmp_path / "e"), "--base-gguf", "x.gguf"], "export",
             "--base-gguf only apply with --format gguf")):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and f"lightning-lora {prog}: error: {needle}" in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_check_adapter_gguf_catches_a_file_that_does_not_hold_the_adapter(tmp_path, tokenizer):
    meta = tiny_model("llama", len(tokenizer))
    adapters = []
    for seed in (0, 1):
        model = tiny_model("llama", len(tokenizer))
        torch.manual_seed(seed)
        inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
        randomize_lora_B(model, seed=seed + 1)
        adapters.append(save_adapter(model, tmp_path / f"a{seed}"))
    path = write_adapter_gguf(adapters[0], tmp_path / "a0.gguf", meta)
    assert "2 adapted layers" in check_adapter_gguf(path, adapters[0], meta)
    with pytest.raises(ValueError, match="the update llama.cpp applies for blk.0.attn_q.weight differs"):
        check_adapter_gguf(path, adapters[1], meta)


def test_a_trained_copy_of_a_tied_head_is_written_as_output_weight(tmp_path, tokenizer):
    """`modules_to_save=["lm_head"]` on a tied model trains an untied copy: the GGUF must carry it."""
    model = make_tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "output.weight" not in reader_tensors(write_model_gguf(model, tokenizer, tmp_path / "tied.gguf", "f32"))
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad).add_(0.05)
    merge_and_unload(model)
    tokens = check_input_ids(tokenizer)
    path = write_model_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert "output.weight" in reader_tensors(path)
    assert "cosine 1.000000" in verify_model_gguf(path, reference_logits(model, tokens), "f32", tokens=tokens)


def test_missing_gguf_package_is_a_clear_error_before_training(monkeypatch):
    import sys

    from lightning_lora import LoRA
    from lightning_lora.errors import MissingDependencyError
    from lightning_lora.gguf_export import require_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match="needs the gguf package, which is not installed; install it "
                                                     "with: pip install gguf"):
        require_gguf()
    with pytest.raises(MissingDependencyError):
        LoRA(merged_gguf="m.gguf")


@pytest.mark.parametrize(("split", "pre"), [("_LLAMA3_SPLIT", "llama3"), ("_QWEN2_SPLIT", "qwen2")])
def test_llama3_and_qwen2_style_pre_tokenizers_get_llama_cpp_names(tmp_path, split, pre):
    """Byte-level BPE with a split regex (Llama 3, Qwen2): `tokenizer.ggml.pre` is the llama.cpp name whose regex
    it is, and the tokenizer transformers rebuilds from the file encodes the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(getattr(gguf_tokenizer_mapping, split)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog 12345.", "Hello world! naïve"] * 20,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<|end|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    model = make_tiny_llama(vocab_size=len(tokenizer))
    tokens = check_input_ids(tokenizer)
    path = write_model_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == pre
    assert verify_model_gguf(path, reference_logits(model, tokens), "f16", tokenizer, tokens).endswith("same tokenizer")
