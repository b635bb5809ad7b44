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
* **frozen adapters** (`frozen_adapters=N`, several adapters per model): N more copies of the adapter
  carried frozen: their weights (LoRA and QLoRA columns), no gradients, no optimizer state, and the small
  A outputs the fused adapter keeps as they run.
* **several GPUs** (`sharding.py`): per device. FSDP divides weights, gradients and optimizer state
  into dim-0 shards and adds the all-gathered units in flight; DDP adds its gradient buckets.

Measured against real training steps (see `benchmarks/estimate_accuracy.md`).

The parts live in their own modules: `shapes.py` (the decoder's shape, the precision's byte sizes),
`parameters.py` (weights, gradients, optimizer state, the 4-bit weights and DoRA's magnitudes) and
`activations.py` (what autograd saves per layer, the timeline of a step); this module adds them up
per column (`_breakdown`) and holds `estimate_memory`.

Example:
    >>> est = estimate_memory("llama-3-8b", r=8, target_modules=["q_proj", "v_proj"])
    >>> est.lora.trainable_params, est.full.trainable_params
    (3407872, 8030261248)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_lora.config import LoRAConfig
from lightning_lora.errors import LoRAError
from lightning_lora.estimate.activations import _module_maps, _timeline, dora_norm_temp
from lightning_lora.estimate.models import build_meta_model, load_model_config
from lightning_lora.estimate.parameters import (
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    _dora_magnitudes,
    _effective_weights,
    _frozen_adapters,
    _fsdp_in_flight,
    _grads,
    _inventory,
    _optimizer_bytes,
    _quantized_weights,
    _step_temp,
)
from lightning_lora.estimate.quantize import QUANTIZE, QUANTIZE_MODULES, quant_layout
from lightning_lora.estimate.report import Estimate, MemoryBreakdown, format_bytes
from lightning_lora.estimate.shapes import PRECISIONS, _Precision, _precision, _Shape, _shape_of
from lightning_lora.estimate.sharding import Layout, shard_bytes
from lightning_lora.surgery import count_parameters, inject_lora, parameter_summary


def _breakdown(model: torch.nn.Module, sh: _Shape, pr: _Precision, *, is_full: bool, batch_size: int, seq_len: int,
               checkpointing: bool, optimizer: str, optimizer_impl: str, layout: Layout, chunked_loss: bool = False,
               quantized: dict[int, str] | None = None, dora: bool = False,
               frozen_adapters: int = 0) -> MemoryBreakdown:
    quantized = quantized or {}
    by_id, buffers = _inventory(model)
    for pid, method in quantized.items():
        p = by_id[pid]
        p.quant = quant_layout(method, p.numel, p.elem)
    magnitudes = _dora_magnitudes(model) if dora else []
    frozen = _frozen_adapters(model, frozen_adapters, by_id, magnitudes)  # weights only: no gradient, no state
    params = [*by_id.values(), *magnitudes, *frozen]
    trainable_params = [p for p in params if p.trainable]
    grads = _grads(params, layout)
    layers, head, embed_grad = _module_maps(model, sh, pr, is_full, quantized, dora, frozen_adapters)
    timeline = _timeline(sh, pr, layers, head, embed_grad, is_full, batch_size, seq_len, checkpointing, grads,
                         chunked_loss)
    effective = 0 if is_full else _effective_weights(model, checkpointing)  # target_parameters: W + delta
    timeline.activations += effective
    timeline.with_gradients += effective
    step_temp = _step_temp(optimizer, optimizer_impl, trainable_params, layout)
    if sh.tied and is_full:  # autograd adds the embedding's gradient to lm_head's: both, then their sum
        emb = model.get_input_embeddings().weight
        step_temp = max(step_temp, 2 * shard_bytes(emb.numel(), emb.shape[0], emb.element_size(),
                                                   layout.world_size))
    trainable, total = count_parameters(model)
    magnitude_count = sum(p.numel for p in magnitudes)
    frozen_count = sum(p.numel for p in frozen)
    communication = 0
    if layout.strategy == "fsdp":
        communication = _fsdp_in_flight(params, sh.layers)
    elif layout.strategy == "ddp":
        communication = grads.total  # the gradient buckets, a second copy of every gradient
    part = MemoryBreakdown(
        trainable_params=trainable + magnitude_count, total_params=total + magnitude_count + frozen_count,
        weights=sum(p.stored(layout) for p in params) + buffers, gradients=grads.total,
        optimizer=_optimizer_bytes(optimizer, trainable_params, layout), activations=timeline.activations,
        optimizer_step_temp=step_temp, total=0,
        quantized_weights=sum(p.stored(layout) for p in params if p.quant is not None),
        dequant_temp=max([head.quant_temp] + [m.quant_temp for mods in layers for m in mods.values()]),
        magnitude_params=magnitude_count, communication=communication, effective_weights=effective,
        frozen_adapter_params=frozen_count,
        frozen_adapter_weights=sum(p.stored(layout) for p in frozen))
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
    target_parameters: Sequence[str] | None = None,
    frozen_adapters: int = 0,
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
        target_parameters: parameters adapted directly (`LoRAConfig.target_parameters`, e.g. the expert
            stacks `mlp.experts.gate_up_proj`): r*E*(in + out) adapter parameters per E-expert stack, and the
            `W + delta` copy each forward builds (`MemoryBreakdown.effective_weights`).
        frozen_adapters: how many more adapters of the same config sit on the model frozen, next to the trained
            one (several adapters per model: `inject_lora` / `load_adapter` under another `adapter_name`). In
            the LoRA and QLoRA columns their weights count (`MemoryBreakdown.frozen_adapter_weights`, part of
            `weights`; DoRA: with their magnitudes), with no gradients and no optimizer state; they run, so the
            small A outputs our fused adapter keeps count per frozen adapter too (under autocast their 16-bit
            A and B copies). For serving K adapters at once, `frozen_adapters=K - 1` gives the weights held.

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
    if isinstance(frozen_adapters, bool) or not isinstance(frozen_adapters, int) or frozen_adapters < 0:
        raise LoRAError(f"frozen_adapters={frozen_adapters!r} is invalid; expected an integer >= 0 (how many more "
                        "adapters of the same config the model carries frozen next to the trained one).")
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
    lora_config = LoRAConfig(r=r, alpha=alpha, target_modules=targets, adapter_dtype=adapter_dtype,
                             target_parameters=list(target_parameters) if target_parameters else None)
    name, config = load_model_config(config_or_name)
    sh = _shape_of(config)
    model = build_meta_model(config, pr.param)
    sh.attn = str(getattr(model.config, "_attn_implementation", None) or sh.attn)
    common = dict(batch_size=batch_size, seq_len=seq_len, checkpointing=gradient_checkpointing, optimizer=optimizer,
                  optimizer_impl=optimizer_impl, layout=layout, chunked_loss=bool(chunked_loss))

    full = _breakdown(model, sh, pr, is_full=True, **common)  # every parameter trains
    inject_lora(model, lora_config)  # on meta; counts are exact
    lora = _breakdown(model, sh, pr, is_full=False, dora=use_dora, frozen_adapters=frozen_adapters, **common)
    qlora = None
    notes: list[str] = []
    if quantize is not None:
        quantized, skipped = _quantized_weights(model, quantize, quantize_modules)
        if skipped:
            notes.append(f"{len(skipped)} linear weights are not a multiple of 64 x 256 elements and stay "
                         f"unquantised (torchao's to_nf4 refuses them), e.g. {skipped[0]}.")
        qlora = _breakdown(model, sh, pr, is_full=False, dora=use_dora, quantized=quantized,
                           frozen_adapters=frozen_adapters, **common)
    if layout.strategy == "fsdp":
        notes.append(f"per GPU under FSDP2: weights, gradients and optimizer state in dim-0 shards over "
                     f"{layout.devices} ranks; units = each decoder layer, the input embedding, the output head and "
                     "the root; in flight = the root, two consecutive units unsharded (computing + prefetched) and "
                     "one unit's unsharded gradients.")
    elif layout.strategy == "ddp":
        notes.append(f"per GPU under DDP: a full replica on each of {layout.devices} GPUs plus the gradient buckets "
                     "(one more copy of the gradients).")

    if lora.effective_weights:
        notes.append(f"target_parameters: each adapted parameter is used as W + delta, a copy of the whole tensor "
                     f"(an expert stack) built in every forward and kept for backward: "
                     f"{lora.effective_weights / 2**30:.2f} GiB here, part of activations.")
    if frozen_adapters:
        notes.append(f"{frozen_adapters} frozen adapter{'s' if frozen_adapters > 1 else ''} of the same config next "
                     f"to the trained one: {lora.frozen_adapter_params:,} parameters, "
                     f"{format_bytes(lora.frozen_adapter_weights)} of weights (in the LoRA"
                     f"{' and QLoRA columns' if qlora is not None else ' column'}), no gradients, no optimizer state.")
    modules = parameter_summary(model).rows
    settings = {"r": r, "alpha": float(alpha), "target_modules": targets, "precision": precision,
                "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": bool(gradient_checkpointing),
                "optimizer": optimizer, "optimizer_impl": optimizer_impl, "adapter_dtype": lora_config.adapter_dtype,
                "quantize": quantize, "quantize_modules": quantize_modules, "use_dora": bool(use_dora),
                "chunked_loss": bool(chunked_loss), "target_parameters": lora_config.target_parameters,
                "devices": layout.devices, "strategy": layout.strategy, "frozen_adapters": frozen_adapters}
    cfg = {"model_type": getattr(config, "model_type", None), "hidden_size": sh.hidden,
           "intermediate_size": sh.intermediate, "num_hidden_layers": sh.layers, "num_attention_heads": sh.heads,
           "num_key_value_heads": sh.kv_heads, "head_dim": sh.head_dim, "vocab_size": sh.vocab,
           "tie_word_embeddings": sh.tied, "attn_implementation": sh.attn}
    return Estimate(model=name, config=cfg, settings=settings, full=full, lora=lora, modules=modules, qlora=qlora,
                    notes=notes)


__all__ = ["OPTIMIZERS", "OPTIMIZER_IMPLS", "PRECISIONS", "dora_norm_temp", "estimate_memory"]
