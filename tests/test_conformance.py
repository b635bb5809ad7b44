"""The conformance matrix (issue 21): every row (model, layer type, `LoRAConfig` overrides, base dtype,
quantized base or not) goes through the same checks, so a new variant or layer type is one more row.

Checks (test id `test_conformance[<row>-<check>]`):

* `step0`: right after injection the model computes the base function bit for bit (`torch.equal`); `unload`
  gives the base's state dict back. Base-changing inits (PiSSA, OLoRA) store the residual `W - s B A` in the
  base dtype, so `W_res + s B A` equals `W` only within one rounding of each: `STEP0_TOL` of the outputs.
  A quantized base's "base" is the same model quantized and without adapters: `unload` of a copy taken
  right after injection (`unload` keeps the quantized layers).
* `merge`: after giving every trainable tensor nonzero values (`lora_parameters`), `merge_adapter` computes
  the adapted function within `MERGE_TOL[dtype]`; `unmerge_adapter` gives every base weight back within
  `eps * (|W| + |W + delta|)` (`LoRALayer.unmerge`'s documented bound; DoRA's unmerge rounds more often:
  `DORA_UNMERGE_ULPS` times the tensor's largest bound); both are idempotent; `disable_lora` computes the
  base function; `merge_and_unload(keep=True)` leaves exactly the base's keys and the adapted function, and
  `unmerge_and_reinject` gives the same adapters back and the base weights within the same bound; `unload`
  after "training" gives the base's weights back (trained biases and modules_to_save stay trained).
* `state_dict`: the injected state dict is a superset of the base's (same keys in the same order, same
  shapes) adding exactly A and B of every adapted module and the variant's tensors (DoRA magnitudes,
  PiSSA/OLoRA initial adapters); a base checkpoint loads into it with exactly those keys missing.
* `lora_state_dict`: holds every adapter tensor and the trained biases / modules_to_save, nothing else;
  -> a fresh injection (other random A) -> `load_lora_state_dict` (values in float64: cast into the same
  Parameter objects, dtypes kept) gives identical outputs.
* `adapter_ckpt`: what the `LoRA` callback saves and loads, without a Trainer: the callback's
  `strategy.save_checkpoint` wrapper calls `checkpoint.make_adapter_only` on the checkpoint dict, which is
  written with `torch.save`; its restore path reads it with `torch.load(weights_only=True)`, checks it with
  `check_checkpoint_config` and `check_adapter_keys` and loads it non-strictly into the injected module
  (the mixin injects from `checkpoint_config`). The file also loads with `load_adapter(base, path)`.
  Both give identical outputs. Besides, `test_callback_checkpoint_round_trip` runs one real
  `Trainer(max_steps=1).fit` per model family (and the NF4 base) with the `LoRA` callback and restores the
  checkpoint through the callback (`trainer.validate(ckpt_path=...)`): about 3 s in all.
* `peft_export`: `save_adapter` -> `peft.PeftModel.from_pretrained(base copy)` computes our outputs
  (`PEFT_TOL`); `peft_import`: PEFT's `LoraConfig` for the row adapts the same modules with the same r and
  scaling, and the adapter it wrote (`get_peft_model(...).save_pretrained`, nonzero tensors; PiSSA/OLoRA
  through PEFT's conversion to plain LoRA) loaded with our `load_adapter` (frozen, the same module list)
  computes PEFT's outputs. Rows PEFT cannot express skip with the reason in the row.
* `dtype_policy`: `model.to(torch.bfloat16)` (what `bf16-true` does) after injection moves the base weights
  to bf16 and leaves every adapter tensor (`.lora_*` keys) in the adapter dtype (float32 by default; with
  `adapter_dtype=None` they follow the base); quantized storage is untouched (the same NF4 tensors); the
  model then computes in bf16, within bf16 rounding of what it computed before the cast.

Two adapters on one model (issue 23) have their own small matrix, `TWO_ROWS` x `TWO_CHECKS`
(`test_two_adapters[<row>-<check>]`: PEFT parity of each adapter alone and both active in both directions,
merge, mixed batches) and `test_two_adapters_refused` for the layer kinds that hold one adapter only.

Refused combinations are not rows: `test_refused_combinations_stay_errors` holds them. Rows where
`merge_adapter` is refused say why (`Row.merge_adapter_refused`): on an embedding whose weight is tied to the
output head, folding the delta in would change the head too (`merge_and_unload` unties first); the check is
then that it raises and merges nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conformance_models import BUILDERS, Builder
from peft_parity import peft_mha_backward_fixed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lora import (
    LoRA,
    LoRAConfig,
    LoRAConfigError,
    LoRAError,
    active_adapters,
    adapter_names,
    disable_lora,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    mixed_batch,
    save_adapter,
    set_adapter,
    unload,
    unmerge_adapter,
    unmerge_and_reinject,
)
from lightning_lora.checkpoint import (
    check_adapter_keys,
    check_checkpoint_config,
    checkpoint_config,
    make_adapter_only,
    read_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
EPS = {F32: 2.0 ** -24, BF16: 2.0 ** -8, F16: 2.0 ** -11}
#: where outputs are equal only within rounding, relative to the outputs' largest magnitude (at least 1): merged vs
#: adapted (W + delta rounded once into the dtype), PEFT vs ours (the same math in another order; on 16-bit bases
#: our adapter products run in bf16/fp16, adapter_compute_dtype="auto", PEFT's in fp32), PiSSA / OLoRA at step 0
#: (the residual W - s B A rounded once into the base dtype) and exported as a plain rank-2r delta. Measured at
#: most 4.7e-7 (fp32), 6.9e-3 (bf16, 1.8 ulps), 6.1e-4 (fp16, 1.3 ulps).
TOL = {F32: 1e-6, BF16: 4 * EPS[BF16], F16: 4 * EPS[F16]}
MERGE_TOL = PEFT_TOL = STEP0_TOL = TOL
#: DoRA's unmerge (`W' * norm / m - delta`) rounds relative to each column's norm, not to each element: every
#: element comes back within DORA_UNMERGE_ULPS * eps * max(|W| + |W + delta|) over the tensor (measured <= 2.7)
DORA_UNMERGE_ULPS = 4
NF4_SKIP = "PEFT has no torchao NF4 base (its QLoRA is bitsandbytes'): PEFT cannot express this row"


@dataclass(frozen=True)
class Row:
    """One configuration of the matrix.

    Attributes:
        id: the test id.
        model: key of `BUILDERS`.
        layer: the layer type(s) adapted (documentation; the ids say it too).
        config: `LoRAConfig` keywords.
        dtype: the base model's dtype (cast before injection).
        peft_skip: why PEFT cannot express this row (both PEFT checks skip), or None.
        peft_import_skip: why only the import direction is skipped.
        merge_adapter_refused: why `merge_adapter` refuses this row (checked: a `LoRAError`, nothing merged).
    """

    id: str
    model: str
    layer: str
    config: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = F32
    peft_skip: str | None = None
    peft_import_skip: str | None = None
    merge_adapter_refused: str | None = None

    @property
    def quantized(self) -> bool:
        return self.config.get("quantize_base") is not None

    @property
    def base_init(self) -> bool:
        init = self.config.get("init", "kaiming")
        return init.startswith("pissa") or init == "olora"

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(**{"r": 4, "alpha": 8, **self.config})


QV = ["q_proj", "v_proj"]
LLAMA_SOME = ["q_proj", "v_proj", "down_proj"]
PATTERNS = dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 3})
C1 = ["c_attn", "c_proj", "c_fc"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PEFT_OLORA_CONV1D = ("PEFT's OLoRA init fails on Conv1D (a shape error: it ignores fan_in_fan_out), so PEFT "
                     "cannot write this adapter")
TIED_MERGE = "tied to another module"
PEFT_RSLORA_PATTERN_CONVERSION = ("PEFT refuses path_initial_model_for_weight_conversion with rank_pattern / "
                                  "alpha_pattern and use_rslora=True, so it writes no adapter we can load")
PEFT_DORA_CONVERSION = ("PEFT's conversion of a PiSSA/OLoRA adapter (path_initial_model_for_weight_conversion) drops "
                        "the DoRA magnitudes but keeps use_dora=True; load_adapter refuses such a file "
                        "(AdapterFormatError)")
PEFT_MHA_ALL_LINEAR = ("PEFT's all-linear adapts an nn.MultiheadAttention's out_proj alone (an adapter that never "
                       "runs: the attention reads out_proj.weight), not the attention module, so it adapts other modules")

ROWS = [
    # ---------------------------------------------------------------- Llama: nn.Linear
    Row("llama-qv", "llama", "linear", dict(target_modules=QV)),
    Row("llama-all-linear", "llama", "linear", dict(target_modules="all-linear")),
    Row("llama-gaussian", "llama", "linear", dict(target_modules=LLAMA_SOME, init="gaussian")),
    Row("llama-rslora", "llama", "linear", dict(target_modules=LLAMA_SOME, r=8, alpha=4, use_rslora=True)),
    Row("llama-patterns", "llama", "linear",
        dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
             alpha_pattern={"v_proj": 3})),
    Row("llama-rslora-patterns-exclude", "llama", "linear",
        dict(target_modules="all-linear", exclude_modules=["o_proj"], use_rslora=True, **PATTERNS)),
    Row("llama-regex-target", "llama", "linear",
        dict(target_modules=r"model\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)")),
    Row("llama-dropout", "llama", "linear", dict(target_modules=LLAMA_SOME, dropout=0.1)),
    Row("llama-adapter-dtype-none", "llama", "linear", dict(target_modules=QV, adapter_dtype=None)),
    Row("llama-bias-all", "llama-bias", "linear", dict(target_modules=QV, bias="all")),
    Row("llama-bias-lora-only", "llama-bias", "linear", dict(target_modules=LLAMA_SOME, bias="lora_only")),
    Row("llama-bias-dora-bf16", "llama-bias", "linear", dict(target_modules=LLAMA_SOME, use_dora=True), dtype=BF16),
    Row("llama-dora", "llama", "linear", dict(target_modules=LLAMA_SOME, use_dora=True)),
    Row("llama-dora-rslora-patterns", "llama", "linear",
        dict(target_modules=LLAMA_SOME, use_dora=True, use_rslora=True, **PATTERNS)),
    Row("llama-dora-dropout", "llama", "linear", dict(target_modules=QV, use_dora=True, dropout=0.1)),
    Row("llama-pissa", "llama", "linear", dict(target_modules=LLAMA_SOME, init="pissa")),
    Row("llama-pissa-niter-2", "llama", "linear", dict(target_modules=LLAMA_SOME, init="pissa_niter_2")),
    Row("llama-olora", "llama", "linear", dict(target_modules=LLAMA_SOME, init="olora")),
    Row("llama-pissa-rslora-patterns", "llama", "linear",
        dict(target_modules=LLAMA_SOME, init="pissa", use_rslora=True, **PATTERNS),
        peft_import_skip=PEFT_RSLORA_PATTERN_CONVERSION),
    Row("llama-pissa-dora", "llama", "linear", dict(target_modules=QV, init="pissa", use_dora=True),
        peft_import_skip=PEFT_DORA_CONVERSION),
    Row("llama-olora-dora", "llama", "linear", dict(target_modules=QV, init="olora", use_dora=True),
        peft_import_skip=PEFT_DORA_CONVERSION),
    Row("llama-embedding", "llama", "embedding+linear", dict(target_modules=["embed_tokens", "q_proj"])),
    Row("llama-embedding-only", "llama", "embedding", dict(target_modules=["embed_tokens"])),
    Row("llama-bf16", "llama", "linear", dict(target_modules="all-linear"), dtype=BF16),
    Row("llama-bf16-adapter-dtype-none", "llama", "linear", dict(target_modules=QV, adapter_dtype=None), dtype=BF16),
    Row("llama-bf16-compute-adapter", "llama", "linear", dict(target_modules=QV, adapter_compute_dtype="adapter"),
        dtype=BF16),
    Row("llama-bf16-dora", "llama", "linear", dict(target_modules=QV, use_dora=True), dtype=BF16),
    Row("llama-bf16-pissa", "llama", "linear", dict(target_modules=QV, init="pissa"), dtype=BF16),
    Row("llama-bf16-embedding", "llama", "embedding+linear", dict(target_modules=["embed_tokens", "v_proj"]),
        dtype=BF16),
    Row("llama-fp16", "llama", "linear", dict(target_modules=LLAMA_SOME), dtype=F16),
    Row("llama-fp16-dora", "llama", "linear", dict(target_modules=QV, use_dora=True), dtype=F16),
    Row("llama-cls-task-head", "llama-cls", "linear", dict(target_modules=QV)),
    Row("llama-cls-modules-to-save", "llama-cls", "linear", dict(target_modules=QV, modules_to_save=["score"])),
    # ---------------------------------------------------------------- Llama: NF4 base (torchao)
    Row("llama-nf4-qv", "llama", "nf4-linear", dict(target_modules=QV, quantize_base="nf4",
                                                      quantize_base_modules="adapted"), peft_skip=NF4_SKIP),
    Row("llama-nf4-all-linear", "llama", "nf4-linear", dict(target_modules="all-linear", quantize_base="nf4"),
        peft_skip=NF4_SKIP),
    Row("llama-nf4-gaussian-rslora", "llama", "nf4-linear",
        dict(target_modules=QV, quantize_base="nf4", init="gaussian", use_rslora=True), peft_skip=NF4_SKIP),
    Row("llama-nf4-dora", "llama", "nf4-linear", dict(target_modules=QV, quantize_base="nf4", use_dora=True),
        peft_skip=NF4_SKIP),
    Row("llama-nf4-bf16", "llama", "nf4-linear", dict(target_modules=QV, quantize_base="nf4"), dtype=BF16,
        peft_skip=NF4_SKIP),
    # ---------------------------------------------------------------- GPT-2: transformers Conv1D
    Row("gpt2-c-attn", "gpt2", "conv1d", dict(target_modules=["c_attn"])),
    Row("gpt2-all-linear", "gpt2", "conv1d", dict(target_modules="all-linear")),
    Row("gpt2-bias-lora-only", "gpt2", "conv1d", dict(target_modules=C1, bias="lora_only")),
    Row("gpt2-bias-all", "gpt2", "conv1d", dict(target_modules=["c_attn"], bias="all")),
    Row("gpt2-dora", "gpt2", "conv1d", dict(target_modules=C1, use_dora=True)),
    Row("gpt2-pissa", "gpt2", "conv1d", dict(target_modules=["c_attn", "c_proj"], init="pissa")),
    Row("gpt2-olora", "gpt2", "conv1d", dict(target_modules=["c_attn", "c_proj"], init="olora"),
        peft_import_skip=PEFT_OLORA_CONV1D),
    Row("gpt2-wte-tied", "gpt2", "embedding+conv1d", dict(target_modules=["wte", "c_attn"]),
        merge_adapter_refused=TIED_MERGE),
    Row("gpt2-bf16", "gpt2", "conv1d", dict(target_modules=C1), dtype=BF16),
    Row("gpt2-dropout-patterns", "gpt2", "conv1d",
        dict(target_modules=C1, dropout=0.1, rank_pattern={"c_fc": 2}, alpha_pattern={"c_attn": 3})),
    # ---------------------------------------------------------------- BERT (classifier head saved as a task head)
    Row("bert-query-value", "bert-cls", "linear", dict(target_modules=["query", "value"])),
    Row("bert-all-linear-bias", "bert-cls", "linear", dict(target_modules="all-linear", bias="lora_only")),
    Row("bert-dora", "bert-cls", "linear", dict(target_modules=["query", "value"], use_dora=True)),
    Row("bert-word-embeddings", "bert-cls", "embedding", dict(target_modules=["word_embeddings", "query"])),
    # ---------------------------------------------------------------- OPT (tied lm_head)
    Row("opt-qv", "opt", "linear", dict(target_modules=QV)),
    Row("opt-all-linear-rslora", "opt", "linear", dict(target_modules="all-linear", use_rslora=True)),
    Row("opt-embed-tokens", "opt", "embedding+linear", dict(target_modules=["embed_tokens", "fc1"]),
        merge_adapter_refused=TIED_MERGE),
    # ---------------------------------------------------------------- plain nn.Sequential
    Row("mlp-linear", "mlp", "linear", dict(target_modules=["fc1", "fc2"])),
    Row("mlp-dora", "mlp", "linear", dict(target_modules=["fc1", "fc2"], use_dora=True)),
    Row("mlp-olora", "mlp", "linear", dict(target_modules=["fc1", "fc2"], init="olora")),
    Row("mlp-modules-to-save", "mlp", "linear", dict(target_modules=["fc1"], modules_to_save=["fc2"])),
    Row("mlp-bias-all-dropout", "mlp", "linear", dict(target_modules=["fc1"], bias="all", dropout=0.2)),
    Row("mlp-fp16", "mlp", "linear", dict(target_modules=["fc1", "fc2"]), dtype=F16),
    Row("mlp64-nf4", "mlp64", "nf4-linear", dict(target_modules=["fc1", "fc2"], quantize_base="nf4"),
        peft_skip=NF4_SKIP),
    Row("emb-embedding", "emb", "embedding", dict(target_modules=["emb"])),
    Row("emb-embedding-and-linear-bf16", "emb", "embedding+linear", dict(target_modules=["emb", "fc"]), dtype=BF16),
    # --- conv (issue 22)
    Row("conv1d", "conv1d", "conv", dict(target_modules=["c1", "c2"])),
    Row("conv1d-dora", "conv1d", "conv", dict(target_modules=["c1", "c2"], use_dora=True)),
    Row("conv2d", "conv2d", "conv", dict(target_modules=["c1", "c2"])),
    Row("conv2d-dora", "conv2d", "conv", dict(target_modules=["c1", "c2"], use_dora=True)),
    Row("conv2d-rslora-patterns-bias-dropout", "conv2d", "conv",
        dict(target_modules=["c1", "c2"], use_rslora=True, rank_pattern={"c2": 2}, alpha_pattern={"c1": 3},
             bias="lora_only", dropout=0.1)),
    Row("conv2d-bf16", "conv2d", "conv", dict(target_modules=["c1", "c2"]), dtype=BF16),
    Row("conv3d", "conv3d", "conv", dict(target_modules=["c1", "c2"])),
    Row("conv3d-dora", "conv3d", "conv", dict(target_modules=["c1", "c2"], use_dora=True)),
    # --- target_parameters (issue 22)
    Row("qwen3moe-experts", "qwen3-moe", "param", dict(target_modules=[], target_parameters=EXPERTS)),
    Row("qwen3moe-experts-qv-patterns", "qwen3-moe", "param+linear",
        dict(target_modules=QV, target_parameters=EXPERTS, rank_pattern={r"layers\.1\.mlp\.experts\.down_proj": 2},
             alpha_pattern={"gate_up_proj": 3})),
    Row("qwen3moe-experts-bf16", "qwen3-moe", "param", dict(target_modules=[], target_parameters=EXPERTS),
        dtype=BF16),
    Row("gptoss-experts", "gpt-oss", "param", dict(target_modules=[], target_parameters=EXPERTS)),
    Row("gptoss-router-down-rslora-gaussian", "gpt-oss", "param+linear",
        dict(target_modules=["q_proj"], target_parameters=["mlp.router.weight", "experts.down_proj"],
             use_rslora=True, init="gaussian")),
    # --- nn.MultiheadAttention (issue 22): the attention module adapted whole (packed in-projection + out_proj)
    Row("attn-mha", "attn", "mha", dict(target_modules=["attn"])),
    Row("attn-mha-rslora-patterns", "attn", "mha+linear",
        dict(target_modules=["attn", "head"], use_rslora=True, rank_pattern={"attn": 2}, alpha_pattern={"head": 3})),
    Row("attn-all-linear", "attn", "mha+linear", dict(target_modules="all-linear"), peft_import_skip=PEFT_MHA_ALL_LINEAR),
    Row("attn-mha-bf16", "attn", "mha", dict(target_modules=["attn"]), dtype=BF16),
]
ROW_BY_ID = {row.id: row for row in ROWS}
assert len(ROW_BY_ID) == len(ROWS)


# ------------------------------------------------------------------------------------------------ preparation
@dataclass
class Prepared:
    """What every check of a row starts from (cached per row: checks work on deep copies)."""

    builder: Builder
    x: torch.Tensor
    base_keys: list[str]                        # the base model's state-dict keys, in order
    base_shapes: dict[str, tuple[int, ...]]
    base_state: dict[str, torch.Tensor]         # the base's tensors (the quantized base's for a quantized row)
    base_out: torch.Tensor                      # the base function (the quantized base's for a quantized row)
    fresh: nn.Module                            # injected, nothing changed yet
    names: list[str]                            # the adapted modules (what inject_lora returned)
    fresh_out: torch.Tensor
    model: nn.Module                            # injected, every trainable tensor given nonzero values
    out: torch.Tensor


def _base(row: Row, seed: int = 0) -> nn.Module:
    return BUILDERS[row.model].make(seed).to(row.dtype)


def _inject(row: Row, model: nn.Module, seed: int) -> list[str]:
    torch.manual_seed(seed)  # the random factor (A) of kaiming / gaussian inits
    return inject_lora(model, row.lora_config())


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor (A, B, DoRA magnitudes, trained biases, modules_to_save) other values:
    what training does; B (an embedding's A) becomes nonzero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            noise = torch.randn(p.shape, generator=gen)
            p.add_((0.05 * noise * (1 + p.detach().float().abs())).to(p.dtype))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _dense(v).detach().clone() for k, v in model.state_dict().items()}


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A quantized (torchao NF4) tensor as the dense tensor it stands for; others unchanged."""
    return t.get_original_weight() if type(t).__name__ == "NF4Tensor" else t


@functools.cache
def prepared(row_id: str) -> Prepared:
    row = ROW_BY_ID[row_id]
    builder = BUILDERS[row.model]
    x = builder.inputs()
    base = _base(row)
    keys = list(base.state_dict())
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    fresh = _base(row)
    names = _inject(row, fresh, seed=10)
    if row.quantized:  # the base function of a quantized row: the same quantized weights without adapters
        base = unload(copy.deepcopy(fresh))
    base_state, base_out = _tensors(base), builder.run(base, x)
    model = copy.deepcopy(fresh)
    _perturb(model)
    return Prepared(builder, x, keys, shapes, base_state, base_out, fresh, names, builder.run(fresh, x), model,
                    builder.run(model, x))


def _tol(table: dict[torch.dtype, float], row: Row, reference: torch.Tensor) -> float:
    return table[row.dtype] * max(1.0, reference.abs().max().item())


def _assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    diff = (got.float() - expected.float()).abs().max().item()
    assert diff <= tol, f"{what}: max |difference| {diff:.3g} > {tol:.3g}"


#: the perturbed adapters change the outputs by more than this (relative to their largest magnitude)
CHANGED = 1e-2


def _assert_changed(out: torch.Tensor, base_out: torch.Tensor) -> None:
    """The adapters really change the function (so that the checks compare something)."""
    diff = (out.float() - base_out.float()).abs().max().item()
    assert diff > CHANGED * max(1.0, base_out.abs().max().item()), f"the adapters change the outputs by only {diff:.3g}"


# ------------------------------------------------------------------------------------------------ checks
def check_step0(row: Row) -> None:
    p = prepared(row.id)
    if row.base_init:
        _assert_close(p.fresh_out, p.base_out, _tol(STEP0_TOL, row, p.base_out), "step 0 vs base (residual)")
    else:
        assert torch.equal(p.fresh_out, p.base_out)
    if row.config.get("dropout"):  # eval mode: no dropout, run twice, the same
        assert torch.equal(p.builder.run(p.fresh, p.x), p.fresh_out)
    unloaded = unload(copy.deepcopy(p.fresh))
    assert list(unloaded.state_dict()) == p.base_keys
    state = _tensors(unloaded)
    for key, value in p.base_state.items():
        if row.base_init:  # the original W comes back from the residual: one rounding
            _assert_close(state[key], value, _tol(STEP0_TOL, row, value), f"unload {key}")
        else:
            assert torch.equal(state[key], value), key
    out = p.builder.run(unloaded, p.x)
    if not row.base_init:
        assert torch.equal(out, p.base_out)


def check_merge(row: Row) -> None:
    p = prepared(row.id)
    _assert_changed(p.out, p.base_out)
    adapters = {k: v.clone() for k, v in lora_state_dict(p.model).items()}
    before = _tensors(p.model)
    merged = merge_and_unload(copy.deepcopy(p.model), keep=True)
    assert list(merged.state_dict()) == p.base_keys
    _assert_close(p.builder.run(merged, p.x), p.out, _tol(MERGE_TOL, row, p.out), "merge_and_unload vs adapted")
    merged_state = _tensors(merged)
    assert unmerge_and_reinject(merged) == p.names  # undone: the same adapters, the base within one rounding
    assert all(torch.equal(v, adapters[k]) for k, v in lora_state_dict(merged).items())
    _assert_unmerged(row, before, merged_state, _tensors(merged))
    _assert_close(p.builder.run(merged, p.x), p.out, _tol(MERGE_TOL, row, p.out), "unmerge_and_reinject vs adapted")
    unloaded = unload(copy.deepcopy(p.model))  # after training: the base comes back (trained tensors stay trained)
    state = _tensors(unloaded)
    assert list(state) == p.base_keys
    for key, value in p.base_state.items():
        if key in adapters:
            continue
        if row.base_init:  # the original W from the residual of the initial adapters: one rounding
            _assert_close(state[key], value, _tol(STEP0_TOL, row, value), f"unload after training {key}")
        else:
            assert torch.equal(state[key], value), key
    if not any(".lora_" not in k for k in adapters):  # no trained bias or module: the base function
        out = p.builder.run(unloaded, p.x)
        if row.base_init:
            _assert_close(out, p.base_out, _tol(STEP0_TOL, row, p.base_out), "unload after training vs base")
        else:
            assert torch.equal(out, p.base_out)
    if row.config.get("bias", "none") == "none":  # trained biases stay as trained under disable_lora (PEFT's)
        with disable_lora(copy.deepcopy(p.model)) as unmerged:  # never merged: the base weights as injected
            out = p.builder.run(unmerged, p.x)
        if row.base_init:
            _assert_close(out, p.base_out, _tol(STEP0_TOL, row, p.base_out), "disable_lora vs base")
        else:
            assert torch.equal(out, p.base_out)
    if row.merge_adapter_refused is None:
        _check_merge_adapter(row, p)
        return
    model = copy.deepcopy(p.model)
    before = _tensors(model)
    with pytest.raises(LoRAError, match=row.merge_adapter_refused):
        merge_adapter(model)
    after = _tensors(model)
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(getattr(m, "merged", False) for m in model.modules())


def _assert_unmerged(row: Row, before: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
                     after: dict[str, torch.Tensor]) -> None:
    """Every tensor of `after` (unmerged) is its value `before` the merge within eps * (|W| + |W + delta|)."""
    assert list(after) == list(before)
    for key, w in before.items():
        if ".lora_" in key or not w.is_floating_point():
            assert torch.equal(after[key], w), key
            continue
        eps = EPS[w.dtype] if w.dtype in EPS else EPS[F32]
        bound = eps * (w.float().abs() + merged[key].float().abs())
        if row.config.get("use_dora"):
            bound = DORA_UNMERGE_ULPS * bound.max()
        excess = ((after[key].float() - w.float()).abs() - bound).max().item()
        assert excess <= 0, f"unmerge {key}: beyond eps*(|W|+|W+delta|) by {excess:.3g}"


def _check_merge_adapter(row: Row, p: Prepared) -> None:
    model = copy.deepcopy(p.model)
    before = _tensors(model)
    merge_adapter(model)
    merge_adapter(model)  # idempotent: the delta is not added twice
    merged_state = _tensors(model)
    _assert_close(p.builder.run(model, p.x), p.out, _tol(MERGE_TOL, row, p.out), "merge_adapter vs adapted")
    unmerge_adapter(model)
    unmerge_adapter(model)  # idempotent
    _assert_unmerged(row, before, merged_state, _tensors(model))
    _assert_close(p.builder.run(model, p.x), p.out, _tol(MERGE_TOL, row, p.out), "unmerged vs adapted")


def check_state_dict(row: Row) -> None:
    p = prepared(row.id)
    model = copy.deepcopy(p.fresh)
    state = model.state_dict()
    assert [k for k in state if ".lora_" not in k] == p.base_keys  # the base's keys, in the base's order
    assert all(tuple(state[k].shape) == shape for k, shape in p.base_shapes.items())
    extra = set(state) - set(p.base_keys)
    factors = {f"{name}.lora_{ab}.weight" for name in p.names for ab in "AB"}
    factors |= {f"{name}.{k}" for name in p.names for k in type(model.get_submodule(name)).peft_tensor_names()
                if "lora_" in k}  # a layer's adapters on its children (an attention's out_proj.lora_A / lora_B)
    variant = {f"{name}.{t}" for name in p.names for t in ("lora_magnitude_vector", "lora_init_A", "lora_init_B")}
    assert factors <= extra <= factors | variant  # A and B of every adapted module, and the variants' tensors
    assert any(k.endswith("lora_magnitude_vector") for k in extra) == bool(row.config.get("use_dora"))
    assert any("lora_init_" in k for k in extra) == row.base_init
    assert extra <= set(lora_state_dict(model))  # every added tensor is saved with the adapter
    other = _base(row, seed=3).state_dict()  # a base checkpoint (other values) loads, only adapters missing
    result = model.load_state_dict(other, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == extra
    if not row.quantized and not row.base_init:
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in other.items())


def check_lora_state_dict(row: Row) -> None:
    p = prepared(row.id)
    saved = lora_state_dict(p.model)
    assert saved and all(k in p.model.state_dict() for k in saved)
    state = p.model.state_dict()
    assert {k for k in saved if ".lora_" in k} == {k for k in state if ".lora_" in k}  # every adapter tensor
    trained = {k for k, v in p.model.named_parameters() if v.requires_grad and ".lora_" not in k}
    assert {k for k in saved if ".lora_" not in k} == trained  # and the trained biases / modules_to_save
    fresh = _base(row)
    _inject(row, fresh, seed=20)
    assert sorted(lora_state_dict(fresh)) == sorted(saved)
    assert not torch.equal(p.builder.run(fresh, p.x), p.out)
    params = dict(fresh.named_parameters())
    dtypes = {k: v.dtype for k, v in fresh.state_dict().items()}
    load_lora_state_dict(fresh, {k: v.double() for k, v in saved.items()})  # cast to the tensors' own dtypes
    assert dict(fresh.named_parameters()) == params  # copied in place: the same Parameter objects
    assert {k: v.dtype for k, v in fresh.state_dict().items()} == dtypes
    assert torch.equal(p.builder.run(fresh, p.x), p.out)


def check_adapter_ckpt(row: Row, tmp_path) -> None:
    p = prepared(row.id)
    checkpoint = {"state_dict": copy.deepcopy(p.model).state_dict(), "epoch": 0}
    make_adapter_only(checkpoint, p.model)
    assert set(checkpoint["state_dict"]) == set(lora_state_dict(p.model))
    path = tmp_path / "adapter.ckpt"
    torch.save(checkpoint, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    config = checkpoint_config(loaded)
    assert config == row.lora_config()
    module = _base(row)
    torch.manual_seed(30)
    inject_lora(module, config)
    check_checkpoint_config(loaded, config, training=True)
    check_adapter_keys(module, loaded["state_dict"])
    result = module.load_state_dict(loaded["state_dict"], strict=False)
    assert result.unexpected_keys == []
    assert not any(".lora_" in k for k in result.missing_keys)
    assert torch.equal(p.builder.run(module, p.x), p.out)
    assert read_checkpoint(path).config == config
    other = _base(row)
    load_adapter(other, path)
    assert torch.equal(p.builder.run(other, p.x), p.out)


def _peft_config(row: Row, builder: Builder):
    from peft import LoraConfig

    c = row.lora_config()
    kwargs: dict[str, Any] = dict(
        r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
        exclude_modules=c.exclude_modules, bias=c.bias, use_rslora=c.use_rslora, use_dora=c.use_dora,
        rank_pattern=dict(c.rank_pattern), alpha_pattern=dict(c.alpha_pattern), modules_to_save=c.modules_to_save,
        init_lora_weights=c.init if row.base_init else True, task_type=builder.peft_task_type,
        fan_in_fan_out=row.model == "gpt2")
    if c.target_parameters:  # issue 22
        kwargs["target_parameters"] = list(c.target_parameters)
    return LoraConfig(**kwargs)


def _peft_semantics(row: Row) -> contextlib.AbstractContextManager:
    """PEFT's `lora.MultiheadAttention` with the gradients of its own forward for rows with attention adapters (PEFT
    0.22's backward into in_proj misses out_proj's delta: `peft_parity.peft_mha_backward_fixed`), else nothing."""
    return peft_mha_backward_fixed() if "mha" in row.layer else contextlib.nullcontext()


def check_peft_export(row: Row, tmp_path) -> None:
    with _peft_semantics(row):
        _check_peft_export(row, tmp_path)


def check_peft_import(row: Row, tmp_path) -> None:
    with _peft_semantics(row):
        _check_peft_import(row, tmp_path)


def _check_peft_export(row: Row, tmp_path) -> None:
    if row.peft_skip:
        pytest.skip(row.peft_skip)
    from peft import PeftModel

    p = prepared(row.id)
    save_adapter(p.model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(_base(row), str(tmp_path / "ours")).eval()
    _assert_close(p.builder.run(theirs, p.x), p.out, _tol(PEFT_TOL, row, p.out), "PEFT loading our adapter vs ours")


def _check_peft_import(row: Row, tmp_path) -> None:
    if row.peft_skip or row.peft_import_skip:
        pytest.skip(row.peft_skip or row.peft_import_skip)
    from peft import get_peft_model

    p = prepared(row.id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_base(row), _peft_config(row, p.builder))
        if row.base_init:  # PEFT's recipe: the initial adapter as plain LoRA, then the trained one converted
            pm.peft_config["default"].init_lora_weights = True
            pm.save_pretrained(str(tmp_path / "initial"))
            pm.peft_config["default"].init_lora_weights = row.config["init"]
        _perturb_peft(pm)
        pm.eval()
        expected = p.builder.run(pm, p.x)
        extra = {"path_initial_model_for_weight_conversion": str(tmp_path / "initial")} if row.base_init else {}
        pm.save_pretrained(str(tmp_path / "peft"), **extra)
    from peft.tuners.lora import LoraLayer

    adapted = dict(_peft_layer_names(n.removeprefix("base_model.model."), m) for n, m in pm.named_modules()
                   if isinstance(m, LoraLayer)  # an attention's out_proj (under base_layer.) is its parent's
                   and (getattr(m, "parameter_name", None) is not None or ".base_layer." not in n))
    assert sorted(adapted) == sorted(p.names)  # PEFT's config adapts the modules ours does
    config = row.lora_config()
    for name, (layer, path) in adapted.items():
        assert layer.r["default"] == config.rank_for(path)
        assert layer.scaling["default"] == pytest.approx(config.scaling_for(path), rel=1e-12)
    ours = _base(row)
    assert load_adapter(ours, tmp_path / "peft") == p.names
    assert not any(param.requires_grad for param in ours.parameters())  # loaded for inference (trainable=False)
    _assert_changed(expected, p.base_out)
    _assert_close(p.builder.run(ours, p.x), expected, _tol(PEFT_TOL, row, expected),
                  "our load of PEFT's adapter vs PEFT")


def _peft_layer_names(name: str, layer: nn.Module) -> tuple[str, tuple[nn.Module, str]]:
    """`(our adapter path, (PEFT's layer, the path its rank_pattern matches))`: PEFT nests a `ParamWrapper` per
    targeted parameter under `base_layer.` (issue 22), ours sit at `<owner>.lora.<parameter>`."""
    parameter = getattr(layer, "parameter_name", None)
    if parameter is None:
        return name, (layer, name)
    owner = name.replace(".base_layer", "")
    return f"{owner}.lora.{parameter}", (layer, f"{owner}.{parameter}")


def _perturb_peft(model: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen)
                param.add_((0.05 * noise * (1 + param.detach().float().abs())).to(param.dtype))


def check_dtype_policy(row: Row) -> None:
    p = prepared(row.id)
    model = copy.deepcopy(p.model)
    quantized = {k: v for k, v in model.named_parameters() if type(v).__name__ == "NF4Tensor"}
    codes = {k: v.quantized_data.clone() for k, v in quantized.items()}
    assert bool(quantized) == row.quantized
    name = row.lora_config().adapter_dtype  # "float32" by default; None: the adapters follow the base
    adapter_dtype = getattr(torch, name) if name is not None else None
    model.to(torch.bfloat16)  # what Lightning's bf16-true precision does to the module
    for key, value in model.state_dict().items():
        if key in quantized or not value.is_floating_point():
            continue
        if ".lora_" in key:
            expected = adapter_dtype if adapter_dtype is not None else BF16
            assert value.dtype is expected, f"{key}: {value.dtype}, expected the adapter dtype {expected}"
        else:
            assert value.dtype is BF16, f"{key}: {value.dtype}, expected the cast's bf16"
    params = dict(model.named_parameters())
    for key, weight in quantized.items():
        assert params[key] is weight and type(weight).__name__ == "NF4Tensor"
        assert torch.equal(weight.quantized_data, codes[key]), key
    out = p.builder.run(model, p.x)
    assert out.dtype is BF16 and torch.isfinite(out.float()).all()
    _assert_close(out, p.out, _tol({F32: 6e-2, BF16: 6e-2, F16: 6e-2}, row, p.out), "bf16 outputs vs before the cast")


CHECKS = {"step0": check_step0, "merge": check_merge, "state_dict": check_state_dict,
          "lora_state_dict": check_lora_state_dict, "adapter_ckpt": check_adapter_ckpt,
          "peft_export": check_peft_export, "peft_import": check_peft_import, "dtype_policy": check_dtype_policy}
NEEDS_TMP = {"adapter_ckpt", "peft_export", "peft_import"}


def _available(row: Row) -> None:
    if row.quantized:
        pytest.importorskip("torchao", reason="quantize_base='nf4' needs torchao")


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_conformance(row: Row, check: str, tmp_path) -> None:
    _available(row)
    if check.startswith("peft"):
        pytest.importorskip("peft")
    CHECKS[check](row, tmp_path) if check in NEEDS_TMP else CHECKS[check](row)


def test_the_matrix_covers_every_variant_and_layer_type():
    assert len(ROWS) >= 40
    seen = {key: {str(row.config.get(key)) for row in ROWS} for key in ("init", "use_dora", "bias", "use_rslora")}
    assert {"pissa", "pissa_niter_2", "olora", "gaussian", "None"} <= seen["init"]
    assert {"True", "None"} <= seen["use_dora"] and {"all", "lora_only", "None"} <= seen["bias"]
    assert {row.layer for row in ROWS} >= {"linear", "conv1d", "embedding", "nf4-linear"}
    assert {row.dtype for row in ROWS} == {F32, BF16, F16}
    assert any(row.config.get("modules_to_save") for row in ROWS) and any(row.config.get("dropout") for row in ROWS)
    assert any(row.config.get("rank_pattern") for row in ROWS) and any("adapter_dtype" in row.config for row in ROWS)


# ------------------------------------------------------------------------------------------------ refusals
EMBEDDING_REFUSAL = r"cannot adapt the embedding\(s\) \[{}\].*exclude_modules"
REFUSED = {  # model, config, the option that is refused there, the message
    "dora-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"], use_dora=True), "use_dora",
                       "use_dora=True " + EMBEDDING_REFUSAL.format("'model.embed_tokens'")),
    "pissa-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"], init="pissa"), "init",
                        "init='pissa' " + EMBEDDING_REFUSAL.format("'model.embed_tokens'")),
    "olora-embedding": ("emb", dict(target_modules=["emb", "fc"], init="olora"), "init",
                        "init='olora' " + EMBEDDING_REFUSAL.format("'emb'")),
    "pissa-nf4": ("llama", dict(target_modules=QV, init="pissa", quantize_base="nf4"), "init",
                  "init='pissa' cannot be combined with quantize_base='nf4'"),
    "olora-nf4": ("llama", dict(target_modules=QV, init="olora", quantize_base="nf4"), "init",
                  "init='olora' cannot be combined with quantize_base='nf4'"),
    # --- nn.MultiheadAttention (issue 22)
    "dora-mha": ("attn", dict(target_modules=["attn", "head"], use_dora=True), "use_dora",
                 r"use_dora=True cannot adapt the nn.MultiheadAttention module\(s\) \['attn'\].*exclude_modules"),
    "pissa-mha": ("attn", dict(target_modules=["attn"], init="pissa"), "init",
                  r"init='pissa' cannot adapt the nn.MultiheadAttention module\(s\) \['attn'\]"),
    "dropout-mha": ("attn", dict(target_modules=["attn"], dropout=0.1), "dropout",
                    r"dropout=0.1 has no effect on a MultiheadAttention adapter"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_combinations_stay_errors(case):
    """Combinations that are not rows because they are refused today: the refusal stays a clear error and
    leaves the model as it was."""
    model_name, config, option, message = REFUSED[case]
    model = BUILDERS[model_name].make()
    keys = list(model.state_dict())
    with pytest.raises(LoRAConfigError, match=message):
        inject_lora(model, LoRAConfig(r=4, **config))
    assert list(model.state_dict()) == keys  # nothing injected
    plain = {k: v for k, v in config.items() if k != option}
    assert inject_lora(model, LoRAConfig(r=4, **plain))  # without the refused option the same model takes adapters



# ------------------------------------------------------------------------------------------------ the real callback
class _Net(pl.LightningModule):
    """A row's model inside a LightningModule (at `net`), trained on its fixed input for one step."""

    def __init__(self, row_id: str) -> None:
        super().__init__()
        self.row = ROW_BY_ID[row_id]
        self.builder = BUILDERS[self.row.model]
        self.net = _base(self.row)

    def _loss(self, batch) -> torch.Tensor:
        return self.builder.forward(self.net, batch[0]).float().pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.builder.inputs()), batch_size=len(self.builder.inputs()))


#: one row per model family (and the quantized base): a real `Trainer` fit, checkpoint and restore
FIT_ROWS = ["llama-pissa-dora", "llama-nf4-qv", "gpt2-bias-lora-only", "bert-query-value", "opt-qv", "mlp-linear"]
FIT_ROWS += ["conv2d-dora"]  # issue 22
FIT_ROWS += ["attn-mha"]  # issue 22: nn.MultiheadAttention


@pytest.mark.parametrize("row_id", FIT_ROWS)
def test_callback_checkpoint_round_trip(row_id, tmp_path):
    """`Trainer(max_steps=1).fit` with the `LoRA` callback writes an adapter-only checkpoint; a fresh module
    restored from it by the callback (`trainer.validate(ckpt_path=...)`) computes what the trained one does."""
    row = ROW_BY_ID[row_id]
    _available(row)
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
    trained = _Net(row_id)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=1, callbacks=[LoRA(**row.lora_config().to_dict(), merge_on_fit_end=False)],
                         limit_val_batches=0, num_sanity_val_steps=0, **kwargs)
    trainer.fit(trained, train_dataloaders=trained.loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == set(lora_state_dict(trained))  # adapter-only
    x = trained.builder.inputs()
    expected = trained.builder.run(trained.net.eval(), x)
    assert not torch.equal(expected, prepared(row_id).base_out)  # the step changed the function
    restored = _Net(row_id)
    pl.Trainer(callbacks=[LoRA(**row.lora_config().to_dict(), merge_on_fit_end=False)], **kwargs).validate(
        restored, dataloaders=restored.loader(), ckpt_path=str(path), verbose=False)
    assert torch.equal(restored.builder.run(restored.net.eval(), x), expected)


# ------------------------------------------------------------------------------------------------ two adapters (issue 23)
# The two-adapter matrix (issue 23): every `TwoRow` injects adapter "default" (`first`) and then adapter "second"
# (`second`: its own r, alpha, targets, variant) into one model, gives every adapter tensor of both nonzero values,
# and goes through `TWO_CHECKS`:
#
# * `peft_export`: `save_adapter` writes PEFT's multi-adapter layout ("default" at the root, "second" in
#   `second/`); `PeftModel.from_pretrained` + `load_adapter(..., "second")` computes our outputs with "default"
#   alone, "second" alone and both active (`set_adapter` on both sides), within `TWO_TOL`.
# * `peft_import`: PEFT's model with the same two adapters (`get_peft_model` + `add_adapter`, nonzero tensors)
#   written by `save_pretrained`; our `load_adapter(model, dir)` + `load_adapter(model, dir, adapter_name="second")`
#   computes PEFT's outputs for each adapter alone and both active.
# * `merge`: `merge_and_unload` with both active (and with "second" alone) gives the base's keys and computes
#   what the active adapters computed.
# * `mixed`: inside `mixed_batch`, rows given "default", "second" and "__base__" compute what the model computes
#   with that adapter alone (the base) on the same rows.
#
# Several DoRA adapters active are PEFT's: each sees the layer's output so far (PEFT's `LoraLayer.forward` passes
# `result` as DoRA's `base_result`), and `merge` takes each one's weight norm from the unmerged base weight
# (PEFT's `_unmerged_base_weight`), so PEFT's forward equals its merge: rows `*-dora` / `*-lora-then-dora`.
#
# Layer kinds that hold one adapter only (an NF4 base, `target_parameters`, `nn.MultiheadAttention`) are
# `TWO_REFUSED` cases: adding a second adapter there raises a `LoRAError` naming the layer (or the option),
# leaves the model as it was, and the same adapter on another layer of the model is accepted.

SECOND = "second"
#: fp32 / fp64: PEFT's outputs vs ours, merged vs adapted, mixed rows vs alone (relative to the largest output, >= 1)
TWO_TOL = 1e-5
F64 = torch.float64


@dataclass(frozen=True)
class TwoRow:
    """Two adapters on one model.

    Attributes:
        id: the test id.
        model: key of `BUILDERS`.
        layer: the layer type(s) adapted (documentation).
        first: `LoRAConfig` keywords of adapter "default" (r=4, alpha=8 unless given).
        second: `LoRAConfig` keywords of adapter "second" (r=2, alpha=6 unless given).
        dtype: the base model's dtype (float64: the adapters follow the base, `adapter_dtype=None`).
    """

    id: str
    model: str
    layer: str
    first: dict[str, Any]
    second: dict[str, Any]
    dtype: torch.dtype = F32

    def configs(self) -> dict[str, LoRAConfig]:
        own = {} if self.dtype is F32 else {"adapter_dtype": None}
        return {"default": LoRAConfig(**{"r": 4, "alpha": 8, **own, **self.first}),
                SECOND: LoRAConfig(**{"r": 2, "alpha": 6, **own, **self.second})}


CONV = ["c1", "c2"]
TWO_ROWS = [
    # ---------------------------------------------------------------- Linear
    TwoRow("llama-linear", "llama", "linear", dict(target_modules=QV), dict(target_modules=["q_proj", "down_proj"])),
    TwoRow("llama-rslora", "llama", "linear", dict(target_modules=QV, use_rslora=True),
           dict(target_modules=QV, r=8, use_rslora=True)),
    TwoRow("llama-dora", "llama", "linear", dict(target_modules=QV, use_dora=True),
           dict(target_modules=["q_proj", "o_proj"], use_dora=True)),
    TwoRow("llama-lora-then-dora", "llama", "linear", dict(target_modules=QV), dict(target_modules=QV, use_dora=True)),
    TwoRow("mlp-dora-then-lora-f64", "mlp", "linear", dict(target_modules=["fc1", "fc2"], use_dora=True),
           dict(target_modules=["fc1"]), dtype=F64),
    # ---------------------------------------------------------------- transformers Conv1D (GPT-2)
    TwoRow("gpt2-conv1d", "gpt2", "conv1d", dict(target_modules=["c_attn", "c_proj"]),
           dict(target_modules=["c_attn", "c_fc"], use_rslora=True)),
    TwoRow("gpt2-dora", "gpt2", "conv1d", dict(target_modules=["c_attn"], use_dora=True),
           dict(target_modules=["c_attn", "c_fc"], use_dora=True)),
    # ---------------------------------------------------------------- Embedding
    TwoRow("emb-embedding", "emb", "embedding+linear", dict(target_modules=["emb", "fc"]),
           dict(target_modules=["emb"], r=8)),
    TwoRow("emb-rslora", "emb", "embedding+linear", dict(target_modules=["emb"], use_rslora=True),
           dict(target_modules=["emb", "fc"], use_rslora=True)),
    # ---------------------------------------------------------------- Conv1d / Conv2d
    TwoRow("conv1d", "conv1d", "conv", dict(target_modules=CONV), dict(target_modules=["c1"])),
    TwoRow("conv1d-dora", "conv1d", "conv", dict(target_modules=CONV, use_dora=True),
           dict(target_modules=CONV, use_dora=True)),
    TwoRow("conv2d-rslora", "conv2d", "conv", dict(target_modules=CONV, use_rslora=True),
           dict(target_modules=["c2"], r=3, use_rslora=True)),
    TwoRow("conv2d-dora-then-lora", "conv2d", "conv", dict(target_modules=CONV, use_dora=True),
           dict(target_modules=CONV)),
]
TWO_ROW_BY_ID = {row.id: row for row in TWO_ROWS}
assert len(TWO_ROW_BY_ID) == len(TWO_ROWS)
#: what `set_adapter` is given in the comparisons (the output of each adapter alone and of both)
ACTIVE = {"default": ["default"], SECOND: [SECOND], "both": ["default", SECOND]}


@dataclass
class TwoPrepared:
    """What every check of a `TwoRow` starts from (cached per row: checks work on deep copies)."""

    builder: Builder
    x: torch.Tensor
    base_keys: list[str]
    base_out: torch.Tensor
    model: nn.Module                            # both adapters, every adapter tensor nonzero, both active
    outs: dict[str, torch.Tensor]               # per `ACTIVE` key, and "__base__"


def _two_base(row: TwoRow, seed: int = 0) -> nn.Module:
    return BUILDERS[row.model].make(seed).to(row.dtype)


def _run_active(builder: Builder, model: nn.Module, x: torch.Tensor, set_active) -> dict[str, torch.Tensor]:
    outs = {}
    for key, names in ACTIVE.items():
        set_active(names)
        outs[key] = builder.run(model, x)
    set_active(ACTIVE["both"])
    return outs


@functools.cache
def two_prepared(row_id: str) -> TwoPrepared:
    row = TWO_ROW_BY_ID[row_id]
    builder = BUILDERS[row.model]
    x = builder.inputs()
    base = _two_base(row)
    base_keys, base_out = list(base.state_dict()), builder.run(base, x)
    model = _two_base(row)
    for seed, (name, config) in enumerate(row.configs().items()):
        torch.manual_seed(10 + seed)
        inject_lora(model, config, adapter_name=name)
    set_adapter(model, ACTIVE["both"])  # both train: `lora_parameters` holds both adapters' tensors
    assert len(lora_parameters(model)) == len([k for k in model.state_dict() if ".lora_" in k])
    _perturb(model)
    outs = _run_active(builder, model, x, lambda names: set_adapter(model, names))
    outs["__base__"] = base_out
    for key, out in outs.items():
        if key != "__base__":
            _assert_changed(out, base_out)
    _assert_changed(outs["default"], outs[SECOND])
    _assert_changed(outs["both"], outs["default"])
    _assert_changed(outs["both"], outs[SECOND])
    return TwoPrepared(builder, x, base_keys, base_out, model, outs)


def _two_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    errors = []
    for key in ACTIVE:
        tol = TWO_TOL * max(1.0, expected[key].abs().max().item())
        diff = (got[key].double() - expected[key].double()).abs().max().item()
        if not diff <= tol:
            errors.append(f"{key}: max |difference| {diff:.3g} > {tol:.3g}")
    assert not errors, f"{what}: " + "; ".join(errors)


def _peft_two_config(config: LoRAConfig, builder: Builder, model: str):
    from peft import LoraConfig

    return LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules, use_rslora=config.use_rslora, use_dora=config.use_dora,
                      task_type=builder.peft_task_type, fan_in_fan_out=model == "gpt2")


def _peft_set(pm, names: list[str]) -> None:
    pm.base_model.set_adapter(names)


def check_two_peft_export(row: TwoRow, tmp_path) -> None:
    from peft import PeftModel

    p = two_prepared(row.id)
    save_adapter(p.model, tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_config.json").is_file()  # PEFT's layout: "default" at the root ...
    assert (tmp_path / "ours" / SECOND / "adapter_model.safetensors").is_file()  # ... the other in its folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(_two_base(row), str(tmp_path / "ours")).eval()
        theirs.load_adapter(str(tmp_path / "ours" / SECOND), adapter_name=SECOND)
    outs = _run_active(p.builder, theirs, p.x, lambda names: _peft_set(theirs, names))
    _two_close(outs, p.outs, "PEFT loading our two adapters vs ours")


def check_two_peft_import(row: TwoRow, tmp_path) -> None:
    from peft import get_peft_model

    p = two_prepared(row.id)
    configs = row.configs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_two_base(row), _peft_two_config(configs["default"], p.builder, row.model))
        pm.add_adapter(SECOND, _peft_two_config(configs[SECOND], p.builder, row.model))
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():  # every adapter tensor of both adapters (PEFT freezes the inactive one)
            for name, param in pm.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
                    param.add_((0.05 * noise * (1 + param.detach().double().abs())).to(param.dtype))
        pm.eval()
        expected = _run_active(p.builder, pm, p.x, lambda names: _peft_set(pm, names))
        pm.save_pretrained(str(tmp_path / "peft"))
    for key in ACTIVE:
        _assert_changed(expected[key], p.base_out)
    ours = _two_base(row)
    load_adapter(ours, tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft", adapter_name=SECOND)  # reads peft/second/ (PEFT's layout)
    assert adapter_names(ours) == ["default", SECOND]
    outs = _run_active(p.builder, ours, p.x, lambda names: set_adapter(ours, names))
    _two_close(outs, expected, "our load of PEFT's two adapters vs PEFT")


def check_two_merge(row: TwoRow) -> None:
    p = two_prepared(row.id)
    got = {}
    for key in ("both", SECOND):
        model = copy.deepcopy(p.model)
        set_adapter(model, ACTIVE[key])
        merged = merge_and_unload(model)
        assert list(merged.state_dict()) == p.base_keys
        got[key] = p.builder.run(merged, p.x)
    got["default"] = p.outs["default"]
    _two_close(got, p.outs, "merge_and_unload of the active adapters vs adapted")


def check_two_mixed(row: TwoRow) -> None:
    p = two_prepared(row.id)
    model = copy.deepcopy(p.model)
    order = ["default", SECOND, "__base__"]
    n = len(p.x)
    x = torch.cat([p.x] * len(order))
    names = [name for name in order for _ in range(n)]
    with mixed_batch(model, names):
        out = p.builder.run(model, x)
    got = {("both" if k == "__base__" else k): out[i * n:(i + 1) * n] for i, k in enumerate(order)}
    expected = {**p.outs, "both": p.outs["__base__"]}
    _two_close(got, expected, "mixed_batch rows vs each adapter alone (both: the base rows)")
    assert active_adapters(model) == ACTIVE["both"]
    assert torch.equal(p.builder.run(model, p.x), p.outs["both"])  # after the block: the active adapters again


TWO_CHECKS = {"peft_export": check_two_peft_export, "peft_import": check_two_peft_import, "merge": check_two_merge,
              "mixed": check_two_mixed}


@pytest.mark.parametrize("check", list(TWO_CHECKS))
@pytest.mark.parametrize("row", TWO_ROWS, ids=[row.id for row in TWO_ROWS])
def test_two_adapters(row: TwoRow, check: str, tmp_path) -> None:
    if check.startswith("peft"):
        pytest.importorskip("peft")
        TWO_CHECKS[check](row, tmp_path)
    else:
        TWO_CHECKS[check](row)


def test_the_two_adapter_matrix_covers_every_layer_kind_and_variant():
    assert {row.layer for row in TWO_ROWS} >= {"linear", "conv1d", "embedding+linear", "conv"}
    assert {row.model for row in TWO_ROWS} >= {"llama", "gpt2", "emb", "conv1d", "conv2d"}
    both = [{**row.first, **{f"second_{k}": v for k, v in row.second.items()}} for row in TWO_ROWS]
    assert any(c.get("use_dora") and c.get("second_use_dora") for c in both)  # DoRA + DoRA
    assert any(c.get("use_dora") and not c.get("second_use_dora") for c in both)  # DoRA + plain, both orders
    assert any(not c.get("use_dora") and c.get("second_use_dora") for c in both)
    assert any(c.get("use_rslora") for c in both) and any(c.get("second_use_rslora") for c in both)
    assert {row.dtype for row in TWO_ROWS} == {F32, F64}


# --- layer kinds that hold one adapter only
TWO_REFUSED = {  # model, first adapter, second adapter, the message, a second adapter the model accepts
    "nf4-base": ("llama", dict(target_modules=QV, quantize_base="nf4", quantize_base_modules="adapted"),
                 dict(target_modules=["q_proj"]), r"model\.layers\.0\.self_attn\.q_proj \(\w+\)",
                 dict(target_modules=["k_proj"])),
    "nf4-second": ("llama", dict(target_modules=QV), dict(target_modules=["k_proj"], quantize_base="nf4"),
                   "quantize_base", dict(target_modules=["k_proj"])),
    # a model whose adapters include target_parameters takes no second adapter at all
    "target-parameters": ("qwen3-moe", dict(target_modules=["q_proj"], target_parameters=EXPERTS),
                          dict(target_modules=["q_proj"]), "include target_parameters adapters", None),
    "mha": ("attn", dict(target_modules=["attn", "head"]), dict(target_modules=["attn"]),
            r"'attn \(\w+\)'", dict(target_modules=["head"])),
    "mha-all-linear": ("attn", dict(target_modules=["attn"]), dict(target_modules="all-linear"),
                       r"'attn \(\w+\)'", dict(target_modules=["head"])),
}


@pytest.mark.parametrize("case", list(TWO_REFUSED))
def test_two_adapters_refused(case):
    """A second adapter on a layer that holds one adapter only is a `LoRAError` naming the layer (or the option
    a second adapter cannot have), and the model is left as it was: the same keys and values, one adapter that
    computes what it did. A second adapter elsewhere in the same model is accepted (but beside target_parameters
    adapters, which take no second adapter anywhere)."""
    model_name, first, second, message, accepted = TWO_REFUSED[case]
    if first.get("quantize_base") or second.get("quantize_base"):
        pytest.importorskip("torchao", reason="quantize_base='nf4' needs torchao")
    builder = BUILDERS[model_name]
    model = builder.make()
    inject_lora(model, LoRAConfig(r=4, **first))
    _perturb(model)
    before, out = _tensors(model), builder.run(model, builder.inputs())
    with pytest.raises(LoRAError, match=message) as info:
        inject_lora(model, LoRAConfig(r=2, **second), adapter_name=SECOND)
    assert SECOND in str(info.value)  # the adapter's name is in the message too
    assert adapter_names(model) == ["default"]
    after = _tensors(model)
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(builder.run(model, builder.inputs()), out)
    if accepted is None:
        return
    assert inject_lora(model, LoRAConfig(r=2, **accepted), adapter_name=SECOND)
    assert adapter_names(model) == ["default", SECOND]
