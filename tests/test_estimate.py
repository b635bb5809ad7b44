"""Tests of `lightning-lora estimate` / `lightning_lora.estimate`.

Parameter counts are checked to the digit; memory estimates are checked against the measured peak of
real training steps on CPU (tiny Llamas built in code and the real SmolLM2-135M).

How a peak is measured (each group of settings in its own fresh subprocess): build the model,
inject LoRA, make the optimizer; then run 2 steps (forward, backward, `optimizer.step()`,
`zero_grad()`) under `torch.profiler` with `profile_memory=True`, which reports every CPU tensor
allocation and free made by PyTorch's allocator. The running sum of those events is the live tensor
memory allocated during the steps; its maximum plus the bytes of the weights (and buffers) that
exist before the steps is the peak, the CPU counterpart of `torch.cuda.max_memory_allocated()`.
Process RSS is not used: it also holds the Python/torch runtime, the allocator's cached pages and
the profiler's own buffers. See `benchmarks/estimate_accuracy.md`.

Run as a script to print the measured-vs-estimated markdown table for every setting (minutes), or
for the settings whose id contains one of the given strings:

    python tests/test_estimate.py --markdown [qlora peft-dora ...]

QLoRA settings need torchao and DoRA settings need PEFT; settings whose package is missing are left out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
MIB = 1024**2

#: a vocabulary-heavy tiny Llama (the loss dominates, as in real LLMs)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=8000, max_position_embeddings=1024, tie_word_embeddings=False)
#: an MLP-heavy tiny Llama with tied embeddings (the layers dominate: exercises recompute and gradients)
TINY_MLP = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True)
#: the same vocabulary-heavy model with eager attention (s x s attention probabilities)
TINY_EAGER = {**TINY, "vocab_size": 2000, "attn_implementation": "eager"}
MODELS = {"tiny": TINY, "tiny-mlp": TINY_MLP, "tiny-eager": TINY_EAGER, "smollm2": "smollm2-135m-instruct"}


#: modes: "full", "lora" (ours), "qlora" (ours on torchao NF4 weights), "peft-lora" / "peft-dora" (PEFT's layers)
ADAPTER_MODES = ("lora", "qlora", "peft-lora", "peft-dora")


def _setting(model: str, mode: str, precision: str, batch: int, seq: int, r: int = 8,
             targets: list[str] | str = ("q_proj", "v_proj"), gc: bool = False, optimizer: str = "adamw",
             impl: str = "for-loop", in_tests: bool = True, quantize_modules: str = "adapted",
             chunked: bool = False) -> dict[str, Any]:
    targets = targets if isinstance(targets, str) else list(targets)
    tname = "all-linear" if targets == "all-linear" else "+".join(t.removesuffix("_proj") for t in targets)
    sid = (f"{model}-{mode}-{precision}-b{batch}s{seq}" + (f"-r{r}-{tname}" if mode in ADAPTER_MODES else "")
           + (f"-nf4-{quantize_modules}" if mode == "qlora" else "")
           + ("-gc" if gc else "") + (f"-{optimizer}" if optimizer != "adamw" else "") + f"-{impl}"
           + ("-chunked" if chunked else ""))
    needs = {"qlora": "torchao", "peft-lora": "peft", "peft-dora": "peft"}.get(mode)
    return dict(id=sid, model=model, mode=mode, precision=precision, batch=batch, seq=seq, r=r, targets=targets,
                gc=gc, optimizer=optimizer, impl=impl, in_tests=in_tests, quantize_modules=quantize_modules,
                needs=needs, chunked=chunked)


def _available(spec: dict[str, Any]) -> bool:
    import importlib.util

    return spec["needs"] is None or importlib.util.find_spec(spec["needs"]) is not None


#: every measured setting; `in_tests` ones run in the test suite (the others with --markdown)
SETTINGS = [
    _setting("tiny", "lora", "32-true", 2, 512),
    _setting("tiny", "full", "32-true", 2, 512),
    _setting("tiny", "lora", "bf16-true", 2, 256, r=16, targets="all-linear"),
    _setting("tiny", "full", "bf16-true", 2, 256),
    _setting("tiny", "lora", "bf16-mixed", 2, 256),
    # CausalLM's chunked loss (lightning_lora.loss): no vocabulary-sized tensor kept
    _setting("tiny", "lora", "32-true", 2, 512, chunked=True),
    _setting("tiny", "lora", "bf16-true", 2, 256, r=16, targets="all-linear", chunked=True),
    _setting("tiny", "full", "bf16-mixed", 2, 256, in_tests=False),
    _setting("tiny", "lora", "32-true", 4, 256, r=32, targets="all-linear", in_tests=False),
    _setting("tiny", "full", "32-true", 2, 512, impl="foreach", in_tests=False),
    _setting("tiny", "full", "32-true", 2, 512, impl="fused", in_tests=False),
    _setting("tiny", "full", "32-true", 2, 512, optimizer="sgd", in_tests=False),
    _setting("tiny", "lora", "32-true", 2, 512, gc=True, in_tests=False),
    _setting("tiny-mlp", "lora", "32-true", 2, 512, r=32, gc=True),
    _setting("tiny-mlp", "full", "32-true", 2, 256, gc=True),
    _setting("tiny-mlp", "full", "32-true", 1, 512, optimizer="sgd-momentum"),
    _setting("tiny-mlp", "full", "32-true", 1, 64, impl="foreach"),
    _setting("tiny-mlp", "full", "32-true", 1, 64, in_tests=False),
    _setting("tiny-mlp", "lora", "bf16-true", 2, 512, r=16, targets="all-linear", gc=True, in_tests=False),
    _setting("tiny-mlp", "lora", "bf16-mixed", 2, 256, gc=True, in_tests=False),
    _setting("tiny-mlp", "full", "32-true", 2, 256, in_tests=False),
    _setting("tiny-eager", "lora", "32-true", 2, 256, in_tests=False),
    _setting("tiny-eager", "full", "bf16-true", 2, 256, in_tests=False),
    _setting("tiny-eager", "lora", "bf16-mixed", 2, 256, in_tests=False),
    _setting("smollm2", "lora", "32-true", 1, 128),
    _setting("smollm2", "full", "32-true", 1, 64, impl="fused"),
    _setting("smollm2", "lora", "bf16-true", 1, 64),
    _setting("smollm2", "lora", "32-true", 1, 256, in_tests=False),
    _setting("smollm2", "lora", "bf16-true", 2, 128, r=16, targets="all-linear", in_tests=False),
    _setting("smollm2", "lora", "bf16-true", 2, 256, gc=True, in_tests=False),
    _setting("smollm2", "lora", "bf16-mixed", 1, 128, in_tests=False),
    _setting("smollm2", "full", "bf16-true", 1, 128, impl="fused", in_tests=False),
    _setting("smollm2", "full", "32-true", 1, 128, in_tests=False),
    # QLoRA: our adapters on torchao NF4 base weights (needs torchao; the test skips without it)
    _setting("tiny", "qlora", "bf16-true", 2, 256, quantize_modules="all-linear"),
    _setting("tiny", "qlora", "bf16-true", 2, 256, in_tests=False),
    _setting("tiny", "qlora", "bf16-true", 2, 256, r=16, targets="all-linear", in_tests=False),
    _setting("tiny-mlp", "qlora", "bf16-true", 4, 512, r=16, targets="all-linear", gc=True,
             quantize_modules="all-linear"),
    _setting("tiny-mlp", "qlora", "32-true", 1, 256, quantize_modules="all-linear", in_tests=False),
    _setting("smollm2", "qlora", "bf16-true", 1, 128, quantize_modules="all-linear", in_tests=False),
    # DoRA: PEFT's DoRA layers (use_dora=True), next to PEFT's plain LoRA
    _setting("tiny", "peft-dora", "32-true", 2, 256),
    _setting("tiny", "peft-lora", "32-true", 2, 256, in_tests=False),
    _setting("tiny", "peft-dora", "32-true", 2, 256, r=16, targets="all-linear", in_tests=False),
    _setting("tiny-mlp", "peft-dora", "32-true", 2, 512, r=16, targets="all-linear", gc=True),
    _setting("tiny", "peft-lora", "bf16-true", 2, 256, r=16, targets="all-linear", in_tests=False),
    _setting("tiny", "peft-dora", "bf16-true", 2, 256, r=16, targets="all-linear", in_tests=False),
]
TEST_SETTINGS = [s for s in SETTINGS if s["in_tests"]]


# ------------------------------------------------------------------------------------ measurement
def measure_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak tensor memory (bytes) of 2 real training steps on CPU for one setting."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.loss import causal_lm_loss

    torch.manual_seed(0)
    precision = spec["precision"]
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    source = MODELS[spec["model"]]
    if isinstance(source, str):
        from lightning_lora.hub import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(source), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**source), dtype=dtype)
    if spec["mode"] in ("lora", "qlora"):
        inject_lora(model, LoRAConfig(r=spec["r"], target_modules=spec["targets"]))
    if spec["mode"] == "qlora":
        _quantize_nf4(model, spec["quantize_modules"])
    if spec["mode"] in ("peft-lora", "peft-dora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=spec["targets"], use_dora=spec["mode"] == "peft-dora"))
    model.train()
    if spec["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[spec["impl"]]
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, **impl)
    else:
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9 if spec["optimizer"] == "sgd-momentum" else 0.0)
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]))
    tensors = {ptr: size for t in [*model.parameters(), *model.buffers()] for ptr, size in _storages(t)}
    weights = sum(tensors.values())
    gc.collect()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.endswith("-mixed")):
                if spec.get("chunked"):
                    total, n = causal_lm_loss(model, ids, ids)
                    loss = total / n
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    seconds = time.perf_counter() - start
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"id": spec["id"], "peak": weights + peak, "weights": weights, "after": live, "seconds": round(seconds, 1)}


def _storages(t: Any) -> list[tuple[int, int]]:
    """`(data_ptr, bytes)` of the storage behind a tensor; an NF4 tensor's inner tensors one by one."""
    if type(t).__name__ == "NF4Tensor":
        inner = [getattr(t, n) for n in ("quantized_data", "quantized_scalers", "quantization_factor",
                                         "scaler_mean", "nf4")]
        return [(x.data_ptr(), x.numel() * x.element_size()) for x in inner]
    return [(t.data_ptr(), t.numel() * t.element_size())]


def _quantize_nf4(model: Any, modules: str) -> None:
    """Store linear weights as torchao NF4 (`to_nf4`), as `estimate_memory(quantize="nf4")` counts them:
    the adapted layers' base weights, or every linear layer but the output head and the adapters."""
    import torch
    from torchao.quantization import to_nf4

    from lightning_lora.estimate.quantize import nf4_quantizable
    from lightning_lora.layers import LoRALinear
    from lightning_lora.surgery import lora_layers

    adapters = tuple(f"{name}." for name, _ in lora_layers(model))
    for name, module in list(model.named_modules()):
        if adapters and name.startswith(adapters):
            continue
        adapted = isinstance(module, LoRALinear)
        if not (adapted or type(module) is torch.nn.Linear) or name.rsplit(".", 1)[-1] == "lm_head":
            continue
        if (adapted or modules == "all-linear") and nf4_quantizable(module.weight.numel()):
            module.weight = torch.nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)


def run_measurements(specs: list[dict[str, Any]], timeout: float = 900) -> dict[str, dict[str, Any]]:
    """Measure `specs` in fresh subprocesses, one per model (run side by side); id -> result."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        groups.setdefault("smollm2" if spec["model"] == "smollm2" else "tiny", []).append(spec)
    # one thread each: two OpenMP pools on shared cores spin against each other (20x slower); memory is the same
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, "--measure", json.dumps(group)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for group in groups.values()]
    results: dict[str, dict[str, Any]] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"measurement subprocess failed ({proc.returncode}):\n{err[-3000:]}")
        for line in out.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                results[result["id"]] = result
    return results


def estimate_for(spec: dict[str, Any], smollm2_dir: str | None = None) -> Any:
    """The `MemoryBreakdown` that `estimate_memory` gives for a measured setting."""
    from transformers import LlamaConfig

    from lightning_lora.estimate import estimate_memory

    source = MODELS[spec["model"]]
    model: Any = (smollm2_dir or source) if isinstance(source, str) else LlamaConfig(**source)
    est = estimate_memory(model, r=spec["r"], target_modules=spec["targets"], precision=spec["precision"],
                          batch_size=spec["batch"], seq_len=spec["seq"], gradient_checkpointing=spec["gc"],
                          optimizer=spec["optimizer"], optimizer_impl=spec["impl"],
                          quantize="nf4" if spec["mode"] == "qlora" else None,
                          quantize_modules=spec["quantize_modules"] if spec["mode"] == "qlora" else None,
                          use_dora=spec["mode"] == "peft-dora", chunked_loss=spec.get("chunked", False))
    return getattr(est, {"peft-lora": "lora", "peft-dora": "lora"}.get(spec["mode"], spec["mode"]))


# ----------------------------------------------------------------------------------- parameters
def test_llama3_8b_parameter_counts_exact():
    from lightning_lora.estimate import estimate_memory

    est = estimate_memory("llama-3-8b", r=8, target_modules=["q_proj", "v_proj"])
    per_layer = 8 * (4096 + 4096) + 8 * (4096 + 1024)  # q: 4096 -> 4096, v: 4096 -> 1024
    assert per_layer == 65_536 + 40_960
    assert est.lora.trainable_params == 32 * per_layer == 3_407_872
    assert est.full.trainable_params == est.full.total_params == 8_030_261_248
    assert est.lora.total_params == 8_030_261_248 + 3_407_872
    all_linear = estimate_memory("llama-3-8b", r=8, target_modules="all-linear").lora.trainable_params
    # q, o: 4096 -> 4096; k, v: 4096 -> 1024; gate, up: 4096 -> 14336; down: 14336 -> 4096
    assert all_linear == 32 * 8 * (2 * 8192 + 2 * 5120 + 3 * 18432) == 20_971_520


@pytest.mark.parametrize("name, total", [("llama-3.2-1b", 1_235_814_400), ("llama-3-70b", 70_553_706_496),
                                         ("mistral-7b", 7_248_023_552),
                                         ("qwen2.5-7b", 7_615_616_512), ("smollm2-135m", 134_515_008)])
def test_shipped_configs_match_public_parameter_counts(name, total):
    from lightning_lora.estimate import estimate_memory

    est = estimate_memory(name.upper(), seq_len=128)  # names are case-insensitive
    assert est.full.total_params == total
    assert est.lora.trainable_params > 0 and est.lora.total_params == total + est.lora.trainable_params


def test_model_dir_config_json_and_bundled_smollm2(tmp_path, smollm2_path):
    from lightning_lora.estimate import (
        CONFIG_DIR,
        estimate_memory,
        known_models,
        load_model_config,
    )

    assert {"llama-3-8b", "llama-3.2-1b", "mistral-7b", "qwen2.5-7b", "smollm2-135m",
            "smollm2-135m-instruct"} <= set(known_models())
    (tmp_path / "config.json").write_text((CONFIG_DIR / "llama-3.2-1b.json").read_text())
    by_file = estimate_memory(str(tmp_path / "config.json"), seq_len=64)
    by_dir = estimate_memory(str(tmp_path), seq_len=64)
    assert by_file.full.total_params == by_dir.full.total_params == 1_235_814_400
    name, cfg = load_model_config("smollm2-135m-instruct")  # hub.resolve_model's directory, config only
    assert name == "smollm2-135m-instruct" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    assert (estimate_memory(smollm2_path, seq_len=64).full.total_params
            == estimate_memory("smollm2-135m", seq_len=64).full.total_params == 134_515_008)


# ------------------------------------------------------------------------------ memory, measured
@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, Any]]:
    return run_measurements([s for s in TEST_SETTINGS if _available(s)])


@pytest.mark.parametrize("spec", TEST_SETTINGS, ids=[s["id"] for s in TEST_SETTINGS])
def test_estimate_within_25_percent_of_measured_peak(spec, measured, smollm2_path):
    if not _available(spec):
        pytest.skip(f"{spec['needs']} is not installed (pip install 'lightning-lora[qlora]')")
    result = measured[spec["id"]]
    part = estimate_for(spec, smollm2_path)
    error = (part.total - result["peak"]) / result["peak"]
    print(f"{spec['id']}: measured {result['peak'] / MIB:.1f} MiB, estimated {part.total / MIB:.1f} MiB, "
          f"error {100 * error:+.2f}%")
    assert result["peak"] > 50 * MIB  # large enough to be measured well
    assert part.weights == result["weights"]  # real dtypes: bf16 base, fp32 adapters
    # after the steps only the optimizer state is left (plus AdamW's 4-byte step counters): nothing leaked
    assert 0 <= result["after"] - part.optimizer < MIB
    assert abs(error) < 0.25


# ------------------------------------------------------------------------------ the big picture
def test_llama3_8b_lora_fits_24gb_full_does_not():
    from lightning_lora.estimate import estimate_memory

    kw = dict(r=8, target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=2048, gradient_checkpointing=True,
              optimizer="adamw")
    est = estimate_memory("llama-3-8b", precision="bf16-true", **kw)
    assert est.lora.total < 24e9 and est.lora.total < 24 * GIB
    # bf16-true full fine-tune: bf16 weights, gradients and (torch.optim) bf16 moments, plus the
    # foreach temporaries: well over 64 GiB
    assert est.full.total > 70 * GIB and est.full.total > 3 * est.lora.total
    assert est.full.gradients == 2 * 8_030_261_248 and est.full.optimizer == 2 * 2 * 8_030_261_248
    # mixed precision full fine-tune (fp32 weights, gradients and moments): over 100 GB
    assert estimate_memory("llama-3-8b", precision="bf16-mixed", **kw).full.total > 100e9
    # the loss's fp32 logits dominate the LoRA activations at 128k vocabulary x 2048 tokens
    assert est.lora.activations > 12 * 128_256 * 2048
    assert est.lora.optimizer == 2 * 4 * est.lora.trainable_params  # two fp32 moments per adapter parameter


def test_settings_move_the_estimate_the_right_way():
    from lightning_lora.estimate import estimate_memory

    base = estimate_memory("smollm2-135m", seq_len=1024)
    checkpointed = estimate_memory("smollm2-135m", seq_len=1024, gradient_checkpointing=True)
    assert checkpointed.lora.activations < base.lora.activations
    assert estimate_memory("smollm2-135m", seq_len=1024, batch_size=2).lora.activations > base.lora.activations
    sgd = estimate_memory("smollm2-135m", seq_len=1024, optimizer="sgd")
    assert sgd.full.optimizer == sgd.lora.optimizer == 0
    assert 0 < estimate_memory("smollm2-135m", seq_len=1024, optimizer="adamw8bit").full.optimizer < base.full.optimizer
    fp32 = estimate_memory("smollm2-135m", seq_len=1024, precision="32-true")
    assert fp32.full.gradients == 2 * base.full.gradients  # bf16 -> fp32 base weights
    assert fp32.lora.trainable_params == base.lora.trainable_params
    with pytest.raises(ValueError, match="precision"):
        estimate_memory("smollm2-135m", precision="fp8")


def test_estimate_to_dict_is_json_with_every_number():
    from lightning_lora.estimate import estimate_memory

    data = json.loads(json.dumps(estimate_memory("smollm2-135m", seq_len=256).to_dict()))
    for key in ("full", "lora"):
        assert {"trainable_params", "total_params", "weights_bytes", "gradients_bytes", "optimizer_bytes",
                "activations_bytes", "total_bytes"} <= set(data[key])
    assert data["settings"]["seq_len"] == 256 and data["config"]["vocab_size"] == 49152


def test_docstring_examples():
    import doctest
    import importlib
    import pkgutil

    import lightning_lora.estimate as package

    failed = attempted = 0
    for name in ["", *(f".{m.name}" for m in pkgutil.iter_modules(package.__path__))]:
        result = doctest.testmod(importlib.import_module(f"lightning_lora.estimate{name}"),
                                 optionflags=doctest.ELLIPSIS)
        failed, attempted = failed + result.failed, attempted + result.attempted
    assert failed == 0 and attempted > 5


# ------------------------------------------------------------------------------ QLoRA (4-bit base)
#: Llama-3-8B projections (out, in) per layer
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
             "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def test_nf4_and_bnb_layouts_count_every_byte():
    from lightning_lora.estimate import bnb_nf4_layout, nf4_layout
    from lightning_lora.estimate.quantize import nf4_quantizable

    n = 1024 * 4096  # a Llama-3-8B v_proj
    nf4 = nf4_layout(n, dtype_bytes=2)
    # torchao to_nf4: uint8 codes n/2; int8 scalers n/64; bf16 factor per 256 scalers; bf16 mean; 16-entry bf16 table
    assert (nf4.packed, nf4.scales, nf4.replicated) == (n // 2, n // 64 + 2 * (n // 64 // 256), 2 + 16 * 2)
    assert nf4.total == 2_097_152 + 65_536 + 512 + 34 == 2_163_234
    assert nf4_layout(n, dtype_bytes=4).total == 2_097_152 + 65_536 + 1_024 + 68  # fp32 factor, mean and table
    bnb = bnb_nf4_layout(n)
    # bitsandbytes: uint8 codes; uint8 absmax per 64; fp32 nested absmax per 256; fp32 8-bit map, offset, nf4 table
    assert (bnb.packed, bnb.scales, bnb.replicated) == (n // 2, n // 64 + 4 * 256, 1024 + 4 + 64)
    assert bnb.total == 2_164_804
    odd = bnb_nf4_layout(1001)  # any size: ceil(1001 / 2) codes, ceil(1001 / 64) = 16 blocks, 1 nested block
    assert (odd.packed, odd.scales, odd.total) == (501, 16 + 4, 501 + 20 + 1092)
    assert not nf4_quantizable(576 * 576) and nf4_quantizable(1536 * 576)  # to_nf4 needs n % (64 * 256) == 0
    # per FSDP rank: torchao splits codes, scalers and factors; bitsandbytes only shards the codes
    assert nf4.per_rank(8) == 2_097_152 // 8 + (65_536 + 512) // 8 + 34
    assert bnb.per_rank(8) == 2_097_152 // 8 + 65_536 + 1_024 + 1_092
    assert nf4.total / (2 * n) < 0.26  # <= 0.30x of the bf16 bytes


def test_dequantisation_transient_exact():
    from lightning_lora.estimate import dequant_transient

    n = 14336 * 4096
    # torchao eager get_original_weight: two int64 index halves (8 bytes per weight), two looked-up and two
    # scaled bf16 halves plus the stacked bf16 result (3 x 2 bytes), and the bf16 scalers
    assert dequant_transient("nf4", n, 2, 2) == 14 * n + 2 * (n // 64)
    assert dequant_transient("nf4", n, 4, 4) == 20 * n + 4 * (n // 64)
    # bitsandbytes: the bf16 weight and the fp32 absmax twice
    assert dequant_transient("bnb-nf4", n, 2, 2) == 2 * n + 8 * (n // 64)


def test_nf4_layout_matches_torchao_to_nf4():
    torch = pytest.importorskip("torch")
    ao = pytest.importorskip("torchao.quantization")
    from lightning_lora.estimate import nf4_layout

    for shape, dtype in (((1024, 512), torch.bfloat16), ((256, 704), torch.float32)):
        t = ao.to_nf4(torch.randn(shape, dtype=dtype))
        inner = [t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4]
        assert sum(x.numel() * x.element_size() for x in inner) == nf4_layout(t.numel(), t.element_size()).total


def test_bnb_layout_matches_bitsandbytes_quantize_4bit():
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from lightning_lora.estimate import bnb_nf4_layout

    for shape in ((1024, 4096), (3, 1001)):
        packed, state = bnb_f.quantize_4bit(torch.randn(shape, dtype=torch.bfloat16), blocksize=64,
                                            compress_statistics=True, quant_type="nf4")
        parts = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        assert sum(x.numel() * x.element_size() for x in parts) == bnb_nf4_layout(shape[0] * shape[1]).total


def test_llama3_8b_qlora_under_10_gib_lora_unchanged():
    from lightning_lora.estimate import (
        dequant_transient,
        estimate_memory,
        format_bytes,
        nf4_layout,
    )

    kw = dict(r=8, target_modules=["q_proj", "v_proj"], precision="bf16-true", batch_size=1, seq_len=2048,
              gradient_checkpointing=True)
    est = estimate_memory("llama-3-8b", quantize="nf4", **kw)  # the default: every linear layer but the head
    assert est.to_dict()["settings"]["quantize_modules"] == "all-linear"
    assert est.to_dict() == estimate_memory("llama-3-8b", quantize="nf4", quantize_modules="all-linear", **kw).to_dict()
    assert format_bytes(est.lora.total) == "18.46 GiB"  # the LoRA column is the same as without --quantize
    assert format_bytes(est.qlora.total) == "8.82 GiB"
    assert est.qlora.total <= 10 * GIB < est.lora.total
    four_bit = 32 * sum(nf4_layout(o * i, 2).total for o, i in LLAMA3_8B.values())
    assert est.qlora.quantized_weights == four_bit
    assert est.lora.weights - est.qlora.weights == 32 * sum(2 * o * i for o, i in LLAMA3_8B.values()) - four_bit
    # same adapters: parameters, gradients and optimizer state do not change
    assert (est.qlora.trainable_params, est.qlora.gradients, est.qlora.optimizer) == (
        est.lora.trainable_params, est.lora.gradients, est.lora.optimizer)
    assert est.qlora.dequant_temp == dequant_transient("nf4", 14336 * 4096, 2, 2)
    adapted = estimate_memory("llama-3-8b", quantize="bnb-nf4", quantize_modules="adapted", **kw).qlora
    assert format_bytes(adapted.total) == "17.54 GiB"  # only q, v in 4 bits: the frozen MLP stays bf16
    from lightning_lora.estimate import bnb_nf4_layout

    assert adapted.quantized_weights == 32 * (bnb_nf4_layout(4096 * 4096).total + bnb_nf4_layout(1024 * 4096).total)
    assert est.to_dict()["qlora"]["quantized_weights_bytes"] == four_bit


def test_quantize_errors_and_unquantizable_weights_noted():
    from lightning_lora.estimate import estimate_memory

    with pytest.raises(ValueError, match="quantize='int3'"):
        estimate_memory("smollm2-135m", quantize="int3")
    with pytest.raises(ValueError, match="bf16-true"):
        estimate_memory("smollm2-135m", quantize="nf4", precision="bf16-mixed")
    with pytest.raises(ValueError, match="quantize_modules"):
        estimate_memory("smollm2-135m", quantize="nf4", quantize_modules="some")
    with pytest.raises(ValueError, match=r"quantize_modules='all-linear' needs quantize \(which 4-bit format\?\); "
                                         r"add --quantize nf4"):
        estimate_memory("smollm2-135m", quantize_modules="all-linear")
    est = estimate_memory("smollm2-135m", seq_len=64, quantize="nf4", quantize_modules="all-linear")
    # SmolLM2's attention weights (576 x 576, 192 x 576) are not multiples of 64 x 256: only the MLP is 4-bit
    assert est.qlora.quantized_weights == 30 * 3 * nf4_total(1536 * 576)
    assert any("stay unquantised" in note for note in est.notes)


def nf4_total(n: int) -> int:
    from lightning_lora.estimate import nf4_layout

    return nf4_layout(n, 2).total


# ------------------------------------------------------------------------------------------- DoRA
def test_dora_counts_one_magnitude_per_output_feature():
    from lightning_lora.estimate import estimate_memory

    lora = estimate_memory("llama-3-8b")
    dora = estimate_memory("llama-3-8b", use_dora=True)
    mags = 32 * (4096 + 1024)  # q_proj and v_proj outputs
    assert dora.lora.magnitude_params == mags == 163_840
    assert dora.lora.trainable_params == lora.lora.trainable_params + mags == 3_571_712
    assert dora.lora.total_params == lora.lora.total_params + mags
    # fp32 like the adapters: weights, gradients, two AdamW moments
    assert dora.lora.weights - lora.lora.weights == 4 * mags
    assert dora.lora.gradients - lora.lora.gradients == 4 * mags
    assert dora.lora.optimizer - lora.lora.optimizer == 8 * mags
    # activations: the bf16 base output and the fp32 adapter output of every adapted layer, per token
    assert dora.lora.activations - lora.lora.activations == 32 * 2048 * (2 + 4) * (4096 + 1024)
    assert dora.full.total == lora.full.total and dora.full.magnitude_params == 0
    all_linear = estimate_memory("llama-3-8b", target_modules="all-linear", use_dora=True).lora
    assert all_linear.magnitude_params == 32 * sum(o for o, _ in LLAMA3_8B.values()) == 1_376_256


def test_dora_weight_norm_transient_and_errors():
    from lightning_lora.estimate import dora_norm_temp, estimate_memory

    # PEFT: eye(in) fp32, A(eye), B(A(eye)) (in x out), W cast to fp32, W + s*BA and the scaled BA
    assert dora_norm_temp(14336, 4096, 8, 4, 2) == 4 * (14336 ** 2 + 14336 * 8 + 3 * 14336 * 4096 + 4096 * 14336)
    assert dora_norm_temp(64, 32, 4, 4, 4) == 4 * (64 * 64 + 64 * 4 + 64 * 32 + 2 * 32 * 64)  # fp32 base: no cast
    with pytest.raises(ValueError, match="Embedding"):
        estimate_memory("smollm2-135m", target_modules=["embed_tokens", "q_proj"], use_dora=True)


# ------------------------------------------------------------------- several adapters (frozen ones)
#: TINY with LoRA r=8 on q, v: q 256 -> 256, v 256 -> 64 (2 kv heads of 32); 4 layers; fp32 adapters
TINY_QV_ADAPTER = 4 * 8 * ((256 + 256) + (256 + 64))


def test_frozen_adapters_add_weights_only():
    from transformers import LlamaConfig

    from lightning_lora.estimate import estimate_memory

    kw = dict(r=8, target_modules=["q_proj", "v_proj"], precision="32-true", batch_size=2, seq_len=128)
    one = estimate_memory(LlamaConfig(**TINY), **kw)
    four = estimate_memory(LlamaConfig(**TINY), frozen_adapters=3, **kw)
    assert one.lora.trainable_params == TINY_QV_ADAPTER == 26_624
    a, b = one.lora, four.lora
    assert b.frozen_adapter_params == 3 * TINY_QV_ADAPTER and a.frozen_adapter_params == a.frozen_adapter_weights == 0
    assert b.frozen_adapter_weights == b.weights - a.weights == 3 * TINY_QV_ADAPTER * 4  # fp32 adapters
    assert b.total_params == a.total_params + 3 * TINY_QV_ADAPTER and b.trainable_params == a.trainable_params
    assert (b.gradients, b.optimizer, b.optimizer_step_temp) == (a.gradients, a.optimizer, a.optimizer_step_temp)
    # they run: FusedLoRA keeps each one's A output (r fp32 columns per token) in the 8 adapted linears
    assert b.activations - a.activations == 4 * 2 * 3 * 8 * 4 * (2 * 128)
    assert b.total - a.total == (b.weights - a.weights) + (b.activations - a.activations)
    assert four.full == one.full  # the full fine-tune carries no adapters
    assert four.settings["frozen_adapters"] == 3 and one.settings["frozen_adapters"] == 0


def test_frozen_adapters_mixed_precision_dora_qlora_and_fsdp():
    from transformers import LlamaConfig

    from lightning_lora.estimate import estimate_memory

    kw = dict(r=8, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=128)
    # autocast: a frozen adapter keeps only its 16-bit A and B copies, where its input needs grad (layers 1-3)
    a, b = (estimate_memory(LlamaConfig(**TINY), precision="bf16-mixed", frozen_adapters=n, **kw).lora for n in (0, 2))
    assert b.weights - a.weights == 2 * TINY_QV_ADAPTER * 4
    assert b.activations - a.activations == 2 * 2 * (3 * TINY_QV_ADAPTER // 4)
    # DoRA: their magnitudes too (one fp32 per output feature of q and v), frozen; they keep no outputs
    a, b = (estimate_memory(LlamaConfig(**TINY), precision="32-true", use_dora=True, frozen_adapters=n, **kw).lora
            for n in (0, 2))
    mags = 4 * (256 + 64)
    assert b.frozen_adapter_params == 2 * (TINY_QV_ADAPTER + mags) and b.magnitude_params == a.magnitude_params == mags
    assert b.weights - a.weights == 2 * (TINY_QV_ADAPTER + mags) * 4 and b.activations == a.activations
    assert (b.gradients, b.optimizer) == (a.gradients, a.optimizer)
    # QLoRA: the adapters are never 4-bit; FSDP: each rank holds its dim-0 shard of them
    q = estimate_memory(LlamaConfig(**TINY), precision="bf16-true", quantize="nf4", frozen_adapters=1, **kw)
    assert q.qlora.frozen_adapter_weights == q.lora.frozen_adapter_weights == TINY_QV_ADAPTER * 4
    fsdp = estimate_memory(LlamaConfig(**TINY), frozen_adapters=1, devices=2, strategy="fsdp", **kw)
    assert fsdp.lora.frozen_adapter_weights == TINY_QV_ADAPTER * 4 // 2  # r = 8, 256 and 64 rows: even
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=rf"frozen_adapters={bad!r} is invalid; expected an integer >= 0"):
            estimate_memory(LlamaConfig(**TINY), frozen_adapters=bad)


# --------------------------------------------------------------------------------- several GPUs
def test_fsdp_divides_weights_gradients_optimizer_per_gpu():
    from lightning_lora.estimate import estimate_memory

    kw = dict(r=16, target_modules="all-linear", gradient_checkpointing=True)
    one = estimate_memory("llama-3-70b", **kw)
    fsdp = estimate_memory("llama-3-70b", devices=8, strategy="fsdp", **kw)
    buffers = 512  # rotary inv_freq and original_inv_freq (64 fp32 each), on every rank
    for col in ("full", "lora"):
        a, b = getattr(one, col), getattr(fsdp, col)
        assert b.weights == (a.weights - buffers) // 8 + buffers  # every dim 0 is a multiple of 8
        assert (b.gradients, b.optimizer) == (a.gradients // 8, a.optimizer // 8)
        assert b.activations == a.activations  # per-rank batch
        assert b.trainable_params == a.trainable_params  # counts stay global
    layer = 2 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192 + 2 * 8192)  # bf16 projections + 2 norms
    adapters = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))  # per layer, fp32
    assert adapters * 80 == fsdp.lora.trainable_params == 207_093_760
    embed = 2 * 128_256 * 8192
    # in flight: the root (final norm) + embedding and first layer unsharded + one layer's adapter gradients
    assert fsdp.lora.communication == 2 * 8192 + embed + layer + 4 * adapters + 4 * adapters
    assert fsdp.lora.total == fsdp.lora.weights + fsdp.lora.optimizer + fsdp.lora.activations + fsdp.lora.communication
    assert fsdp.lora.total < 32 * GIB < 80 * GIB < fsdp.full.total < one.lora.total
    assert fsdp.settings["strategy"] == "fsdp" and fsdp.settings["devices"] == 8


def test_shard_padding_ddp_buckets_and_strategy_errors():
    from lightning_lora.estimate import Layout, estimate_memory
    from lightning_lora.estimate.sharding import shard_bytes

    assert shard_bytes(numel=10 * 7, rows=10, elem=2, world_size=3) == 4 * 7 * 2  # ceil(10 / 3) rows, padded
    assert Layout.resolve("auto", 1) == Layout("single", 1) and Layout.resolve("auto", 4) == Layout("ddp", 4)
    single = estimate_memory("smollm2-135m", seq_len=256)
    ddp = estimate_memory("smollm2-135m", seq_len=256, devices=4)
    for col in ("full", "lora"):
        a, b = getattr(single, col), getattr(ddp, col)
        assert b.communication == a.gradients  # DDP's buckets: a second copy of the gradients
        assert b.total == a.total + a.gradients
    with pytest.raises(ValueError, match="devices=0"):
        estimate_memory("smollm2-135m", devices=0)
    with pytest.raises(ValueError, match="strategy='deepspeed'"):
        estimate_memory("smollm2-135m", strategy="deepspeed")


# ------------------------------------------------------------------------------------------- CLI
def test_cli_table(capsys):
    from lightning_lora.cli import main

    code = main(["estimate", "--model", "llama-3-8b", "--r", "8", "--target-modules", "q_proj", "v_proj",
                 "--precision", "bf16-true", "--batch-size", "1", "--seq-len", "2048", "--gradient-checkpointing"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("full fine-tune", "LoRA r=8", "3,407,872", "8,030,261,248", "weights", "gradients",
                 "optimizer state", "activations", "peak total", "GiB"):
        assert text in out
    from lightning_lora.estimate import estimate_memory, format_bytes

    est = estimate_memory("llama-3-8b", gradient_checkpointing=True)
    peak_row = next(line for line in out.splitlines() if "peak total" in line)
    assert format_bytes(est.full.total) in peak_row and format_bytes(est.lora.total) in peak_row


def test_cli_json(capsys):
    from lightning_lora.cli import main

    code = main(["estimate", "--model", "smollm2-135m", "--seq-len", "512", "--optimizer", "sgd", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["model"] == "smollm2-135m" and data["settings"]["optimizer"] == "sgd"
    assert data["full"]["trainable_params"] == 134_515_008 and data["lora"]["optimizer_bytes"] == 0
    assert all(isinstance(v, int) for v in data["lora"].values())


def test_cli_per_layer(capsys):
    from lightning_lora.cli import main

    assert main(["estimate", "--model", "llama-3-8b", "--per-layer"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "q_proj" in line and "4096 x 4096" in line)
    assert "16,777,216" in row and "65,536" in row and "99.6%" in row


def test_cli_qlora_dora_and_fsdp(capsys):
    from lightning_lora.cli import main
    from lightning_lora.estimate import estimate_memory, format_bytes

    argv = ["estimate", "--model", "llama-3-8b", "--gradient-checkpointing", "--quantize", "nf4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    est = estimate_memory("llama-3-8b", gradient_checkpointing=True, quantize="nf4", quantize_modules="all-linear")
    assert "QLoRA (nf4, all-linear)" in out and "of which 4-bit" in out  # --quantize-modules' default
    peak_row = next(line for line in out.splitlines() if "peak total" in line)
    assert format_bytes(est.lora.total) in peak_row and format_bytes(est.qlora.total) in peak_row
    assert main(["estimate", "--model", "llama-3-8b", "--use-dora"]) == 0
    out = capsys.readouterr().out
    assert "DoRA r=8" in out and "163,840" in out
    assert main(["estimate", "--model", "llama-3-70b", "--r", "16", "--target-modules", "all-linear",
                 "--devices", "8", "--strategy", "fsdp", "--gradient-checkpointing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    fsdp = estimate_memory("llama-3-70b", r=16, target_modules="all-linear", devices=8, strategy="fsdp",
                           gradient_checkpointing=True)
    assert data["settings"]["devices"] == 8 and data["lora"]["total_bytes"] == fsdp.lora.total
    assert data["lora"]["communication_bytes"] == fsdp.lora.communication > 0


def test_cli_frozen_adapters(capsys):
    from lightning_lora.cli import main
    from lightning_lora.estimate import estimate_memory, format_bytes

    assert main(["estimate", "--model", "llama-3-8b", "--frozen-adapters", "2"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=8 (q_proj, v_proj) + 2 frozen" in out
    row = next(line for line in out.splitlines() if "of which 2 frozen adapters" in line)
    assert format_bytes(2 * 3_407_872 * 4) in row and "6,815,744" in row
    assert main(["estimate", "--model", "smollm2-135m", "--seq-len", "64", "--frozen-adapters", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    est = estimate_memory("smollm2-135m", seq_len=64, frozen_adapters=1)
    assert data["settings"]["frozen_adapters"] == 1
    assert data["lora"]["frozen_adapter_params"] == est.lora.trainable_params
    assert data["lora"]["frozen_adapter_weights_bytes"] == 4 * est.lora.trainable_params
    assert main(["estimate", "--model", "llama-3-8b", "--frozen-adapters", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "frozen_adapters=-1 is invalid; expected an integer >= 0" in err


def test_cli_unknown_model_exits_2_with_known_names(capsys):
    from lightning_lora.cli import main
    from lightning_lora.estimate import known_models

    assert main(["estimate", "--model", "gpt-9000"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "gpt-9000" in lines[0] and "Traceback" not in captured.err
    assert all(name in lines[0] for name in known_models())


@pytest.mark.parametrize("argv", [["--model", "llama-3-8b", "--precision", "fp8"],
                                  ["--model", "llama-3-8b", "--target-modules", "qproj"],
                                  ["--model", "llama-3-8b", "--seq-len", "0"],
                                  ["--model", "/nonexistent/config.json"], [],
                                  ["--model", "llama-3-8b", "--devices", "0"],
                                  ["--model", "llama-3-8b", "--quantize", "nf4", "--precision", "bf16-mixed"],
                                  ["--model", "smollm2-135m", "--use-dora", "--target-modules", "embed_tokens"]])
def test_cli_user_errors_are_one_line(argv, capsys):
    from lightning_lora.cli import main

    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------ as a script
def _markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| setting | model | strategy | precision | batch x seq | LoRA | grad. ckpt | optimizer | measured MiB "
             "| estimated MiB | error |", "|---|---|---|---|---|---|---|---|---:|---:|---:|"]
    for spec in SETTINGS:
        if spec["id"] not in results:
            continue
        measured_peak = results[spec["id"]]["peak"]
        estimated = estimate_for(spec).total
        lora = f"r={spec['r']} {spec['targets'] if isinstance(spec['targets'], str) else ','.join(spec['targets'])}"
        if spec["mode"] == "qlora":
            lora += f" (nf4 {spec['quantize_modules']})"
        lines.append(f"| {spec['id']}{' (test)' if spec['in_tests'] else ''} | {spec['model']} | {spec['mode']} | "
                     f"{spec['precision']} | {spec['batch']} x {spec['seq']} | {lora if spec['mode'] in ADAPTER_MODES else '-'} | "
                     f"{'yes' if spec['gc'] else 'no'} | {spec['optimizer']} ({spec['impl']}) | "
                     f"{measured_peak / MIB:.1f} | {estimated / MIB:.1f} | "
                     f"{100 * (estimated - measured_peak) / measured_peak:+.2f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        for spec in json.loads(sys.argv[2]):
            print(json.dumps(measure_peak(spec)), flush=True)
    elif sys.argv[1:2] == ["--markdown"]:
        sys.path.insert(0, str(REPO))
        wanted = sys.argv[2:]  # optional substrings of setting ids
        specs = [s for s in SETTINGS if _available(s) and (not wanted or any(w in s["id"] for w in wanted))]
        print(_markdown(run_measurements(specs, timeout=3600)))
    else:
        print(__doc__)


def test_cli_hub_id_fetches_config_json_only(capsys, local_hub, monkeypatch, tiny_lm_dir):
    """`--model ORG/NAME` reads the model's config.json from the Hub (a local one here): never its weights."""
    from conftest import HUB_REPO, hub_offline

    from lightning_lora.cli import main
    from lightning_lora.estimate import estimate_memory

    assert main(["estimate", "--model", HUB_REPO, "--seq-len", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == HUB_REPO
    assert data["full"]["trainable_params"] == estimate_memory(tiny_lm_dir, seq_len=64).full.total_params
    fetched = [r for r in local_hub.requests if f"/{HUB_REPO}/" in r]
    assert fetched == [f"HEAD /{HUB_REPO}/resolve/main/config.json", f"GET /{HUB_REPO}/resolve/main/config.json"]
    hub_offline(monkeypatch)
    assert main(["estimate", "--model", HUB_REPO, "--seq-len", "64", "--json"]) == 0  # from the cache
    assert json.loads(capsys.readouterr().out) == data
    assert main(["estimate", "--model", "other-org/not-cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Model 'other-org/not-cached' was not found: not a local directory, not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in err and "hf download other-org/not-cached" in err
