"""The model builders of the conformance matrix (`tests/test_conformance.py`): tiny models built in code.

Each `Builder` makes the same fp32 model (eval mode) for the same seed, gives a fixed input and runs the model
on it, returning one tensor (logits, plus the last hidden state for classifiers, whose logits are few).

Example:
    >>> out = BUILDERS["mlp"].run(BUILDERS["mlp"].make(), BUILDERS["mlp"].inputs())
    >>> tuple(out.shape)
    (4, 16)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64, pad_token_id=0)


@dataclass(frozen=True)
class Builder:
    """A tiny model family.

    Attributes:
        name: the family (`llama`, `gpt2`, ...).
        factory: builds the model; called under `torch.manual_seed(seed)`.
        vocab: token ids of `inputs()` are drawn from `[1, vocab)`; 0: the input is a float tensor of `features`.
        features: width of a float input.
        peft_task_type: PEFT's `task_type` for this family (None: a plain module).
        hidden: also return the last hidden state (classifiers).
        shape: the float input's shape when it is not `(4, features)` (conv models: `(batch, channels, *spatial)`).
    """

    name: str
    factory: Callable[[], nn.Module]
    vocab: int = 0
    features: int = 0
    peft_task_type: str | None = None
    hidden: bool = False
    shape: tuple[int, ...] = ()

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory().eval()

    def inputs(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        if self.vocab:
            ids = torch.randint(1, self.vocab, (2, 8), generator=gen)
            if self.name == "emb":  # the plain embedding's padding index is among its inputs
                ids[:, 0] = 0
            return ids
        return torch.randn(self.shape or (4, self.features), generator=gen)

    @torch.no_grad()
    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward(model, x)

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`run` with autograd (a training step)."""
        if not self.vocab:  # a float input in the dtype of the model's first dense parameter, as a user would feed it
            return model(x.to(next(p.dtype for p in model.parameters() if type(p) is nn.Parameter)))
        if self.name == "emb":
            return model(x)
        if self.hidden:
            out = model(input_ids=x, output_hidden_states=True)
            return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])
        return model(input_ids=x).logits


def _llama(**overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides}))


def _llama_cls() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=3))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                                      eos_token_id=0))


def _bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                                                    num_labels=2))


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                    vocab_size=100, max_position_embeddings=32, word_embed_proj_dim=32,
                                    pad_token_id=1))


def _mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(width, 2 * width), act=nn.ReLU(), fc2=nn.Linear(2 * width, width)))


def _emb() -> nn.Module:
    return nn.Sequential(OrderedDict(emb=nn.Embedding(50, 16, padding_idx=0), fc=nn.Linear(16, 16)))


def _conv(dim: int) -> nn.Module:
    """conv (4 -> 8, kernel 3, stride 2, padding 1, bias) -> ReLU -> conv (8 -> 6, kernel 1, no bias) (issue 22)."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return nn.Sequential(OrderedDict(c1=conv(4, 8, 3, stride=2, padding=1), act=nn.ReLU(),
                                     c2=conv(8, 6, 1, bias=False)))


def _qwen3_moe() -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, pad_token_id=0))


def _gpt_oss() -> nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    return GptOssForCausalLM(GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2, max_position_embeddings=32, pad_token_id=0))


class _Attention(nn.Module):
    """Self-attention (`nn.MultiheadAttention`, batch_first) and a Linear head; a (4, 16) input is 2 sequences of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(2, 2, 16)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out.contiguous()).view(4, 16)


BUILDERS: dict[str, Builder] = {b.name: b for b in [
    Builder("llama", _llama, vocab=128, peft_task_type="CAUSAL_LM"),
    Builder("llama-bias", lambda: _llama(attention_bias=True, mlp_bias=True), vocab=128, peft_task_type="CAUSAL_LM"),
    Builder("llama-cls", _llama_cls, vocab=128, peft_task_type="SEQ_CLS", hidden=True),
    Builder("gpt2", _gpt2, vocab=100, peft_task_type="CAUSAL_LM"),
    Builder("bert-cls", _bert_cls, vocab=100, peft_task_type="SEQ_CLS", hidden=True),
    Builder("opt", _opt, vocab=100, peft_task_type="CAUSAL_LM"),
    Builder("mlp", _mlp, features=16),
    Builder("mlp64", lambda: _mlp(64), features=64),
    Builder("emb", _emb, vocab=50),
    # --- conv (issue 22)
    Builder("conv1d", lambda: _conv(1), features=4, shape=(2, 4, 9)),
    Builder("conv2d", lambda: _conv(2), features=4, shape=(2, 4, 7, 6)),
    Builder("conv3d", lambda: _conv(3), features=4, shape=(2, 4, 5, 4, 5)),
    # --- MoE models with fused expert parameters (issue 22: target_parameters)
    Builder("qwen3-moe", _qwen3_moe, vocab=64, peft_task_type="CAUSAL_LM"),
    Builder("gpt-oss", _gpt_oss, vocab=64, peft_task_type="CAUSAL_LM"),
    # --- nn.MultiheadAttention (issue 22)
    Builder("attn", _Attention, features=16),
]}
