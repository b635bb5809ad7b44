"""The causal LM loss as a sum over target tokens, without the full logits (chunked cross-entropy).

transformers' own loss materialises the logits of every position, upcast to float32 (for Llama-3's
128,256-token vocabulary at 2,048 tokens: 1 GiB, plus its gradient), although an instruction batch learns
only its answer tokens. `causal_lm_loss` runs the decoder, keeps the hidden states of the positions that
have a target (labels shifted by one, -100 ignored), and applies the output head to them a chunk at a time,
each chunk checkpointed: its float32 logits exist only while its loss (and, in backward, its gradient) is
computed. The sum equals transformers' loss times the target count (float32: within rounding), for the
model types in `CHUNKABLE_MODEL_TYPES`; other models compute their logits as usual and the same sum is
taken from them.

Returning a sum (not a mean) is what lets `CausalLM` weight every target token of an optimizer step the
same, whatever micro-batch or rank it is in (see `CausalLM.on_before_optimizer_step`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: label value that carries no loss (transformers' and `InstructionDataModule`'s convention)
IGNORE_INDEX = -100

#: transformers model types whose causal-LM forward computes `lm_head(decoder(...).last_hidden_state)`, then
#: (Gemma 2/3) `final_logit_softcapping`: the chunked loss equals their own. Others (e.g. Granite's
#: `logits_scaling`, Cohere's `logit_scale`) take their logits from their own forward.
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe",
                                   "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "smollm3"})

#: float32 logits elements per chunk (16 Mi elements: 64 MiB, e.g. 130 tokens of a 128,256-token vocabulary); a
#: chunk's backward holds about four such tensors (the head's output, its float32 copy, the log-softmax and its
#: gradient), so the loss adds about 256 MiB at its peak, whatever the sequence length
CHUNK_ELEMENTS = 16 * 1024 * 1024


def chunk_tokens_for(vocab_size: int) -> int:
    """Tokens per chunk so that a chunk's float32 logits stay near `CHUNK_ELEMENTS` (at least 64).

    Example:
        >>> chunk_tokens_for(128256), chunk_tokens_for(49152), chunk_tokens_for(10 ** 7)
        (130, 341, 64)
    """
    return max(64, CHUNK_ELEMENTS // max(int(vocab_size), 1))


def _chunk_loss_sum(head: torch.nn.Module, softcap: float | None, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of each position: the next position's label, -100 after the last one (transformers' shift).

    Example:
        >>> shifted_targets(torch.tensor([[-100, 5, 6], [7, -100, 8]])).tolist()
        [[5, 6, -100], [-100, 8, -100]]
    """
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                          softcap: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the target positions, the head applied a chunk at a time.

    Args:
        hidden: (batch, seq, hidden) last hidden states, any float dtype.
        head: the output layer (`lm_head`, possibly with a LoRA adapter): (n, hidden) -> (n, vocab).
        labels: (batch, seq) token ids, -100 where there is no loss (not shifted: as transformers takes them).
        softcap: Gemma 2/3's `final_logit_softcapping` (applied in the head's dtype, as they do).
        chunk_tokens: target positions per chunk; None: `chunk_tokens_for(vocab)`.

    Returns:
        A float32 scalar: the summed loss (0 when no position has a target). In grad mode every chunk is
        checkpointed, so only one chunk's logits are alive at a time, in forward and in backward.

    Example:
        >>> head = torch.nn.Linear(8, 11, bias=False)
        >>> h, labels = torch.randn(2, 5, 8), torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, -100]])
        >>> ours = chunked_cross_entropy(h, head, labels, chunk_tokens=2)
        >>> ref = F.cross_entropy(head(h)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        >>> torch.allclose(ours, ref)
        True
    """
    targets = shifted_targets(labels)
    keep = targets != IGNORE_INDEX
    h, y = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    if y.numel() == 0:
        # keeps the graph connected through the head too (DDP's reducer expects a gradient for a trainable head)
        return total + 0.0 * head(hidden[..., :1, :]).float().sum()
    step = chunk_tokens or chunk_tokens_for(getattr(head, "out_features", 0) or getattr(head, "num_embeddings", 0))
    use_checkpoint = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, y.numel(), step):
        args = (head, softcap, h[start:start + step], y[start:start + step])
        total = total + (checkpoint(_chunk_loss_sum, *args, use_reentrant=False) if use_checkpoint
                         else _chunk_loss_sum(*args))
    return total


def _fsdp2_sharded(model: torch.nn.Module) -> bool:
    """An FSDP2 (`fully_shard`) root: its parameters are gathered by the pre-forward hook of its own `forward`,
    which calling its decoder and head directly would skip."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def chunkable(model: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss` can run `model`'s decoder and head itself: its type is in
    `CHUNKABLE_MODEL_TYPES`, it has both, it adds no router loss (`output_router_logits`, MoE models) and it is
    not an FSDP2 root (`fully_shard`; those compute their own logits).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> chunkable(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                        num_attention_heads=2, vocab_size=32)))
        True
    """
    config = getattr(model, "config", None)
    prefix = getattr(model, "base_model_prefix", "")
    return (getattr(config, "model_type", None) in CHUNKABLE_MODEL_TYPES and prefix != ""
            and not getattr(config, "output_router_logits", False) and not _fsdp2_sharded(model)
            and isinstance(getattr(model, prefix, None), torch.nn.Module)
            and callable(getattr(model, "get_output_embeddings", None))
            and model.get_output_embeddings() is not None)


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   chunked: bool = True, chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(summed loss, number of target tokens)` of a transformers causal LM on one batch.

    Args:
        model: a transformers `...ForCausalLM` (with or without LoRA adapters).
        input_ids, labels: (batch, seq); labels -100 where there is no loss, unshifted.
        attention_mask: (batch, seq) or None; position_ids: (batch, seq) or None (packed batches restart
            them at 0 for every example).
        chunked: compute the loss a chunk at a time without the full logits (`chunked_cross_entropy`) when
            the model is `chunkable`; False, or another model type: from the model's own logits.
        chunk_tokens: see `chunked_cross_entropy`.

    Returns:
        The float32 summed loss (divide by the count for transformers' mean loss) and the int64 count.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                  num_attention_heads=2, vocab_size=32))
        >>> ids = torch.tensor([[3, 4, 5, 6]])
        >>> labels = torch.tensor([[-100, -100, 5, 6]])
        >>> total, n = causal_lm_loss(m, ids, labels)
        >>> int(n), torch.allclose(total / n, m(input_ids=ids, labels=labels).loss)
        (2, True)
    """
    n = (labels[..., 1:] != IGNORE_INDEX).sum()
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if chunked and chunkable(model):
        hidden = getattr(model, model.base_model_prefix)(**kwargs).last_hidden_state
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return chunked_cross_entropy(hidden, model.get_output_embeddings(), labels, softcap, chunk_tokens), n
    out = model(**kwargs)
    total = F.cross_entropy(out.logits.float().flatten(0, 1), shifted_targets(labels).flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    aux = getattr(out, "aux_loss", None)
    if aux is not None and getattr(model.config, "output_router_logits", False):
        # MoE router load-balancing loss, as transformers adds it to its mean loss (times the count: a sum)
        total = total + getattr(model.config, "router_aux_loss_coef", 0.0) * aux.float() * n
    return total, n
