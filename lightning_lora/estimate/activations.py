"""Activation memory of a training step: what autograd saves per decoder layer, and when the peak comes.

`_module_maps` reads each adapted or trainable linear of the model (`_Mod`: rank, sizes, 4-bit and DoRA
costs); `_layer_cost` follows what PyTorch saves for transformers' Llama layer; `_timeline` adds the head
and the loss and gives the bytes alive at the loss's backward and at the last and the first layer's
backward (with or without gradient checkpointing).

Example:
    >>> dora_norm_temp(4096, 4096, 8, 4, 2) // 2**20      # MiB for a Llama-3-8B q_proj
    320
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_lora.estimate.parameters import _Grads, _layer_index
from lightning_lora.estimate.quantize import dequant_transient
from lightning_lora.estimate.shapes import _Precision, _Shape
from lightning_lora.layers import LoRALayer
from lightning_lora.loss import chunk_tokens_for

#: Llama-style projection names -> the slot they take in the activation formula.
SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Mod:
    """One linear of a layer: trainable weight (full FT), adapter rank (LoRA), sizes, 4-bit and DoRA costs."""

    full: bool = False
    r: int = 0
    adapter_bytes: int = 4
    weight_numel: int = 0
    adapter_numel: int = 0
    in_features: int = 0
    out_features: int = 0
    weight_bytes: int = 2  # bytes per element of the base weight's dtype
    quant_temp: int = 0  # bytes allocated while its 4-bit weight is dequantised (0: not quantised)
    dora: bool = False
    frozen: int = 0  # frozen adapters of the same config on this linear, next to the trained one


@dataclass
class _LayerCost:
    saved: int  # bytes autograd saves for the layer (per token part times tokens, plus fixed)
    transient: int  # the layer's largest extra in backward (MLP: grad of the product and of both factors)
    out_grad: bool  # whether the layer's output needs grad


def dora_norm_temp(in_features: int, out_features: int, r: int, adapter_bytes: int, weight_bytes: int,
                   quant_temp: int = 0) -> int:
    """Bytes allocated by one DoRA layer's weight norm in a forward (PEFT's `DoraLinearLayer.forward`).

    `lora_B(lora_A(eye(in)))` keeps the identity (in x in), A's output (in x r) and the product
    (in x out, adapter dtype) alive through the forward; the base weight is cast to the adapter
    dtype (when it differs; a 4-bit weight is dequantised first); `W + scaling * B A` makes two
    out x in temporaries before the row norms.

    Example:
        >>> dora_norm_temp(4096, 4096, 8, 4, 2) // 2**20      # MiB for a Llama-3-8B q_proj
        320
    """
    a = adapter_bytes
    temp = in_features * in_features * a + in_features * r * a + in_features * out_features * a
    if weight_bytes != a or quant_temp:
        temp += out_features * in_features * a + quant_temp
    return temp + 2 * out_features * in_features * a


def _layer_cost(sh: _Shape, pr: _Precision, mods: dict[str, _Mod], in_grad: bool, norms_trainable: bool,
                seq: int, tokens: int) -> _LayerCost:
    """What one decoder layer costs in activations.

    Follows what PyTorch saves for transformers' Llama layer (each op saves only what the gradients
    that are needed require): RMSNorm keeps its input in fp32, SDPA its q, k, v, output and
    log-sum-exp, the gated MLP its three intermediate tensors, a trainable linear its input, an
    adapter its input (our fused adapter keeps the 16-bit input itself for fp32 adapters) and A's
    output; under autocast every linear whose input needs grad keeps a 16-bit copy of its weight.
    DoRA keeps the base and the adapter output per adapted layer; dequantising a 4-bit weight and
    DoRA's weight norm are transients of the layer's forward (recomputed in backward with
    checkpointing) and backward.

    Frozen adapters next to the trained one (`_Mod.frozen`) run too, and keep what a frozen weight keeps:
    nothing for their own gradient. Without autocast (our fused adapter, `FusedLoRA`) each keeps its small
    A output (r columns) like the trained one, counted whenever the layer's graph is recorded (an upper
    bound); under autocast (the `lora_B(lora_A(x))` modules) each keeps only its 16-bit A and B copies when
    the input needs grad; DoRA's frozen adapters keep no outputs (their magnitude takes no gradient) and
    compute their weight norm one at a time (the transient stays the largest one).
    """
    c, resid, h, i = pr.compute, pr.resid, sh.hidden, sh.intermediate
    tok = 0
    fixed = 0

    def norm(x_grad: bool) -> bool:
        nonlocal tok
        if x_grad:
            tok += 4 * h + 4  # fp32 input (a copy unless already fp32) and rsqrt
        if norms_trainable:
            tok += resid * h  # normalised input, kept for the weight's gradient
        return x_grad or norms_trainable

    def consumers(names: Sequence[str], src_bytes: int, dim: int, src_grad: bool,
                  already_saved: bool) -> tuple[bool, int]:
        """The linears reading one tensor: (whether an output needs grad, bytes per token they save)."""
        nonlocal tok, fixed
        before = tok
        shared = already_saved
        out_grad = src_grad
        for name in names:
            m = mods.get(name, _Mod())
            if pr.mixed:
                if src_grad:  # the 16-bit weight copies kept for the input's gradient (frozen adapters' too)
                    fixed += 2 * m.weight_numel + (2 * m.adapter_numel * (1 + m.frozen) if m.r else 0)
                elif m.r:  # lora_B's input (A's output) needs grad
                    fixed += 2 * (m.adapter_numel - m.r * dim)
                if m.full or m.r:
                    if src_bytes == 4:
                        tok += 2 * dim  # each autocast linear makes and keeps its own cast
                    elif not shared:
                        tok += src_bytes * dim
                        shared = True
                if m.r:
                    tok += 2 * m.r
            else:
                if (m.full or m.r) and not shared:
                    # a trainable weight keeps its input; so does an adapter: the addmm path (adapter dtype =
                    # input dtype) through F.linear, the fused path (fp32 adapters, 16-bit input) itself
                    tok += src_bytes * dim
                    shared = True
                if m.r:
                    tok += m.adapter_bytes * m.r  # A's output, kept by B
                if m.r and not m.dora:
                    tok += m.frozen * m.adapter_bytes * m.r  # each frozen adapter's A output (FusedLoRA keeps it)
            if m.r and m.dora:  # DoRA: the base output and the adapter output, kept for the magnitude's gradient
                tok += (2 if pr.mixed else c) * m.out_features + (2 if pr.mixed else m.adapter_bytes) * m.out_features
            out_grad = out_grad or m.full or m.r > 0
        return out_grad, tok - before

    y_grad = norm(in_grad)
    attn_grad, _ = consumers(["q_proj", "k_proj", "v_proj"], resid, h, y_grad, False)
    if attn_grad:
        if sh.attn == "eager":
            grouped = sh.kv_heads < sh.heads
            kv = sh.q_dim if grouped else sh.kv_dim
            tok += c * sh.q_dim + 2 * c * kv + 4 * sh.heads * seq + (2 * sh.heads * seq if c == 2 else 0)
        else:  # sdpa (flash / memory-efficient): q, k, v, output, log-sum-exp
            tok += c * (2 * sh.q_dim + 2 * sh.kv_dim) + 4 * sh.heads
    o_grad, _ = consumers(["o_proj"], c, sh.q_dim, attn_grad, already_saved=attn_grad and sh.attn != "eager")
    x2_grad = in_grad or o_grad
    y2_grad = norm(x2_grad)
    g_grad, _ = consumers(["gate_proj", "up_proj"], resid, h, y2_grad, False)
    if g_grad:
        tok += 3 * c * i  # gate output (silu), silu output and up output (their product)
    down_grad, down_in = consumers(["down_proj"], c, i, g_grad, False)
    fixed_transient = 0
    for name, m in mods.items():
        if name not in SLOTS and m.r:  # adapted modules of other names: an input copy each (conservative)
            tok += m.adapter_bytes * (h + m.r * (1 + m.frozen))
        if m.quant_temp:  # its forward dequantises while its input is alive (a frozen linear does not save it)
            src = resid if name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") else c
            fixed_transient = max(fixed_transient, m.quant_temp + src * m.in_features * tokens)
        if m.r and m.dora:
            fixed_transient = max(fixed_transient, dora_norm_temp(m.in_features, m.out_features, m.r,
                                                                  m.adapter_bytes, m.weight_bytes, m.quant_temp))
    # backward through the MLP: d(product) and d(both factors) at once, while the product's own
    # saved input is already freed; plus the incoming gradient of the layer output
    transient = (3 * c * i - down_in) if g_grad else 0
    down = mods.get("down_proj")
    if down is not None and down.r and not pr.mixed and down.adapter_bytes != c:
        # the fused adapter's backward: the incoming gradient in the adapter dtype, the input cast again
        # for A's gradient, then the input's gradient in the adapter dtype and cast back
        transient = max(transient, down.adapter_bytes * (h + i) + c * i)
    transient_bytes = max(transient * tokens, fixed_transient) + resid * h * tokens
    return _LayerCost(tok * tokens + fixed, transient_bytes, x2_grad or down_grad)


@dataclass
class _Timeline:
    """Activation and gradient bytes alive at the moments of a step where the peak can be."""

    activations: int  # the activation peak (no gradients yet)
    with_gradients: int  # activations + gradients alive at once (first / last layer's backward)


def _timeline(sh: _Shape, pr: _Precision, layer_mods: list[dict[str, _Mod]], head: _Mod, embed_grad: bool,
              full: bool, batch: int, seq: int, checkpointing: bool, grads: _Grads,
              chunked_loss: bool = False) -> _Timeline:
    """Activation bytes over one step: at the loss's backward, and in the last and first layer's backward.

    With `chunked_loss` (`lightning_lora.loss`, `CausalLM`'s default) nothing of vocabulary size is kept:
    the hidden states of the target positions (counted as every position) are gathered and kept, and the loss's
    backward holds one chunk's logits: the head's output in the compute dtype, its float32 copy, the
    log-softmax and its gradient (float32)."""
    n = batch * seq
    layers: list[_LayerCost] = []
    grad = embed_grad
    for mods in layer_mods:
        cost = _layer_cost(sh, pr, mods, grad, full, seq, n)
        grad = cost.out_grad
        layers.append(cost)
    # head: final RMSNorm, lm_head's input, the loss (fp32 log-probs saved), labels, embedding indices
    head_tok = (4 * sh.hidden + 4 if grad else 0) + (pr.resid * sh.hidden if full else 0)
    if head.full or head.r:
        head_tok += (2 if pr.mixed else (head.adapter_bytes if head.r else pr.resid)) * sh.hidden
        head_tok += head.adapter_bytes * head.r
    if head.r and not head.dora and not pr.mixed:
        head_tok += head.frozen * head.adapter_bytes * head.r  # frozen adapters' A outputs (FusedLoRA)
    if head.r and head.dora:
        head_tok += (2 if pr.mixed else pr.compute) * sh.vocab + (2 if pr.mixed else head.adapter_bytes) * sh.vocab
    if chunked_loss:
        head_tok += pr.resid * sh.hidden + 8 + (8 if full else 0)  # gathered target hidden states, targets
        chunk = min(n, chunk_tokens_for(sh.vocab))
        loss_transient = chunk * sh.vocab * ((pr.compute if pr.compute < 4 else 0) + 12)
    else:
        head_tok += 4 * sh.vocab + 8 + (8 if full else 0)
        loss_transient = 8 * sh.vocab * n  # backward: fp32 grad of the log-probs and of the logits
    fixed = 2 * head.weight_numel if pr.mixed else 0  # lm_head's 16-bit copy under autocast
    fixed += 2 * seq * sh.head_dim * pr.resid  # rotary cos/sin, shared by all layers
    head_temp = head.quant_temp
    if head.r and head.dora:
        head_temp = max(head_temp, dora_norm_temp(head.in_features, head.out_features, head.r, head.adapter_bytes,
                                                  head.weight_bytes, head.quant_temp))
    loss_transient += head_temp  # lm_head's backward dequantises its 4-bit weight (or DoRA's norm, recomputed)
    if not layers:
        return _Timeline(head_tok * n + fixed + loss_transient, head_tok * n + fixed + loss_transient)
    first, last = layers[0], layers[-1]
    if checkpointing:  # only layer inputs are kept; backward recomputes one layer at a time
        one_input = pr.resid * sh.hidden * n
        kept = len(layers) * one_input
        at_loss = kept + head_tok * n + fixed + loss_transient
        at_last = kept + fixed + last.saved + last.transient
        at_first = one_input + fixed + first.saved + first.transient
    else:
        kept = sum(cost.saved for cost in layers)
        at_loss = kept + head_tok * n + fixed + loss_transient
        at_last = kept + fixed + last.transient
        at_first = first.saved + fixed + first.transient
    return _Timeline(activations=max(at_loss, at_last),
                     with_gradients=max(at_last + grads.head, at_first + grads.total - grads.first_layer - grads.embed))


def _module_maps(model: torch.nn.Module, sh: _Shape, pr: _Precision, full: bool, quantized: dict[int, str],
                 dora: bool, frozen_adapters: int = 0) -> tuple[list[dict[str, _Mod]], _Mod, bool]:
    """Per layer: projection name -> _Mod; the lm_head's _Mod; whether the embedding output needs grad.
    `frozen_adapters`: how many frozen adapters of the same config sit on each adapted linear."""
    layers: list[dict[str, _Mod]] = [{} for _ in range(sh.layers)]
    head = _Mod()
    embed_grad = full
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        is_lora = isinstance(module, LoRALayer)
        if not (is_lora or isinstance(module, torch.nn.Linear)) or (is_lora and module.peft_layer_type == "param"):
            continue  # parameter adapters (target_parameters) cost their W + delta (`parameters._effective_weights`)
        weight = module.weight
        out_f, in_f = (int(weight.shape[0]), int(weight.shape[-1])) if weight.dim() == 2 else (weight.numel(), 1)
        mod = _Mod(full=full, weight_numel=weight.numel(), in_features=in_f, out_features=out_f,
                   weight_bytes=weight.element_size())
        if is_lora:
            mod.r = module.r
            mod.adapter_bytes = module.lora_A.weight.element_size()
            mod.adapter_numel = module.lora_A.weight.numel() + module.lora_B.weight.numel()
            mod.in_features, mod.out_features = type(module).features(module)
            mod.dora = dora
            mod.frozen = frozen_adapters
        if id(weight) in quantized:
            mod.quant_temp = dequant_transient(quantized[id(weight)], weight.numel(), weight.element_size(),
                                               pr.compute)
        if module is out_emb or name.rsplit(".", 1)[-1] == "lm_head":
            head = mod
            continue
        if module is in_emb:
            embed_grad = embed_grad or bool(mod.r)
            continue
        idx = _layer_index(name)
        if idx is not None and idx < sh.layers:
            layers[idx][name.rsplit(".", 1)[-1]] = mod
    if in_emb is not None and isinstance(in_emb, LoRALayer):
        embed_grad = True
    return layers, head, embed_grad



__all__ = ["SLOTS", "dora_norm_temp"]
