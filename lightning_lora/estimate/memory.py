"""The memory model: bytes per part of a training step, for a full fine-tune, LoRA and QLoRA.

The model is built on the `meta` device (`models.build_meta_model`), LoRA is injected there with
`inject_lora`, and the parameters are counted exactly. Memory is modelled per part:

* **weights**: every parameter in its real dtype (`bf16-true`: bf16 base, LoRA adapters fp32;
  `32-true` / `*-mixed`: fp32); with `quantize` the frozen weights of the chosen linear layers as
  4-bit codes plus scales (`quantize.py` counts torchao's and bitsandbytes' layouts exactly).
* **gradients**: trainable parameters only, in their dtype.
* **optimizer state**: what `torch.optim` allocates: AdamW two moments per trainable parameter in the
  parameter's dtype (so fp32 for adapters and for mixed precision, bf16 for a `bf16-true` full
  fine-tune), SGD none (with momentum one buffer), 8-bit AdamW about 2 bytes.
* **activations**: what autograd saves for backward in a Llama-style decoder (hidden, intermediate,
  heads, kv heads, vocab, batch, seq), tensor by tensor: the fp32 copies RMSNorm makes, q/k/v/out of
  SDPA, the MLP, the inputs of trainable layers (for LoRA with fp32 adapters on a 16-bit base: the
  16-bit input itself, shared by the adapters that read it, and A's fp32 output), the bf16 weight
  copies autocast keeps under `*-mixed`, and the loss: fp32 log-probabilities saved plus the fp32
  gradient of the logits and of the log-softmax in backward (12 bytes per token per vocabulary
  entry, which dominates for a large vocabulary at long sequences). With gradient checkpointing only
  each layer's input is kept, plus one layer recomputed in backward. A 4-bit weight is dequantised
  for each matmul (a transient); DoRA keeps the base output and the adapter output of every adapted
  layer for the magnitude's gradient and computes a weight norm per layer in each forward (PEFT's
  `DoraLinearLayer`: `lora_B(lora_A(eye(in)))`, then `||W + s B A||` per output row).
* **total** is the *peak*: weights + optimizer state + the most that activations and gradients hold
  at once. Backward frees activations while it fills gradients, so the candidates are the loss's
  backward (all activations), the last and the first layer's backward (activations left plus
  gradients so far) and the optimizer step (all gradients plus the step's temporaries).
* **several GPUs** (`sharding.py`): per device. FSDP divides weights, gradients and optimizer state
  into dim-0 shards and adds the all-gathered units in flight; DDP adds its gradient buckets.

Measured against real training steps (see `benchmarks/estimate_accuracy.md`).

Example:
    >>> est = estimate_memory("llama-3-8b", r=8, target_modules=["q_proj", "v_proj"])
    >>> est.lora.trainable_params, est.full.trainable_params
    (3407872, 8030261248)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.estimate.models import build_meta_model, load_model_config
from lightning_lora.estimate.quantize import (
    QUANTIZE,
    QUANTIZE_MODULES,
    QuantLayout,
    dequant_transient,
    nf4_quantizable,
    quant_layout,
)
from lightning_lora.estimate.report import Estimate, MemoryBreakdown
from lightning_lora.estimate.sharding import Layout, in_flight, shard_bytes
from lightning_lora.loss import chunk_tokens_for
from lightning_lora.surgery import (
    count_parameters,
    inject_lora,
    lora_layers,
    parameter_summary,
)

PRECISIONS = ("bf16-true", "bf16-mixed", "16-true", "16-mixed", "32-true")
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adamw8bit")
OPTIMIZER_IMPLS = ("foreach", "for-loop", "fused")
#: Llama-style projection names -> the slot they take in the activation formula.
SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------- the shapes
@dataclass
class _Shape:
    """The numbers of a Llama-style decoder that activation memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attn: str

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _shape_of(config: Any) -> _Shape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        if default is None:
            raise LoRAError(f"model config ({getattr(text, 'model_type', '?')}) has none of {names}; the estimate "
                            "needs a decoder-only (Llama-style) transformers config.")
        return default

    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    return _Shape(hidden=hidden, intermediate=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
                  layers=int(get("num_hidden_layers", "n_layer")), heads=heads,
                  kv_heads=int(get("num_key_value_heads", default=heads)),
                  head_dim=int(getattr(text, "head_dim", None) or hidden // heads), vocab=int(get("vocab_size")),
                  tied=bool(getattr(config, "tie_word_embeddings", False)),
                  attn=str(getattr(config, "_attn_implementation", None) or "sdpa"))


@dataclass
class _Precision:
    param: torch.dtype  # dtype of the base weights
    compute: int  # bytes of matmul outputs (q, k, v, MLP)
    resid: int  # bytes of the residual stream / RMSNorm outputs
    mixed: bool  # autocast: linear inputs and weights cast to 16 bit per use


def _precision(name: str) -> _Precision:
    if name == "32-true":
        return _Precision(torch.float32, 4, 4, False)
    if name == "bf16-true":
        return _Precision(torch.bfloat16, 2, 2, False)
    if name == "16-true":
        return _Precision(torch.float16, 2, 2, False)
    if name in ("bf16-mixed", "16-mixed"):
        return _Precision(torch.float32, 2, 4, True)
    raise LoRAError(f"precision={name!r} is not supported; expected one of {', '.join(PRECISIONS)}.")


# ---------------------------------------------------------------------------- parameters per rank
@dataclass
class _Param:
    """One parameter as the memory model sees it (tied parameters once)."""

    numel: int
    elem: int  # bytes per element (of its dtype)
    trainable: bool
    rows: int  # size of dim 0 (FSDP shards along it)
    unit: str  # FSDP unit: "embed", "head", "layer.<i>" or "root"
    place: str  # for the gradient timeline: "first_layer", "head", "embed" or "layer"
    quant: QuantLayout | None = None

    def stored(self, layout: Layout) -> int:
        """Bytes this rank stores."""
        if self.quant is not None:
            return self.quant.per_rank(layout.world_size)
        return shard_bytes(self.numel, self.rows, self.elem, layout.world_size)

    @property
    def unsharded(self) -> int:
        return self.quant.total if self.quant is not None else self.numel * self.elem


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for j, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[j + 1].isdigit():
            return int(parts[j + 1])
    return None


def _place(name: str, is_embed: bool, is_head: bool, tied: bool) -> tuple[str, str]:
    """`(FSDP unit, gradient-timeline place)` of a parameter."""
    idx = _layer_index(name)
    if idx is not None:
        return f"layer.{idx}", "first_layer" if idx == 0 else "layer"
    if is_head:  # a tied embedding/head weight lives in the root unit (FSDP needs tied weights in one unit)
        return ("root" if tied else "head"), "head"
    if is_embed:
        return "embed", "embed"
    return "root", "head"  # final norm


def _inventory(model: torch.nn.Module) -> tuple[dict[int, _Param], int]:
    """Every parameter (by id) as a `_Param`, and the bytes of the buffers (replicated)."""
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_ids = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    params: dict[int, _Param] = {}
    for name, p in model.named_parameters():
        is_head, is_embed = id(p) in head_ids, id(p) in embed_ids
        unit, place = _place(name, is_embed, is_head, tied=is_head and is_embed)
        params[id(p)] = _Param(numel=p.numel(), elem=p.element_size(), trainable=p.requires_grad,
                               rows=int(p.shape[0]) if p.dim() else 1, unit=unit, place=place)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


@dataclass
class _Grads:
    total: int = 0
    head: int = 0  # lm_head and final norm (tied: the shared embedding)
    first_layer: int = 0
    embed: int = 0  # an untied input embedding (its gradient comes last)


def _grads(params: Sequence[_Param], layout: Layout) -> _Grads:
    out = _Grads()
    for p in params:
        if not p.trainable:
            continue
        size = p.stored(layout)
        out.total += size
        if p.place == "first_layer":
            out.first_layer += size
        elif p.place == "head":
            out.head += size
        elif p.place == "embed":
            out.embed += size
    return out


def _optimizer_bytes(optimizer: str, params: Sequence[_Param], layout: Layout) -> int:
    total = 0
    for p in params:
        size = p.stored(layout)
        if optimizer == "adamw":
            total += 2 * size
        elif optimizer == "sgd-momentum":
            total += size
        elif optimizer == "adamw8bit":  # bitsandbytes: 8-bit states (+ fp32 absmax per 256) from 4096 elements
            numel = size // p.elem
            total += 2 * numel + 2 * 4 * -(-numel // 256) if numel >= 4096 else 8 * numel
    return total


def _step_temp(optimizer: str, impl: str, params: Sequence[_Param], layout: Layout) -> int:
    if optimizer != "adamw" or impl == "fused" or not params:
        return 0
    if impl == "foreach":  # _foreach_sqrt(exp_avg_sqs): one list the size of a moment
        return sum(p.stored(layout) for p in params)
    return 2 * max(p.stored(layout) for p in params)  # sqrt() and the division, per tensor


# ------------------------------------------------------------------------------------ activations
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
                if src_grad:  # the 16-bit weight copies kept for the input's gradient
                    fixed += 2 * m.weight_numel + (2 * m.adapter_numel if m.r else 0)
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
            tok += m.adapter_bytes * (h + m.r)
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
                 dora: bool) -> tuple[list[dict[str, _Mod]], _Mod, bool]:
    """Per layer: projection name -> _Mod; the lm_head's _Mod; whether the embedding output needs grad."""
    from lightning_lora.layers import LoRALayer

    layers: list[dict[str, _Mod]] = [{} for _ in range(sh.layers)]
    head = _Mod()
    embed_grad = full
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        is_lora = isinstance(module, LoRALayer)
        if not (is_lora or isinstance(module, torch.nn.Linear)):
            continue
        weight = module.weight
        out_f, in_f = (int(weight.shape[0]), int(weight.shape[-1])) if weight.dim() == 2 else (weight.numel(), 1)
        mod = _Mod(full=full, weight_numel=weight.numel(), in_features=in_f, out_features=out_f,
                   weight_bytes=weight.element_size())
        if is_lora:
            mod.r = module.r
            mod.adapter_bytes = module.lora_A.weight.element_size()
            mod.adapter_numel = module.lora_A.weight.numel() + module.lora_B.weight.numel()
            mod.out_features, mod.in_features = int(module.lora_B.weight.shape[0]), int(module.lora_A.weight.shape[1])
            mod.dora = dora
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


# ------------------------------------------------------------------------------- 4-bit and DoRA
def _quantized_weights(model: torch.nn.Module, method: str, modules: str) -> tuple[dict[int, str], list[str]]:
    """`{id(weight): method}` of the linear weights stored in 4 bits, and the names that cannot be.

    `adapted`: the base weight of every adapted `nn.Linear`; `all-linear`: also every other
    `nn.Linear` except the output head. Adapter matrices, embeddings and GPT-2 `Conv1D` weights stay
    in their dtype.
    """
    from lightning_lora.layers import LoRALayer, LoRALinear

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen: dict[int, str] = {}
    skipped: list[str] = []
    adapters = tuple(f"{name}." for name, _ in lora_layers(model))
    for name, module in model.named_modules():
        if adapters and name.startswith(adapters):
            continue  # lora_A / lora_B: trainable, never quantised
        adapted = isinstance(module, LoRALinear)
        if isinstance(module, LoRALayer) and not adapted:
            continue  # adapted embeddings / Conv1D keep their weight
        if not (adapted or isinstance(module, torch.nn.Linear)):
            continue
        is_head = module is out_emb or name.rsplit(".", 1)[-1] == "lm_head"
        if not adapted and (modules == "adapted" or is_head):
            continue  # all-linear: every linear layer except the output head (as PEFT and bitsandbytes)
        if method == "nf4" and not nf4_quantizable(module.weight.numel()):
            skipped.append(name)
            continue
        chosen[id(module.weight)] = method
    return chosen, skipped


def _dora_magnitudes(model: torch.nn.Module) -> list[_Param]:
    """DoRA's magnitude vector of every adapted linear layer: one parameter per output feature, in the
    adapter dtype, trainable.

    Counted from the adapted layers' shapes, so it does not need `LoRAConfig(use_dora=True)`; a layer
    that already carries its magnitude parameter (a `...magnitude...` parameter) is not counted twice.
    """
    from lightning_lora.layers import LoRAEmbedding

    extra: list[_Param] = []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, layer in lora_layers(model):
        if isinstance(layer, LoRAEmbedding):
            raise LoRAError(f"use_dora=True: {name} is an Embedding; DoRA is estimated for Linear and Conv1D "
                            "adapters only. Leave the embedding out of target_modules.")
        if any("magnitude" in n for n, _ in layer.named_parameters()):
            continue
        out = int(layer.lora_B.weight.shape[0])
        is_head = layer is out_emb or name.rsplit(".", 1)[-1] == "lm_head"
        unit, place = _place(name + ".lora_magnitude_vector", False, is_head, tied=False)
        extra.append(_Param(numel=out, elem=layer.lora_A.weight.element_size(), trainable=True, rows=out,
                            unit=unit, place=place))
    return extra


# ---------------------------------------------------------------------------------- the breakdown
def _fsdp_in_flight(params: Sequence[_Param], n_layers: int) -> int:
    unsharded: dict[str, int] = {}
    grads: dict[str, int] = {}
    for p in params:
        unsharded[p.unit] = unsharded.get(p.unit, 0) + p.unsharded
        if p.trainable:
            grads[p.unit] = grads.get(p.unit, 0) + p.numel * p.elem
    order = ["embed", *(f"layer.{i}" for i in range(n_layers)), "head"]
    return in_flight(order, unsharded, unsharded.pop("root", 0), grads)


def _breakdown(model: torch.nn.Module, sh: _Shape, pr: _Precision, *, is_full: bool, batch_size: int, seq_len: int,
               checkpointing: bool, optimizer: str, optimizer_impl: str, layout: Layout, chunked_loss: bool = False,
               quantized: dict[int, str] | None = None, dora: bool = False) -> MemoryBreakdown:
    quantized = quantized or {}
    by_id, buffers = _inventory(model)
    for pid, method in quantized.items():
        p = by_id[pid]
        p.quant = quant_layout(method, p.numel, p.elem)
    magnitudes = _dora_magnitudes(model) if dora else []
    params = [*by_id.values(), *magnitudes]
    trainable_params = [p for p in params if p.trainable]
    grads = _grads(params, layout)
    layers, head, embed_grad = _module_maps(model, sh, pr, is_full, quantized, dora)
    timeline = _timeline(sh, pr, layers, head, embed_grad, is_full, batch_size, seq_len, checkpointing, grads,
                         chunked_loss)
    step_temp = _step_temp(optimizer, optimizer_impl, trainable_params, layout)
    if sh.tied and is_full:  # autograd adds the embedding's gradient to lm_head's: both, then their sum
        emb = model.get_input_embeddings().weight
        step_temp = max(step_temp, 2 * shard_bytes(emb.numel(), emb.shape[0], emb.element_size(),
                                                   layout.world_size))
    trainable, total = count_parameters(model)
    magnitude_count = sum(p.numel for p in magnitudes)
    communication = 0
    if layout.strategy == "fsdp":
        communication = _fsdp_in_flight(params, sh.layers)
    elif layout.strategy == "ddp":
        communication = grads.total  # the gradient buckets, a second copy of every gradient
    part = MemoryBreakdown(
        trainable_params=trainable + magnitude_count, total_params=total + magnitude_count,
        weights=sum(p.stored(layout) for p in params) + buffers, gradients=grads.total,
        optimizer=_optimizer_bytes(optimizer, trainable_params, layout), activations=timeline.activations,
        optimizer_step_temp=step_temp, total=0,
        quantized_weights=sum(p.stored(layout) for p in params if p.quant is not None),
        dequant_temp=max([head.quant_temp] + [m.quant_temp for mods in layers for m in mods.values()]),
        magnitude_params=magnitude_count, communication=communication)
    in_step = part.gradients + step_temp
    if layout.strategy == "ddp":
        in_step += communication  # buckets live for the whole run; FSDP's units are resharded by the step
    part.total = part.weights + part.optimizer + max(timeline.activations + communication,
                                                     timeline.with_gradients + communication, in_step)
    return part


def estimate_memory(
    config_or_name: Any,
    *,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    precision: str = "bf16-true",
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    optimizer_impl: str = "foreach",
    adapter_dtype: str | None = "float32",
    quantize: str | None = None,
    quantize_modules: str | None = None,
    use_dora: bool = False,
    devices: int = 1,
    strategy: str = "auto",
    chunked_loss: bool = False,
) -> Estimate:
    """Parameters and peak training memory of a full fine-tune, LoRA and (with `quantize`) QLoRA.

    Args:
        config_or_name: a shipped name (`llama-3-8b`, `llama-3-70b`, `llama-3.2-1b`, `mistral-7b`,
            `qwen2.5-7b`, `smollm2-135m`, `smollm2-135m-instruct`; case-insensitive), a model
            directory, a config.json path, a transformers config or a config dict.
        r: LoRA rank.
        alpha: LoRA alpha (does not change memory; kept for the record).
        target_modules: module names, one regex, or `"all-linear"` (as `LoRAConfig`).
        precision: Lightning precision: `bf16-true`, `bf16-mixed`, `16-true`, `16-mixed`, `32-true`.
        batch_size: sequences per step (per device).
        seq_len: tokens per sequence.
        gradient_checkpointing: keep only layer inputs, recompute one layer at a time in backward.
        optimizer: `adamw` (2 moments), `sgd` (none), `sgd-momentum` (1 buffer), `adamw8bit`
            (bitsandbytes, about 2 bytes per parameter; not measured).
        optimizer_impl: `torch.optim` code path: `foreach` (the default on CUDA: one moment-sized
            temporary in `step()`), `for-loop` (the default on CPU: two temporaries the size of the
            largest tensor), `fused` (none).
        adapter_dtype: dtype of the LoRA matrices (`LoRAConfig.adapter_dtype`, fp32 by default).
        quantize: `None`, `"nf4"` (torchao `to_nf4`) or `"bnb-nf4"` (bitsandbytes `Params4bit`, double
            quantisation): adds a QLoRA column (`Estimate.qlora`) whose frozen linear weights are 4-bit.
        quantize_modules: `"all-linear"` (the default with `quantize`, as `LoRAConfig` does: every
            linear layer except the output head, QLoRA's whole frozen base) or `"adapted"` (the adapted
            linear layers' weights only).
        use_dora: the adapters are DoRA: one trainable magnitude per output feature of every adapted
            layer (adapter dtype), the base and adapter outputs kept for backward, and the weight norm
            computed in each forward (PEFT's algorithm).
        devices: GPUs in the run; every number is then per GPU.
        strategy: `"auto"` (one device, or DDP when `devices > 1`), `"ddp"` or `"fsdp"` (FSDP2 shards).
        chunked_loss: the loss as `CausalLM` computes it by default (`lightning_lora.loss`: no
            vocabulary-sized tensor kept, one chunk's logits at a time) instead of transformers' own loss
            (float32 logits of every position, and their gradient), which is the default here.

    Returns:
        An `Estimate` with each column's `MemoryBreakdown` and the per-module parameter rows.

    Raises:
        UnknownModelError: the model is not known (the message lists the known names).
        LoRAError: an invalid setting (a `ValueError`).

    Example:
        >>> est = estimate_memory("llama-3-8b", precision="bf16-true", seq_len=2048, gradient_checkpointing=True,
        ...                       quantize="nf4", quantize_modules="all-linear")
        >>> est.qlora.total < 10 * 1024**3 < est.lora.total < 24 * 1024**3 < est.full.total
        True
    """
    pr = _precision(precision)
    if optimizer not in OPTIMIZERS:
        raise LoRAError(f"optimizer={optimizer!r} is not supported; expected one of {', '.join(OPTIMIZERS)}.")
    if optimizer_impl not in OPTIMIZER_IMPLS:
        raise LoRAError(f"optimizer_impl={optimizer_impl!r} is not supported; expected one of "
                        f"{', '.join(OPTIMIZER_IMPLS)}.")
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LoRAError(f"{key}={value!r} is invalid; expected an integer > 0.")
    if quantize is not None and quantize not in QUANTIZE:
        raise LoRAError(f"quantize={quantize!r} is not supported; expected one of {', '.join(QUANTIZE)} (or none).")
    if quantize_modules is not None and quantize_modules not in QUANTIZE_MODULES:
        raise LoRAError(f"quantize_modules={quantize_modules!r} is not supported; expected one of "
                        f"{', '.join(QUANTIZE_MODULES)}.")
    if quantize is None and quantize_modules is not None:
        raise LoRAError(f"quantize_modules={quantize_modules!r} needs quantize (which 4-bit format?); add "
                        "--quantize nf4 (or quantize='nf4'), or drop --quantize-modules.")
    if quantize is not None and quantize_modules is None:
        quantize_modules = "all-linear"  # QLoRA: the whole frozen base in 4 bits, as LoRAConfig's default
    if quantize is not None and pr.mixed:
        raise LoRAError(f"quantize={quantize!r} with precision={precision!r} is not estimated: a 4-bit base is "
                        "dequantised in the compute dtype, so use bf16-true (or 16-true / 32-true).")
    layout = Layout.resolve(strategy, devices)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora_config = LoRAConfig(r=r, alpha=alpha, target_modules=targets, adapter_dtype=adapter_dtype)
    name, config = load_model_config(config_or_name)
    sh = _shape_of(config)
    model = build_meta_model(config, pr.param)
    sh.attn = str(getattr(model.config, "_attn_implementation", None) or sh.attn)
    common = dict(batch_size=batch_size, seq_len=seq_len, checkpointing=gradient_checkpointing, optimizer=optimizer,
                  optimizer_impl=optimizer_impl, layout=layout, chunked_loss=bool(chunked_loss))

    full = _breakdown(model, sh, pr, is_full=True, **common)  # every parameter trains
    inject_lora(model, lora_config)  # on meta; counts are exact
    lora = _breakdown(model, sh, pr, is_full=False, dora=use_dora, **common)
    qlora = None
    notes: list[str] = []
    if quantize is not None:
        quantized, skipped = _quantized_weights(model, quantize, quantize_modules)
        if skipped:
            notes.append(f"{len(skipped)} linear weights are not a multiple of 64 x 256 elements and stay "
                         f"unquantised (torchao's to_nf4 refuses them), e.g. {skipped[0]}.")
        qlora = _breakdown(model, sh, pr, is_full=False, dora=use_dora, quantized=quantized, **common)
    if layout.strategy == "fsdp":
        notes.append(f"per GPU under FSDP2: weights, gradients and optimizer state in dim-0 shards over "
                     f"{layout.devices} ranks; units = each decoder layer, the input embedding, the output head and "
                     "the root; in flight = the root, two consecutive units unsharded (computing + prefetched) and "
                     "one unit's unsharded gradients.")
    elif layout.strategy == "ddp":
        notes.append(f"per GPU under DDP: a full replica on each of {layout.devices} GPUs plus the gradient buckets "
                     "(one more copy of the gradients).")

    modules = parameter_summary(model).rows
    settings = {"r": r, "alpha": float(alpha), "target_modules": targets, "precision": precision,
                "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": bool(gradient_checkpointing),
                "optimizer": optimizer, "optimizer_impl": optimizer_impl, "adapter_dtype": lora_config.adapter_dtype,
                "quantize": quantize, "quantize_modules": quantize_modules, "use_dora": bool(use_dora),
                "chunked_loss": bool(chunked_loss),
                "devices": layout.devices, "strategy": layout.strategy}
    cfg = {"model_type": getattr(config, "model_type", None), "hidden_size": sh.hidden,
           "intermediate_size": sh.intermediate, "num_hidden_layers": sh.layers, "num_attention_heads": sh.heads,
           "num_key_value_heads": sh.kv_heads, "head_dim": sh.head_dim, "vocab_size": sh.vocab,
           "tie_word_embeddings": sh.tied, "attn_implementation": sh.attn}
    return Estimate(model=name, config=cfg, settings=settings, full=full, lora=lora, modules=modules, qlora=qlora,
                    notes=notes)


__all__ = ["OPTIMIZERS", "OPTIMIZER_IMPLS", "PRECISIONS", "dora_norm_temp", "estimate_memory"]
