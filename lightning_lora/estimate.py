"""`lightning-lora estimate`: parameters and training memory, full fine-tune vs LoRA, with no weights.

The model is built on the `meta` device from its transformers config (shapes only, nothing is
allocated or downloaded), LoRA is injected there with `inject_lora`, and the parameters are counted
exactly. Memory is modelled per part:

* **weights**: every parameter in its real dtype (`bf16-true`: bf16 base, LoRA adapters fp32;
  `32-true` / `*-mixed`: fp32).
* **gradients**: trainable parameters only, in their dtype.
* **optimizer state**: what `torch.optim` allocates: AdamW two moments per trainable parameter in the
  parameter's dtype (so fp32 for adapters and for mixed precision, bf16 for a `bf16-true` full
  fine-tune), SGD none (with momentum one buffer), 8-bit AdamW about 2 bytes.
* **activations**: what autograd saves for backward in a Llama-style decoder (hidden, intermediate,
  heads, kv heads, vocab, batch, seq), tensor by tensor: the fp32 copies RMSNorm makes, q/k/v/out of
  SDPA, the MLP, the inputs of trainable layers (for LoRA: the adapter's input, cast to the adapter
  dtype), the bf16 weight copies autocast keeps under `*-mixed`, and the loss: fp32 log-probabilities
  saved plus the fp32 gradient of the logits and of the log-softmax in backward (12 bytes per token
  per vocabulary entry, which dominates for a large vocabulary at long sequences). With gradient
  checkpointing only each layer's input is kept, plus one layer recomputed in backward.
* **total** is the *peak*: weights + optimizer state + the most that activations and gradients hold
  at once. Backward frees activations while it fills gradients, so the candidates are the loss's
  backward (all activations), the last and the first layer's backward (activations left plus
  gradients so far) and the optimizer step (all gradients plus the step's temporaries).

Measured against real training steps (see `benchmarks/estimate_accuracy.md`).

Example:
    >>> from lightning_lora.estimate import estimate_memory
    >>> est = estimate_memory("llama-3-8b", r=8, target_modules=["q_proj", "v_proj"])
    >>> est.lora.trainable_params, est.full.trainable_params
    (3407872, 8030261248)
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_lora.config import ALL_LINEAR, LoRAConfig
from lightning_lora.surgery import LoRAError, count_parameters, inject_lora, lora_layers

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
#: Hugging Face ids accepted for the shipped configs (lower case).
ALIASES = {
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "mistralai/mistral-7b-v0.3": "mistral-7b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
}
PRECISIONS = ("bf16-true", "bf16-mixed", "16-true", "16-mixed", "32-true")
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adamw8bit")
OPTIMIZER_IMPLS = ("foreach", "for-loop", "fused")
#: Llama-style projection names -> the slot they take in the activation formula.
SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 1024**3
MIB = 1024**2


class UnknownModelError(LoRAError):
    """A `--model` that is neither a shipped name, a model directory nor a config.json file."""


# ------------------------------------------------------------------------------------------ results
@dataclass
class MemoryBreakdown:
    """Parameters and peak training memory (bytes) of one strategy.

    Attributes:
        trainable_params: parameters the optimizer updates.
        total_params: all parameters (tied ones once), adapters included.
        weights: every parameter (and buffer) in its dtype.
        gradients: one gradient per trainable parameter, in its dtype.
        optimizer: optimizer state (AdamW: two moments per trainable parameter).
        activations: peak of what the forward saves for backward plus backward's largest transient.
        optimizer_step_temp: temporaries on top of all the gradients: `optimizer.step()`'s (foreach
            AdamW: one moment-sized list) or, with tied embeddings, autograd summing the shared
            weight's two gradients.
        total: the peak: weights + optimizer state + the most that activations and gradients hold at
            once (at the loss's backward, in the last and first layer's backward, or in the optimizer
            step). Compare `sum_of_parts`, the usual rule of thumb, which ignores that backward
            frees activations while gradients appear, and ignores the temporaries.

    Example:
        >>> b = MemoryBreakdown(10, 10, 40, 40, 80, 100, 0, 220)
        >>> b.sum_of_parts
        260
    """

    trainable_params: int
    total_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_step_temp: int
    total: int

    @property
    def sum_of_parts(self) -> int:
        """`weights + gradients + optimizer + activations`, the naive sum (not the peak)."""
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class ModuleRow:
    """One adapted projection (grouped over layers): parameters of its weight vs of its adapter.

    Example:
        >>> row = ModuleRow("q_proj", (4096, 4096), 32, 8, 16_777_216, 65_536)
        >>> round(row.reduction_percent, 1)
        99.6
    """

    name: str
    shape: tuple[int, int]  # (out, in)
    count: int
    r: int
    full_params: int  # per module
    lora_params: int  # per module

    @property
    def reduction_percent(self) -> float:
        """How many fewer parameters the adapter trains than the full weight, in percent."""
        return 100.0 * (1 - self.lora_params / self.full_params) if self.full_params else 0.0


@dataclass
class Estimate:
    """Full fine-tune vs LoRA for one model and one set of training settings.

    `str(estimate)` is the rendered table; `estimate.to_dict()` has every number (bytes, params).

    Example:
        >>> est = estimate_memory("smollm2-135m", seq_len=512)
        >>> est.lora.total < est.full.total
        True
        >>> sorted(est.to_dict())
        ['config', 'full', 'lora', 'model', 'modules', 'settings']
    """

    model: str
    config: dict[str, Any]
    settings: dict[str, Any]
    full: MemoryBreakdown
    lora: MemoryBreakdown
    modules: list[ModuleRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (sizes in bytes, counts in parameters)."""
        out: dict[str, Any] = {"model": self.model, "config": dict(self.config), "settings": dict(self.settings)}
        for key in ("full", "lora"):
            part: MemoryBreakdown = getattr(self, key)
            d = asdict(part)
            out[key] = {**{k: v for k, v in d.items() if k.endswith("params")},
                        **{f"{k}_bytes": v for k, v in d.items() if not k.endswith("params")},
                        "sum_of_parts_bytes": part.sum_of_parts}
        out["modules"] = [{"name": m.name, "shape": list(m.shape), "count": m.count, "r": m.r,
                           "full_params": m.full_params, "lora_params": m.lora_params,
                           "reduction_percent": round(m.reduction_percent, 4)} for m in self.modules]
        return out

    def render(self, per_layer: bool = False, width: int = 100) -> str:
        """The table (and with `per_layer` the per-module table) as plain text."""
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None, soft_wrap=False)
        for table in self.tables(per_layer):
            console.print(table)
        return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"

    def tables(self, per_layer: bool = False) -> list[Any]:
        """`rich.table.Table` objects: the memory table, then the per-module one if asked."""
        from rich.table import Table

        s = self.settings
        targets = s["target_modules"] if isinstance(s["target_modules"], str) else ", ".join(s["target_modules"])
        title = (f"{self.model}, {s['precision']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
                 f"{'checkpointing, ' if s['gradient_checkpointing'] else ''}{s['optimizer']} ({s['optimizer_impl']})")
        table = Table(title=title, title_justify="left",
                      caption="peak total = weights + optimizer state + the most that activations and gradients "
                              "hold at once (backward frees activations as gradients appear); 1 GiB = 2^30 bytes")
        table.add_column("")
        table.add_column("full fine-tune", justify="right", no_wrap=True)
        table.add_column(f"LoRA r={s['r']} ({targets})", justify="right", no_wrap=True)
        f, lo = self.full, self.lora
        table.add_row("parameters to train", f"{f.trainable_params:,}", f"{lo.trainable_params:,}")
        table.add_row("  share of all parameters", _pct(f.trainable_params, f.total_params),
                      _pct(lo.trainable_params, lo.total_params))
        table.add_row("total parameters", f"{f.total_params:,}", f"{lo.total_params:,}")
        for label, key in (("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
                           ("activations", "activations")):
            table.add_row(label, format_bytes(getattr(f, key)), format_bytes(getattr(lo, key)))
        if f.optimizer_step_temp or lo.optimizer_step_temp:
            table.add_row("  temporaries with all gradients", format_bytes(f.optimizer_step_temp),
                          format_bytes(lo.optimizer_step_temp))
        table.add_row("peak total", format_bytes(f.total), format_bytes(lo.total), style="bold")
        tables = [table]
        if per_layer:
            per = Table(title="per adapted module (each one; 'x' = how many)", title_justify="left")
            for name, justify in (("module", "left"), ("shape (out x in)", "right"), ("x", "right"), ("r", "right"),
                                  ("full params", "right"), ("LoRA params", "right"), ("fewer", "right")):
                per.add_column(name, justify=justify, no_wrap=True)
            for m in self.modules:
                per.add_row(m.name, f"{m.shape[0]} x {m.shape[1]}", str(m.count), str(m.r), f"{m.full_params:,}",
                            f"{m.lora_params:,}", f"{m.reduction_percent:.1f}%")
            tables.append(per)
        return tables

    def __str__(self) -> str:
        return self.render()


def format_bytes(n: int) -> str:
    """`n` bytes as GiB (>= 1 GiB) or MiB.

    Example:
        >>> format_bytes(3 * 1024**3), format_bytes(5 * 1024**2)
        ('3.00 GiB', '5.0 MiB')
    """
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _pct(part: int, whole: int) -> str:
    pct = 100.0 * part / whole if whole else 0.0
    return f"{pct:.4f}%" if pct < 1 else f"{pct:.2f}%"


# ------------------------------------------------------------------------------------ model configs
def known_models() -> list[str]:
    """Names `--model` accepts offline: the shipped configs and the bundled SmolLM2-Instruct.

    Example:
        >>> "llama-3-8b" in known_models()
        True
    """
    from lightning_lora.hub import BUNDLED_MODELS

    return sorted({p.stem for p in CONFIG_DIR.glob("*.json")} | set(BUNDLED_MODELS))


def load_model_config(model: Any) -> tuple[str, Any]:
    """`(display name, transformers config)` for a shipped name, a directory, a config.json or a config.

    Names are case-insensitive: the shipped configs (`llama-3-8b`, `llama-3.2-1b`, `mistral-7b` =
    Mistral-7B-v0.3, `qwen2.5-7b`, `smollm2-135m`), their Hugging Face ids, and the bundled
    `smollm2-135m-instruct` (its converted directory from `hub.resolve_model`; config only).

    Raises:
        UnknownModelError: for anything else, listing the known names.

    Example:
        >>> name, cfg = load_model_config("Llama-3-8B")
        >>> name, cfg.hidden_size, cfg.num_key_value_heads
        ('llama-3-8b', 4096, 8)
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return getattr(model, "name_or_path", "") or model.model_type, copy.deepcopy(model)
    if isinstance(model, dict):
        data = dict(model)
        return data.get("_name_or_path") or data.get("model_type", "model"), AutoConfig.for_model(**data)
    text = str(model)
    key = ALIASES.get(text.lower(), text.lower())
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{text!r} is a directory without a config.json; pass a transformers model "
                                    "directory or the path of its config.json.")
        return path.name, AutoConfig.from_pretrained(str(path))
    if path.is_file():
        try:
            return path.parent.name if path.name == "config.json" else path.stem, AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as err:
            raise UnknownModelError(f"{text!r} is not a transformers config.json ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200]}).") from None
    shipped = CONFIG_DIR / f"{key}.json"
    if shipped.is_file():
        return key, AutoConfig.from_pretrained(str(shipped))
    from lightning_lora.hub import BUNDLED_MODELS, ModelNotFoundError, resolve_model

    if key in BUNDLED_MODELS:
        try:
            return key, AutoConfig.from_pretrained(resolve_model(key))
        except ModelNotFoundError:  # same shapes as the base model's shipped config
            return key, AutoConfig.from_pretrained(str(CONFIG_DIR / "smollm2-135m.json"))
    looks_like_path = text.endswith(".json") or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path:
        raise UnknownModelError(f"{text!r} does not exist; pass a model directory, a config.json path, or one of "
                                f"the known names: {', '.join(known_models())}.")
    if text.count("/") == 1:  # a hub id that may be in the local Hugging Face cache (never downloaded)
        try:
            return text, AutoConfig.from_pretrained(text, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise UnknownModelError(f"unknown model {text!r}; known names: {', '.join(known_models())} "
                            "(or pass a model directory or a config.json path).")


def build_meta_model(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_config(config)` on the `meta` device: shapes only, no memory.

    Example:
        >>> _, cfg = load_model_config("smollm2-135m")
        >>> build_meta_model(cfg).lm_head.weight.device.type
        'meta'
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)


# --------------------------------------------------------------------------------------- the model
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
            raise ValueError(f"model config ({getattr(text, 'model_type', '?')}) has none of {names}; the estimate "
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
    raise ValueError(f"precision={name!r} is not supported; expected one of {', '.join(PRECISIONS)}.")


@dataclass
class _Mod:
    """One linear of a layer: trainable weight (full FT), adapter rank (LoRA), parameter counts."""

    full: bool = False
    r: int = 0
    adapter_bytes: int = 4
    weight_numel: int = 0
    adapter_numel: int = 0


@dataclass
class _LayerCost:
    saved: int  # bytes autograd saves for the layer (per token part times tokens, plus fixed)
    transient: int  # the layer's largest extra in backward (MLP: grad of the product and of both factors)
    out_grad: bool  # whether the layer's output needs grad


def _layer_cost(sh: _Shape, pr: _Precision, mods: dict[str, _Mod], in_grad: bool, norms_trainable: bool,
                seq: int, tokens: int) -> _LayerCost:
    """What one decoder layer costs in activations.

    Follows what PyTorch saves for transformers' Llama layer (each op saves only what the gradients
    that are needed require): RMSNorm keeps its input in fp32, SDPA its q, k, v, output and
    log-sum-exp, the gated MLP its three intermediate tensors, a trainable linear its input, an
    adapter its input cast to the adapter dtype and A's output; under autocast every linear whose
    input needs grad keeps a 16-bit copy of its weight.
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
                if m.full and not shared:
                    tok += src_bytes * dim
                    shared = True
                if m.r:
                    if m.adapter_bytes == src_bytes:
                        if not shared:
                            tok += src_bytes * dim
                            shared = True
                    else:
                        tok += m.adapter_bytes * dim  # x.to(adapter dtype), one per adapter
                    tok += m.adapter_bytes * m.r  # A's output, kept by B
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
    for name, m in mods.items():  # adapted modules of other names: an input copy each (conservative)
        if name not in SLOTS and m.r:
            tok += m.adapter_bytes * (h + m.r)
    # backward through the MLP: d(product) and d(both factors) at once, while the product's own
    # saved input is already freed; plus the incoming gradient of the layer output
    transient = (3 * c * i - down_in) if g_grad else 0
    down = mods.get("down_proj")
    if down is not None and down.r and not pr.mixed and down.adapter_bytes != c:
        # the adapter's gradient w.r.t. its (cast) input, in the adapter dtype, before the cast back
        transient = max(transient, down.adapter_bytes * (i + 2 * h))
    transient += resid * h
    return _LayerCost(tok * tokens + fixed, transient * tokens, x2_grad or down_grad)


@dataclass
class _Grads:
    total: int = 0
    head: int = 0  # lm_head and final norm (tied: the shared embedding)
    first_layer: int = 0
    embed: int = 0  # an untied input embedding (its gradient comes last)


@dataclass
class _Timeline:
    """Activation and gradient bytes alive at the moments of a step where the peak can be."""

    activations: int  # the activation peak (no gradients yet)
    with_gradients: int  # activations + gradients alive at once (first / last layer's backward)


def _timeline(sh: _Shape, pr: _Precision, layer_mods: list[dict[str, _Mod]], head: _Mod, embed_grad: bool,
              full: bool, batch: int, seq: int, checkpointing: bool, grads: _Grads) -> _Timeline:
    """Activation bytes over one step: at the loss's backward, and in the last and first layer's backward."""
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
    head_tok += 4 * sh.vocab + 8 + (8 if full else 0)
    fixed = 2 * head.weight_numel if pr.mixed else 0  # lm_head's 16-bit copy under autocast
    fixed += 2 * seq * sh.head_dim * pr.resid  # rotary cos/sin, shared by all layers
    loss_transient = 8 * sh.vocab * n  # backward: fp32 grad of the log-probs and of the logits
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


def _grads(model: torch.nn.Module) -> _Grads:
    out = _Grads()
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_ids = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        size = p.numel() * p.element_size()
        out.total += size
        idx = _layer_index(name)
        if idx == 0:
            out.first_layer += size
        elif id(p) in head_ids:
            out.head += size
        elif id(p) in embed_ids:
            out.embed += size
        elif idx is None:
            out.head += size  # final norm
    return out


def _optimizer_bytes(optimizer: str, params: list[torch.nn.Parameter]) -> int:
    total = 0
    for p in params:
        if optimizer == "adamw":
            total += 2 * p.numel() * p.element_size()
        elif optimizer == "sgd-momentum":
            total += p.numel() * p.element_size()
        elif optimizer == "adamw8bit":  # bitsandbytes: 8-bit states (+ fp32 absmax per 256) from 4096 elements
            total += 2 * p.numel() + 2 * 4 * -(-p.numel() // 256) if p.numel() >= 4096 else 8 * p.numel()
    return total


def _step_temp(optimizer: str, impl: str, params: list[torch.nn.Parameter]) -> int:
    if optimizer != "adamw" or impl == "fused" or not params:
        return 0
    if impl == "foreach":  # _foreach_sqrt(exp_avg_sqs): one list the size of a moment
        return sum(p.numel() * p.element_size() for p in params)
    return 2 * max(p.numel() * p.element_size() for p in params)  # sqrt() and the division, per tensor


def _weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for j, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[j + 1].isdigit():
            return int(parts[j + 1])
    return None


def _module_maps(model: torch.nn.Module, sh: _Shape, full: bool) -> tuple[list[dict[str, _Mod]], _Mod, bool]:
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
        mod = _Mod(full=full, weight_numel=weight.numel())
        if is_lora:
            mod.r = module.r
            mod.adapter_bytes = module.lora_A.weight.element_size()
            mod.adapter_numel = module.lora_A.weight.numel() + module.lora_B.weight.numel()
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
) -> Estimate:
    """Parameters and peak training memory of a full fine-tune and of LoRA, from the config alone.

    Args:
        config_or_name: a shipped name (`llama-3-8b`, `llama-3.2-1b`, `mistral-7b`, `qwen2.5-7b`,
            `smollm2-135m`, `smollm2-135m-instruct`; case-insensitive), a model directory, a
            config.json path, a transformers config or a config dict.
        r: LoRA rank.
        alpha: LoRA alpha (does not change memory; kept for the record).
        target_modules: module names, one regex, or `"all-linear"` (as `LoRAConfig`).
        precision: Lightning precision: `bf16-true`, `bf16-mixed`, `16-true`, `16-mixed`, `32-true`.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        gradient_checkpointing: keep only layer inputs, recompute one layer at a time in backward.
        optimizer: `adamw` (2 moments), `sgd` (none), `sgd-momentum` (1 buffer), `adamw8bit`
            (bitsandbytes, about 2 bytes per parameter; not measured).
        optimizer_impl: `torch.optim` code path: `foreach` (the default on CUDA: one moment-sized
            temporary in `step()`), `for-loop` (the default on CPU: two temporaries the size of the
            largest tensor), `fused` (none).
        adapter_dtype: dtype of the LoRA matrices (`LoRAConfig.adapter_dtype`, fp32 by default).

    Returns:
        An `Estimate` with both strategies' `MemoryBreakdown` and the per-module parameter rows.

    Raises:
        UnknownModelError: the model is not known (the message lists the known names).
        ValueError: an invalid setting.

    Example:
        >>> est = estimate_memory("llama-3-8b", precision="bf16-true", seq_len=2048, gradient_checkpointing=True)
        >>> est.lora.total < 24 * 1024**3 < est.full.total
        True
    """
    pr = _precision(precision)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; expected one of {', '.join(OPTIMIZERS)}.")
    if optimizer_impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer_impl={optimizer_impl!r} is not supported; expected one of "
                         f"{', '.join(OPTIMIZER_IMPLS)}.")
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key}={value!r} is invalid; expected an integer > 0.")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora_config = LoRAConfig(r=r, alpha=alpha, target_modules=targets, adapter_dtype=adapter_dtype)
    name, config = load_model_config(config_or_name)
    sh = _shape_of(config)
    model = build_meta_model(config, pr.param)
    sh.attn = str(getattr(model.config, "_attn_implementation", None) or sh.attn)

    def breakdown(is_full: bool) -> MemoryBreakdown:
        params = [p for p in model.parameters() if p.requires_grad]
        trainable, total = count_parameters(model)
        grads = _grads(model)
        layers, head, embed_grad = _module_maps(model, sh, full=is_full)
        timeline = _timeline(sh, pr, layers, head, embed_grad, is_full, batch_size, seq_len, gradient_checkpointing,
                             grads)
        step_temp = _step_temp(optimizer, optimizer_impl, params)
        if sh.tied and is_full:  # autograd adds the embedding's gradient to lm_head's: both, then their sum
            emb = model.get_input_embeddings().weight
            step_temp = max(step_temp, 2 * emb.numel() * emb.element_size())
        part = MemoryBreakdown(
            trainable_params=trainable, total_params=total, weights=_weights_bytes(model), gradients=grads.total,
            optimizer=_optimizer_bytes(optimizer, params), activations=timeline.activations,
            optimizer_step_temp=step_temp, total=0)
        part.total = part.weights + part.optimizer + max(timeline.activations, timeline.with_gradients,
                                                         part.gradients + step_temp)
        return part

    full = breakdown(True)  # every parameter trains
    inject_lora(model, lora_config)  # on meta; counts are exact
    lora = breakdown(False)

    modules = _module_rows(model)
    settings = {"r": r, "alpha": float(alpha), "target_modules": targets, "precision": precision,
                "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": bool(gradient_checkpointing),
                "optimizer": optimizer, "optimizer_impl": optimizer_impl, "adapter_dtype": lora_config.adapter_dtype}
    cfg = {"model_type": getattr(config, "model_type", None), "hidden_size": sh.hidden,
           "intermediate_size": sh.intermediate, "num_hidden_layers": sh.layers, "num_attention_heads": sh.heads,
           "num_key_value_heads": sh.kv_heads, "head_dim": sh.head_dim, "vocab_size": sh.vocab,
           "tie_word_embeddings": sh.tied, "attn_implementation": sh.attn}
    return Estimate(model=name, config=cfg, settings=settings, full=full, lora=lora, modules=modules)


def _module_rows(model: torch.nn.Module) -> list[ModuleRow]:
    groups: dict[tuple[str, tuple[int, int], int], ModuleRow] = {}
    for name, layer in lora_layers(model):
        shape = (int(layer.lora_B.weight.shape[0]), int(layer.lora_A.weight.shape[1]))
        key = (name.rsplit(".", 1)[-1], shape, layer.r)
        if key not in groups:
            groups[key] = ModuleRow(key[0], shape, 0, layer.r, layer.weight.numel(),
                                    layer.lora_A.weight.numel() + layer.lora_B.weight.numel())
        groups[key].count += 1
    return list(groups.values())


# ---------------------------------------------------------------------------------------- command
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lightning-lora estimate",
                description="Parameters and training memory, full fine-tune vs LoRA, from a model config "
                            "(built on the meta device: no weights, no download).")
    p.add_argument("--model", required=True,
                   help=f"a known name ({', '.join(known_models())}), a model directory, or a config.json path")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (does not change memory)")
    p.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"],
                   help="module names, or all-linear (default: q_proj v_proj)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-true",
                   help="Lightning precision (default bf16-true)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="foreach",
                   help="torch.optim code path: foreach (CUDA default), for-loop (CPU default), fused")
    p.add_argument("--per-layer", action="store_true", help="also show parameters per adapted module")
    p.add_argument("--json", action="store_true", help="print every number as JSON (bytes, parameters)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`lightning-lora estimate ...`; returns the exit code (2 with one line on stderr for user errors).

    Example:
        >>> main(["--model", "smollm2-135m", "--seq-len", "256", "--json"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "lightning-lora estimate"
    try:
        args = _parser().parse_args(argv)
    except _UsageError as err:
        print(f"{prog}: error: {err} (see --help)", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    targets: list[str] | str = args.target_modules
    if len(targets) == 1 and targets[0] == ALL_LINEAR:
        targets = ALL_LINEAR
    try:
        est = estimate_memory(args.model, r=args.r, alpha=args.alpha, target_modules=targets,
                              precision=args.precision, batch_size=args.batch_size, seq_len=args.seq_len,
                              gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                              optimizer_impl=args.optimizer_impl)
    except (UnknownModelError, LoRAError, ValueError, OSError) as err:
        print(f"{prog}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    from rich.console import Console

    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)
    for table in est.tables(per_layer=args.per_layer):
        console.print(table)
    return 0
