"""`lightning_lora.loss`: the chunked, summed causal LM loss against transformers' own loss (values and
gradients, per architecture), what it keeps alive (no full logits), and the fallback for other models."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora_B

from lightning_lora import LoRAConfig, inject_lora
from lightning_lora.loss import (
    causal_lm_loss,
    chunkable,
    chunked_cross_entropy,
    shifted_targets,
)
from lightning_lora.surgery import lora_layers

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, max_position_embeddings=64, pad_token_id=0)


def _build(arch: str):
    import transformers

    if arch == "llama":
        cfg = transformers.LlamaConfig(**SMALL)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **SMALL))
    if arch == "gemma2":   # final_logit_softcapping=30 by default: applied per chunk
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, final_logit_softcapping=3.0,
                                                                          **SMALL))
    if arch == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL))
    if arch == "granite":  # logits_scaling: not chunkable, the model's own logits are used
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=4.0, **SMALL))
    raise AssertionError(arch)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100                               # a prompt without loss
    return ids, mask, labels


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "granite"])
def test_summed_loss_and_gradients_equal_transformers_loss(arch):
    """Loss and every adapter gradient (lm_head adapted too) equal transformers' mean loss times the target count,
    chunks of 5 target positions (several chunks, the last one short)."""
    torch.manual_seed(0)
    model = _build(arch).train()
    assert chunkable(model) is (arch != "granite")
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]))
    randomize_lora_B(model, std=0.1)
    ids, mask, labels = _batch()
    grads = []
    for ours in (True, False):
        model.zero_grad(set_to_none=True)
        if ours:
            total, n = causal_lm_loss(model, ids, labels, mask, chunk_tokens=5)
            loss = total / n
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), [layer.lora_A.weight.grad.clone() for _, layer in lora_layers(model)]))
    assert int(n) == int((labels[:, 1:] != -100).sum()) == 17
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_full_logits_are_kept_for_backward():
    """What autograd saves during the chunked loss: no tensor with a vocabulary dimension (each chunk's logits
    are recomputed in backward); transformers' loss saves the full logits."""
    import transformers

    torch.manual_seed(0)
    vocab = 4001
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "vocab_size": vocab})).train()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    ids, mask, labels = _batch()
    with_vocab = {}
    for name, fn in (("ours", lambda: causal_lm_loss(model, ids, labels, mask, chunk_tokens=4)[0]),
                     ("transformers", lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().backward()
        with_vocab[name] = [s for s in shapes if vocab in s]
    assert with_vocab["ours"] == []
    assert max(torch.Size(s).numel() for s in with_vocab["transformers"]) == ids.numel() * vocab


def test_positions_without_a_target_and_empty_batches():
    head = torch.nn.Linear(6, 9, bias=False)
    h = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.full((2, 4), -100)
    total = chunked_cross_entropy(h, head, labels)
    assert total.item() == 0.0 and total.dtype == torch.float32
    total.backward()                                   # connected, zero gradient
    assert h.grad is not None and h.grad.abs().sum() == 0
    assert shifted_targets(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, -100]]


def test_bf16_model_loss_is_summed_in_float32():
    torch.manual_seed(0)
    model = _build("llama").to(torch.bfloat16)
    ids, mask, labels = _batch()
    total, n = causal_lm_loss(model, ids, labels, mask)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert total.dtype == torch.float32
    torch.testing.assert_close(total / n, ref.float(), rtol=1e-2, atol=1e-2)


def test_moe_router_loss_is_kept():
    """A Mixtral with output_router_logits adds its load-balancing loss to transformers' mean: not chunked, and
    the sum is transformers' loss times the count."""
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5))
    assert not chunkable(model)
    ids, mask, labels = _batch()
    with torch.no_grad():
        total, n = causal_lm_loss(model, ids, labels, mask)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss > 0
    torch.testing.assert_close(total / n, out.loss, rtol=1e-5, atol=1e-6)


def test_a_trainable_head_stays_connected_and_checkpointed():
    """Only the head trains (LoRA on lm_head): chunks are still checkpointed (no vocabulary-sized tensor saved),
    and a batch without a target still reaches the head's adapter (a zero gradient, not None: DDP's reducer)."""
    torch.manual_seed(0)
    model = _build("llama").train()
    inject_lora(model, LoRAConfig(r=4, target_modules=["lm_head"]))
    ids, mask, labels = _batch()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        causal_lm_loss(model, ids, labels, mask, chunk_tokens=4)[0].backward()
    assert not [s for s in shapes if model.config.vocab_size in s]
    model.zero_grad(set_to_none=True)
    total, n = causal_lm_loss(model, ids, torch.full_like(labels, -100), mask)
    total.backward()
    assert int(n) == 0 and total.item() == 0.0
    head = next(layer for name, layer in lora_layers(model) if name.endswith("lm_head"))
    assert head.lora_B.weight.grad is not None and head.lora_B.weight.grad.abs().sum() == 0
