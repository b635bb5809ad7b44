"""The models users really bring (issue 12): task heads the base lacks, added tokens (resized
embeddings), tied weights, and every layer type we accept really routing through its adapter."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAError,
    LoRAMixin,
    inject_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_and_unload,
    parameter_summary,
    save_adapter,
    unload,
)
from lightning_lora.layers import LoRAEmbedding, LoRALayer
from lightning_lora.surgery import base_vocab_size, lora_layers, saved_keys, vocab_rows

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, pad_token_id=0)


def tokens(n: int = 4, seq: int = 10, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 4, lr: float = 1e-2, vocab: int = 256, loss_fn=None) -> None:
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        ids = tokens(seed=step, vocab=vocab)
        out = model(input_ids=ids)
        loss = loss_fn(out) if loss_fn else out.logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# ============================================================================ task heads
@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("causal")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return str(path)


HEAD_CLASSES = [(LlamaForSequenceClassification, "score", {"num_labels": 3}),
                (LlamaForTokenClassification, "score", {"num_labels": 5}),
                (LlamaForQuestionAnswering, "qa_outputs", {})]


@pytest.mark.parametrize("cls,head,kwargs", HEAD_CLASSES, ids=["seq-cls", "token-cls", "qa"])
def test_task_head_is_trained_and_saved_by_default(causal_dir, cls, head, kwargs):
    torch.manual_seed(1)
    model = cls.from_pretrained(causal_dir, **kwargs)  # the head is new: random, not in the checkpoint
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert model.lora_state.modules_to_save == [head]
    head_keys = [k for k in model.state_dict() if k.startswith(head + ".")]
    assert head_keys and all(k in lora_state_dict(model) for k in head_keys)
    assert all(p.requires_grad for p in model.get_submodule(head).parameters())
    assert f"trained fully (modules_to_save): {head}" in str(parameter_summary(model))

    off = cls.from_pretrained(causal_dir, **kwargs)
    inject_lora(off, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], task_heads=False))
    assert not any(k.startswith(head + ".") for k in lora_state_dict(off))
    assert not any(p.requires_grad for p in off.get_submodule(head).parameters())


def test_bert_classifier_head_is_saved():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=2))
    inject_lora(model, LoRAConfig(r=2, target_modules=["query", "value"]))
    assert model.lora_state.modules_to_save == ["classifier"]
    assert {"classifier.weight", "classifier.bias"} <= set(lora_state_dict(model))


class SeqClsModule(LoRAMixin, L.LightningModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = LlamaForSequenceClassification.from_pretrained(path, num_labels=3)  # a new random head

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_seq_cls_head_survives_an_adapter_only_checkpoint(tmp_path, causal_dir):
    torch.manual_seed(0)
    ids, labels = tokens(8), torch.randint(0, 3, (8,))
    module = SeqClsModule(causal_dir)
    trainer = L.Trainer(max_steps=4, callbacks=[LoRA(r=4, merge_on_fit_end=False)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4))
    trainer.save_checkpoint(tmp_path / "cls.ckpt")
    ckpt = torch.load(tmp_path / "cls.ckpt", map_location="cpu", weights_only=True)
    assert "model.score.weight" in ckpt["state_dict"]
    torch.manual_seed(999)  # a reloaded module starts from another random head
    again = SeqClsModule.load_from_checkpoint(tmp_path / "cls.ckpt")
    with torch.no_grad():
        module.eval(), again.eval()
        a, b = module.model(input_ids=ids).logits, again.model(input_ids=ids).logits
    assert torch.equal(a, b)  # difference 0; argmax agrees on every input
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_seq_cls_head_round_trips_through_peft_files(tmp_path, causal_dir):
    from peft import PeftModel

    torch.manual_seed(1)
    model = LlamaForSequenceClassification.from_pretrained(causal_dir, num_labels=3).eval()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train_steps(model, loss_fn=lambda out: out.logits.float().pow(2).mean())
    out = save_adapter(model, tmp_path / "adapter")
    import json

    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    ids = tokens(3)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.manual_seed(2)  # another random head in the fresh base
    pm = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(causal_dir, num_labels=3), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours, atol=1e-5, rtol=0)
    torch.manual_seed(3)
    fresh = LlamaForSequenceClassification.from_pretrained(causal_dir, num_labels=3).eval()
    load_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


# ============================================================================ added tokens
def resized(seed: int = 0, rows: int = 260, new_rows_seed: int = 5) -> LlamaForCausalLM:
    model = make_tiny_llama(seed=seed, vocab_size=256)
    torch.manual_seed(new_rows_seed)  # the new rows are random: another seed, other rows
    model.resize_token_embeddings(rows, mean_resizing=False)
    return model.eval()


def test_resized_vocabulary_is_detected_and_carried():
    model = resized()
    assert (vocab_rows(model), base_vocab_size(model)) == (260, 256)
    inject_lora(model, LoRAConfig(r=4))
    assert model.lora_state.embedding_keys == ["model.embed_tokens.weight", "lm_head.weight"]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(lora_state_dict(model))
    assert not any("embed" in k or "lm_head" in k for k in lora_state_dict(inject_and_return(make_tiny_llama())))
    assert "saved with the adapter (resized vocabulary): model.embed_tokens.weight, lm_head.weight" in str(
        parameter_summary(model))


def inject_and_return(model):
    inject_lora(model, LoRAConfig(r=4))
    return model


def test_resized_embeddings_round_trip_through_save_adapter(tmp_path):
    model = resized()
    inject_lora(model, LoRAConfig(r=4))
    train_steps(model, vocab=260)
    out = save_adapter(model, tmp_path / "adapter")
    ids = tokens(vocab=260)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    fresh = resized(new_rows_seed=77)  # resized the same way, other random new rows
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - ours).abs().max() > 0.1  # without the rows it would be wrong
    load_adapter(fresh, out)
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - ours).abs().max() <= 1e-6
    from peft import PeftModel

    pm = PeftModel.from_pretrained(resized(new_rows_seed=78), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


def test_adapter_of_a_resized_vocabulary_onto_another_vocabulary_is_a_clear_error(tmp_path):
    model = resized()
    inject_lora(model, LoRAConfig(r=4))
    out = save_adapter(model, tmp_path / "adapter")
    base = make_tiny_llama(vocab_size=256)
    with pytest.raises(LoRAError, match=r"vocabulary of 260 tokens, this model has 256 .*resize_token_embeddings\(260\)"):
        load_adapter(base, out)
    assert not any(isinstance(m, LoRALayer) for m in base.modules())  # left as it was


class ResizedModule(LoRAMixin, L.LightningModule):
    def __init__(self, rows: int = 260, new_rows_seed: int = 5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = resized(rows=rows, new_rows_seed=new_rows_seed).train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_adapter_only_checkpoint_carries_resized_rows(tmp_path):
    module = ResizedModule()
    ids = tokens(8, vocab=260)
    trainer = L.Trainer(max_steps=3, callbacks=[LoRA(r=4, merge_on_fit_end=False)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4))
    trainer.save_checkpoint(tmp_path / "r.ckpt")
    keys = torch.load(tmp_path / "r.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert {"model.model.embed_tokens.weight", "model.lm_head.weight"} <= set(keys)
    again = ResizedModule.load_from_checkpoint(tmp_path / "r.ckpt", new_rows_seed=99)
    module.eval(), again.eval()
    with torch.no_grad():
        assert (module.model(input_ids=ids).logits - again.model(input_ids=ids).logits).abs().max() <= 1e-6
    with pytest.raises(LoRAError, match=r"vocabulary of 260 tokens, this model has 264"):
        ResizedModule.load_from_checkpoint(tmp_path / "r.ckpt", rows=264)


def test_save_embedding_layers_true_and_false():
    gpt2 = make_tiny_gpt2()
    gpt2.resize_token_embeddings(104)  # built in code: its base vocabulary is unknown
    inject_lora(gpt2, LoRAConfig(r=2, target_modules=["c_attn"]))
    assert gpt2.lora_state.embedding_keys == []
    forced = make_tiny_gpt2()
    forced.resize_token_embeddings(104)
    inject_lora(forced, LoRAConfig(r=2, target_modules=["c_attn"], save_embedding_layers=True))
    assert forced.lora_state.embedding_keys == ["transformer.wte.weight", "lm_head.weight"]
    off = resized()
    inject_lora(off, LoRAConfig(r=4, save_embedding_layers=False))
    assert off.lora_state.embedding_keys == []


def test_vocabulary_resized_after_injection_is_carried_too():
    model = make_tiny_llama(vocab_size=256)
    inject_lora(model, LoRAConfig(r=4))
    assert "lm_head.weight" not in saved_keys(model)
    model.resize_token_embeddings(264, mean_resizing=False)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(saved_keys(model))


def test_base_config_json_tells_the_base_vocabulary(tmp_path):
    make_tiny_llama(vocab_size=256).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base_vocab_size(model) == 256
    model.resize_token_embeddings(300, mean_resizing=False)
    assert base_vocab_size(model) == 256


# ============================================================================ tied weights
def tied() -> LlamaForCausalLM:
    return make_tiny_llama(tie_word_embeddings=True)


def test_tied_lm_head_in_modules_to_save_trains_an_untied_copy():
    model = tied()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed_before = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, LoRAConfig(r=4, modules_to_save=["lm_head"]))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    params = lora_parameters(model)
    assert len(params) == len({id(p) for p in params}) == 9  # 8 adapter tensors + the lm_head copy
    assert any(p is model.lm_head.weight for p in params)
    assert not any(p is model.model.embed_tokens.weight for p in params)
    train_steps(model, vocab=128)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # the shared embedding did not move
    assert not torch.equal(model.lm_head.weight, embed_before)
    unload(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie is back


def test_tied_lm_head_both_ways_with_peft(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    ids = tokens(vocab=128)
    ours = tied()
    inject_lora(ours, LoRAConfig(r=4, modules_to_save=["lm_head"]))
    train_steps(ours, vocab=128)
    out = save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    pm = PeftModel.from_pretrained(tied(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, expected, atol=1e-5, rtol=0)

    theirs = get_peft_model(tied(), PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["lm_head"]))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for step in range(4):
        theirs(input_ids=tokens(seed=step, vocab=128)).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    mine = tied()
    load_adapter(mine, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


# ============================================================================ every layer type
class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def run_through(model, config, ids):
    """Inject, give every zero factor random values, check the adapter changes the output, gets
    gradients, and that merging gives the same function."""
    with torch.no_grad():
        base = model(input_ids=ids).logits
    inject_lora(model, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            zero = layer.lora_A.weight if isinstance(layer, LoRAEmbedding) else layer.lora_B.weight
            zero.copy_(torch.randn(zero.shape, generator=gen) * 0.05)
    out = model(input_ids=ids).logits
    assert (out - base).abs().max() > 1e-3, "the adapter did not change the output"
    out.pow(2).mean().backward()
    for name, layer in lora_layers(model):
        assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0, name
        assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0, name
    merged = merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, out.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "gpt2-embeddings", "linear-subclass"])
def test_every_accepted_layer_type_routes_through_its_adapter(kind):
    if kind == "linear":
        run_through(make_tiny_llama(), LoRAConfig(r=4, target_modules="all-linear"), tokens(vocab=128))
    elif kind == "conv1d":
        run_through(make_tiny_gpt2(), LoRAConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"]), tokens(vocab=100))
    elif kind == "embedding":
        run_through(make_tiny_llama(), LoRAConfig(r=4, target_modules=["embed_tokens"]), tokens(vocab=128))
    elif kind == "gpt2-embeddings":
        run_through(make_tiny_gpt2(), LoRAConfig(r=2, target_modules=["wte", "wpe"]), tokens(vocab=100))
    else:
        class Sub(nn.Linear):  # a subclass that keeps Linear's forward is a Linear
            pass

        model = make_tiny_llama()
        for layer in model.model.layers:
            old = layer.self_attn.q_proj
            new = Sub(old.in_features, old.out_features, bias=False)
            new.weight = old.weight
            layer.self_attn.q_proj = new
        run_through(model, LoRAConfig(r=4, target_modules=["q_proj"]), tokens(vocab=128))


def test_layers_whose_adapter_would_never_run_are_refused():
    model = make_tiny_llama()
    model.model.layers[0].self_attn.q_proj = ScaledLinear(64, 64, bias=False)
    with pytest.raises(LoRAError, match=r"matched 'model.layers.0.self_attn.q_proj' of type ScaledLinear, which cannot "
                                        r"take a LoRA adapter \(ScaledLinear overrides Linear.forward"):
        inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    assert not any(isinstance(m, LoRALayer) for m in model.modules())

    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(16, 2)
    with pytest.raises(LoRAError, match=r"matched 'attn.out_proj' of type NonDynamicallyQuantizableLinear, which cannot "
                                        r"take a LoRA adapter \(its parent MultiheadAttention reads out_proj.weight "
                                        r"directly"):
        inject_lora(holder, LoRAConfig(r=2, target_modules=["out_proj"]))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_training_equals_peft_for_ten_adamw_steps(kind):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if kind == "conv1d":
        factory, targets, vocab = make_tiny_gpt2, ["c_attn", "c_proj"], 100
    elif kind == "embedding":
        factory, targets, vocab = make_tiny_llama, ["embed_tokens", "v_proj"], 128
    else:
        factory, targets, vocab = make_tiny_llama, ["q_proj", "v_proj", "down_proj"], 128
    ours = factory()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets))
    theirs = get_peft_model(factory(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      fan_in_fan_out=kind == "conv1d"))
    # identical initial tensors: ours -> PEFT
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            if isinstance(layer, LoRAEmbedding):
                peft_layer.lora_embedding_A["default"].copy_(layer.lora_A.weight)
                peft_layer.lora_embedding_B["default"].copy_(layer.lora_B.weight)
            else:
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    opt_a = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for p in lora_parameters(ours)) == sum(p.numel() for p in theirs.parameters()
                                                               if p.requires_grad)
    ours.train(), theirs.train()
    for step in range(10):
        ids = tokens(seed=step, vocab=vocab)
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            torch.manual_seed(step)  # GPT-2's own dropout: the same masks for both
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    ours.eval(), theirs.eval()
    ids = tokens(seed=99, vocab=vocab)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_unmerge_is_within_one_rounding_each_way():
    from lightning_lora.layers import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 256), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.05)
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight()
    layer.merge()
    layer.unmerge()
    err = (layer.weight - w0).abs()
    bound = 2.0**-24 * (w0.abs() + (w0 + delta).abs())
    assert bool((err <= bound + 1e-30).all())
    assert err.max().item() > 0  # not bit-exact: the docstring says so
