"""One benchmark measurement in its own process (so that its memory peak is its own).

Run by `benchmarks/run.py`; not meant to be called by hand:

    python benchmarks/_worker.py '<json spec>' OUT.json

The spec names the contender (floor, ours, ours-trainer, peft, full, ours-unfused, ours-dora, peft-dora, latency, casts,
paired, counts, compile), the LoRA config, the model, its dtype, gradient checkpointing, the device and the
sizes. The result (per-step times, memory, parameter counts, checkpoint bytes, inference latencies,
cast counts, operators dispatched per step) is written as JSON to OUT.json.

Models: `tiny-llama` (built in code), any config shipped in `lightning_lora/model_configs/`
(`llama-3-8b`, `smollm2-135m`, ...: random weights built directly on the target device in the
target dtype, nothing downloaded), `smollm2-135m-instruct` (the bundled real weights) or a local
model directory.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------- memory
def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return _peak_rss_bytes()


class Memory:
    """Peak memory of the measured phase, relative to a baseline taken before the model is built."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = _peak_rss_bytes()

        self.steady_from: int | None = None

    def after_setup(self) -> None:
        """Mark the end of model building (for the training-only share of the peak)."""
        if self.device == "cuda":
            self.setup = torch.cuda.memory_allocated()
        else:
            self.setup = _current_rss_bytes()

    def after_warmup(self) -> None:
        """Start the steady-state peak (CUDA): the peak statistics are reset once the warm-up steps made
        the optimizer state and the allocator's caches."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak_so_far = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.steady_from = peak_so_far

    def result(self) -> dict[str, int | None]:
        """`peak_bytes` (whole run, from before the model was built), `train_peak_bytes` (from after it was
        built) and, on CUDA after `after_warmup`, `steady_peak_bytes`: `max_memory_allocated()` of the
        steps after the warm-up, absolute (weights included), the number the estimate predicts."""
        steady = None
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
            if self.steady_from is not None:
                steady, peak = peak, max(peak, self.steady_from)
        else:
            peak = _peak_rss_bytes()
        return {"peak_bytes": peak - self.baseline, "train_peak_bytes": peak - self.setup,
                "steady_peak_bytes": steady}


def _storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind `tensors` (each storage once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def cpu_tensor_peak(runner: "Runner") -> int | None:
    """Peak bytes of live tensors during one training step on CPU, from `torch.profiler`'s memory events
    (as `tests/test_estimate.py` measures): what is live when the step starts (weights, buffers,
    optimizer state, the batch) plus the highest running sum of the step's allocations and frees."""
    from torch.profiler import ProfilerActivity, profile

    live = runner.live_bytes()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except Exception:  # private profiler API: report nothing rather than fail the measurement
        return None
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return live + peak


# ---------------------------------------------------------------------- model and data
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: benchmark dtype name -> `LoRAConfig.adapter_dtype`
ADAPTER_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)


def shipped_config(name: str) -> Path | None:
    """The config file shipped in `lightning_lora/model_configs/` for `name` (or its Hugging Face id)."""
    from lightning_lora.estimate import ALIASES, CONFIG_DIR

    key = ALIASES.get(name.lower(), name.lower())
    path = CONFIG_DIR / f"{key}.json"
    return path if path.is_file() else None


def random_model(config: Any, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM with random weights made directly on `device` in `dtype` (an 8B model in bf16 builds
    on a GPU in about a second; nothing is made on the CPU first)."""
    from transformers import AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    config.dtype = dtype  # what the config says (a shipped config.json says bfloat16) follows the weights
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_cls(config)
    finally:
        torch.set_default_dtype(previous)


def build_model(name: str, device: str, dtype: str = "fp32", gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The model `name` on `device` in `dtype` ("fp32", "bf16"), in training mode.

    `tiny-llama` and the shipped configs get random weights (seed 0); `smollm2-135m-instruct` and a
    local directory are loaded. Gradient checkpointing is transformers' (non-reentrant).
    """
    torch_dtype = DTYPES[dtype]
    if name == "tiny-llama":
        model = random_model(tiny_llama_config(), device, torch_dtype)
    elif (path := shipped_config(name)) is not None:
        from transformers import AutoConfig

        model = random_model(AutoConfig.from_pretrained(str(path)), device, torch_dtype)
    else:
        from lightning_lora.hub import load_causal_lm

        model = load_causal_lm(name, dtype=torch_dtype).to(device)
    model.config.use_cache = False
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def spec_model(spec: dict[str, Any]) -> torch.nn.Module:
    return build_model(spec["model"], spec["device"], spec.get("dtype", "fp32"),
                       spec.get("gradient_checkpointing", False))


def make_batch(vocab: int, batch: int, seq: int, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=gen).to(device)


def lora_config(spec: dict[str, Any], use_dora: bool = False):
    from lightning_lora import LoRAConfig

    c = spec["config"]
    return LoRAConfig(r=c["r"], alpha=c["alpha"], dropout=c["dropout"], target_modules=c["target_modules"],
                      adapter_dtype=ADAPTER_DTYPES[spec.get("adapter_dtype", "fp32")], use_dora=use_dora)


def peft_config(spec: dict[str, Any], use_dora: bool = False):
    from peft import LoraConfig

    c = spec["config"]
    return LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"], target_modules=c["target_modules"],
                      bias="none", task_type="CAUSAL_LM", use_dora=use_dora)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _raw_bytes(params: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _adapted_layers(model: torch.nn.Module) -> int:
    """Adapted layers, ours (`lora_A` a Linear) or PEFT's (`lora_A` a ModuleDict) alike."""
    return sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- training contenders
def prepare(model: torch.nn.Module, kind: str, spec: dict[str, Any]) -> torch.nn.Module:
    """The model as contender `kind` trains it: floor frozen, ours injected, PEFT wrapped, full trainable
    (ours-trainer: unchanged, the callback injects)."""
    if kind == "floor":
        model.requires_grad_(False)
    elif kind in ("ours", "ours-unfused", "ours-dora"):
        from lightning_lora import inject_lora

        inject_lora(model, lora_config(spec, use_dora=kind == "ours-dora"))
    elif kind in ("peft", "peft-dora"):
        from peft import get_peft_model

        # PEFT upcasts adapters of a bf16/fp16 base to fp32 by default (as our adapter_dtype="float32")
        model = get_peft_model(model, peft_config(spec, use_dora=kind == "peft-dora"),
                               autocast_adapter_dtype=spec.get("adapter_dtype", "fp32") == "fp32")
    elif kind == "full":
        model.requires_grad_(True)
    return model


def training_loss(model: torch.nn.Module, ids: torch.Tensor, floor: bool = False) -> torch.Tensor:
    """The causal-LM loss; for the floor, from input embeddings that need a gradient (backward reaches them)."""
    if floor:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return model(inputs_embeds=emb, labels=ids).loss
    return model(input_ids=ids, labels=ids).loss


class Runner:
    """Training steps of one contender: forward, backward, AdamW step (the floor: forward + backward to
    the input embeddings, no optimizer). `foreach=None` is torch's default AdamW (foreach on CUDA,
    a loop over the parameters on CPU)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, device: str, floor: bool = False,
                 foreach: bool | None = None) -> None:
        self.model, self.ids, self.device, self.floor = model, ids, device, floor
        self.opt = None if floor else torch.optim.AdamW(_trainable(model), lr=1e-4, foreach=foreach)

    def optimize(self) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        """One step; its wall time (synchronized on CUDA)."""
        _sync(self.device)
        t0 = time.perf_counter()
        training_loss(self.model, self.ids, self.floor).backward()
        self.optimize()
        _sync(self.device)
        return time.perf_counter() - t0

    def count(self) -> Any:
        """One step under a `DispatchCounter`, phases forward / backward / optimizer."""
        from lightning_lora.profiling import DispatchCounter

        with DispatchCounter() as counter:
            with counter.phase("forward"):
                loss = training_loss(self.model, self.ids, self.floor)
            with counter.phase("backward"):
                loss.backward()
            with counter.phase("optimizer"):
                self.optimize()
        return counter

    def live_bytes(self) -> int:
        """Bytes live between steps: parameters, buffers, gradients, optimizer state, the batch."""
        tensors: list[Any] = [*self.model.parameters(), *self.model.buffers(), self.ids]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.opt is not None:
            tensors += [v for state in self.opt.state.values() for v in state.values()]
        return _storage_bytes(tensors)


def make_step(model: torch.nn.Module, ids: torch.Tensor, device: str, floor: bool = False) -> Callable[[], float]:
    """One timed optimizer step (or, for the floor, forward + backward to the input embeddings)."""
    return Runner(model, ids, device, floor).step


def run_paired(spec: dict[str, Any]) -> dict[str, Any]:
    """floor, ours and PEFT in one process, step by step in turn (the order rotating every step).

    Memory is not measured here (the three models share the process); time is, and more precisely
    than across processes: neighbouring steps see the same machine, so the per-step ratios
    ours/PEFT and ours/floor are free of the drift between processes.
    """
    device = spec["device"]
    names = ["floor", "ours", "peft"]
    models = {n: prepare(spec_model(spec), n, spec) for n in names}
    vocab = models["floor"].get_input_embeddings().weight.shape[0]
    ids = make_batch(vocab, spec["batch"], spec["seq"], spec["seed"], device)
    steps = {n: make_step(m, ids, device, floor=n == "floor") for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(spec["warmup"] + spec["steps"]):
        order = names[i % 3:] + names[:i % 3]
        took = {n: steps[n]() for n in order}
        if i >= spec["warmup"]:
            for n in names:
                times[n].append(took[n])
    return {"times": times,
            "ours_over_peft": [o / p for o, p in zip(times["ours"], times["peft"])],
            "ours_over_floor": [o / f for o, f in zip(times["ours"], times["floor"])]}


def trainer_loop(model: torch.nn.Module, ids: torch.Tensor, spec: dict[str, Any]) -> tuple[list[float], torch.nn.Module]:
    """The same optimisation through `lightning.Trainer` + the `LoRA` callback."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_lora import LoRA

    device = spec["device"]

    class Module(L.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.model = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.model(input_ids=x, labels=x).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(_trainable(self), lr=1e-4)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            _sync(device)
            self.times.append(time.perf_counter() - self._t0)

    c = spec["config"]
    n = spec["warmup"] + spec["steps"]
    data = DataLoader(TensorDataset(ids.cpu().repeat(n, 1)), batch_size=ids.shape[0])
    timer = StepTimer()
    lora = LoRA(r=c["r"], alpha=c["alpha"], dropout=c["dropout"], target_modules=c["target_modules"],
                adapter_dtype=ADAPTER_DTYPES[spec.get("adapter_dtype", "fp32")],
                merge_on_fit_end=False, log_every_n_steps=10**9)
    module = Module(model)
    precision = {"bf16": "bf16-true", "fp16": "16-true"}.get(spec.get("dtype", "fp32"), "32-true")
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=n, max_epochs=1,
                        precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[lora, timer])
    trainer.fit(module, train_dataloaders=data)
    return timer.times[spec["warmup"]:], module


def run_training(spec: dict[str, Any]) -> dict[str, Any]:
    kind, device = spec["contender"], spec["device"]
    if device == "cuda" and kind == "ours" and spec["config"]["dropout"] > 0:
        from lightning_lora._kernels import check_mask_replay

        assert check_mask_replay("cuda") == "philox", "the CUDA dropout path must draw Philox masks"
    mem = Memory(device)
    model = spec_model(spec)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = make_batch(vocab, spec["batch"], spec["seq"], spec["seed"], device)
    if kind == "ours-unfused":  # ablation: plain autograd through nn.Dropout and the modules (no fused paths)
        from lightning_lora.layers import LoRALayer

        LoRALayer._fused_path = lambda self, x: None  # type: ignore[method-assign]
    model = prepare(model, kind, spec)
    mem.after_setup()

    saved_from: torch.nn.Module = model
    runner = None
    if kind == "ours-trainer":
        times, saved_from = trainer_loop(model, ids, spec)
    else:
        runner = Runner(model, ids, device, floor=kind == "floor")
        for _ in range(spec["warmup"]):
            runner.step()
        mem.after_warmup()
        times = [runner.step() for _ in range(spec["steps"])]
    out: dict[str, Any] = {"times": times, **mem.result(), "tensor_peak_bytes": None}
    if runner is not None and device == "cpu" and spec.get("tensor_peak") and kind in ("floor", "ours", "peft"):
        out["tensor_peak_bytes"] = cpu_tensor_peak(runner)
    if kind == "ours" and spec.get("estimate", True):
        out["estimate"] = estimate(spec, model.config)

    trainable = _trainable(model)
    out["trainable_params"] = sum(p.numel() for p in trainable)
    out["raw_trainable_bytes"] = _raw_bytes(trainable)
    with tempfile.TemporaryDirectory() as tmp:
        if kind in ("ours", "ours-unfused", "ours-trainer", "ours-dora"):
            from lightning_lora import save_adapter

            save_adapter(saved_from, Path(tmp) / "adapter")
            out["checkpoint_bytes"] = (Path(tmp) / "adapter" / "adapter_model.safetensors").stat().st_size
        elif kind in ("peft", "peft-dora"):
            model.save_pretrained(Path(tmp) / "adapter")
            out["checkpoint_bytes"] = (Path(tmp) / "adapter" / "adapter_model.safetensors").stat().st_size
        elif kind == "full":
            from safetensors.torch import save_model

            save_model(model, str(Path(tmp) / "model.safetensors"))
            out["checkpoint_bytes"] = (Path(tmp) / "model.safetensors").stat().st_size
    return out


# ---------------------------------------------------------------------- bf16 casts
def run_casts(spec: dict[str, Any]) -> dict[str, Any]:
    """Dtype casts (`aten._to_copy`) in one training step on a bf16 base, fp32 adapters (as `bf16-true`).

    Counts floor (no adapters), ours and PEFT (whose `get_peft_model` also keeps adapters fp32 on a
    bf16 base), forward and backward apart, and how many casts read a frozen base parameter (the
    base path must run in bf16 without any). Also sums the bytes autograd saves for backward in
    that step (each storage once, parameters excluded): the activation memory, exactly.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self, frozen: set[int]) -> None:
            super().__init__()
            self.frozen, self.n, self.n_base, self.bytes = frozen, 0, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype != args[0].dtype:
                self.n += 1
                self.bytes += out.numel() * out.element_size()
                self.n_base += args[0].untyped_storage().data_ptr() in self.frozen
            return out

    device = spec["device"]
    result: dict[str, Any] = {}
    for kind in ("floor", "ours", "peft"):
        model = prepare(build_model(spec["model"], device, "bf16"), kind, {**spec, "adapter_dtype": "fp32"})
        n_layers = _adapted_layers(model)
        adapter_dtypes = sorted({str(p.dtype) for p in _trainable(model)})
        frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = make_batch(vocab, 1, spec["casts_seq"], spec["seed"], device)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with Count(frozen) as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = training_loss(model, ids, floor=kind == "floor")
        with Count(frozen) as bwd:
            loss.backward()
        result[kind] = {"forward": fwd.n, "backward": bwd.n, "bytes": fwd.bytes + bwd.bytes,
                        "base_param_casts": fwd.n_base + bwd.n_base, "adapted_layers": n_layers,
                        "saved_activation_bytes": sum(saved.values()),
                        "adapter_dtypes": adapter_dtypes}
        del model, loss
    return result


# ---------------------------------------------------------------------- estimate
def estimate(spec: dict[str, Any], config: Any) -> dict[str, Any] | None:
    """`lightning_lora.estimate.estimate_memory` for this run's settings (our LoRA, AdamW as built here:
    foreach on CUDA, a loop over the parameters on CPU)."""
    from lightning_lora.estimate import estimate_memory

    c = spec["config"]
    precision = {"bf16": "bf16-true", "fp16": "16-true"}.get(spec.get("dtype", "fp32"), "32-true")
    try:
        est = estimate_memory(config, r=c["r"], alpha=c["alpha"], target_modules=c["target_modules"],
                              precision=precision, batch_size=spec["batch"], seq_len=spec["seq"],
                              gradient_checkpointing=spec.get("gradient_checkpointing", False), optimizer="adamw",
                              optimizer_impl="foreach" if spec["device"] == "cuda" else "for-loop",
                              adapter_dtype=ADAPTER_DTYPES[spec.get("adapter_dtype", "fp32")])
    except Exception as err:  # an architecture the estimate does not model: say so, keep the timing
        return {"error": f"{type(err).__name__}: {err}"}
    return {"total_bytes": est.lora.total, "weights_bytes": est.lora.weights,
            "activations_bytes": est.lora.activations, "precision": precision}


# ---------------------------------------------------------------------- operators dispatched
def run_counts(spec: dict[str, Any]) -> dict[str, Any]:
    """ATen operators dispatched in one steady-state training step (after one warm-up step, so that
    AdamW's state exists) of floor, ours and PEFT, by phase (forward; backward, with any checkpointing
    recompute; optimizer) and category (compute / view / other: `lightning_lora.profiling`), for each
    base dtype of `counts_dtypes` (adapters in `adapter_dtype`).

    AdamW is built with `foreach=True` on every device (CUDA's default), so that the counts do not
    depend on the device: on CPU torch's default AdamW loops over the parameters (about 13 operators
    per parameter), which would drown the adapters' own operators.
    """
    device = spec["device"]
    batch, seq = spec.get("counts_batch", 1), spec.get("counts_seq", 64)
    result: dict[str, Any] = {"batch": batch, "seq": seq, "adapter_dtype": spec.get("adapter_dtype", "fp32"),
                              "gradient_checkpointing": spec.get("gradient_checkpointing", False),
                              "optimizer": "AdamW(foreach=True)", "by_dtype": {}}
    # on CPU, ours also with the CUDA dropout masks (Philox `native_dropout`): what the CUDA path dispatches
    kinds = ("floor", "ours", "peft") + (("ours-philox",) if device == "cpu" and spec["config"]["dropout"] > 0 else ())
    for dtype in spec.get("counts_dtypes") or [spec.get("dtype", "fp32")]:
        counts: dict[str, Any] = {}
        for kind in kinds:
            model = prepare(spec_model({**spec, "dtype": dtype}), "ours" if kind == "ours-philox" else kind, spec)
            if kind == "ours-philox":
                from lightning_lora.surgery import lora_layers

                for _, layer in lora_layers(model):
                    layer.dropout_masks = "philox"
            vocab = model.get_input_embeddings().weight.shape[0]
            ids = make_batch(vocab, batch, seq, spec["seed"], device)
            runner = Runner(model, ids, device, floor=kind == "floor", foreach=True)
            runner.step()
            counter = runner.count()
            counts[kind] = {"adapted_layers": _adapted_layers(model), **counter.summary()}
            del model, runner, counter
            _free(device)
        check_adapter_paths(counts, device, spec, dtype)
        result["by_dtype"][dtype] = counts
    return result


def check_adapter_paths(counts: dict[str, Any], device: str, spec: dict[str, Any], dtype: str) -> None:
    """Fail loudly (the job's error, in the report) unless ours took the paths it should on this device: with
    dropout, Philox `native_dropout` on CUDA (no `random_`) and lane masks on CPU, drawn once in forward and
    once in backward per adapted layer; on a bf16 base with fp32 adapters (`adapter_compute_dtype="auto"`),
    bf16 products: exactly two casts (A and B) per adapted layer in forward beyond the floor's."""
    ours, floor = counts["ours"], counts["floor"]
    n = ours["adapted_layers"]
    def extra(phase: str, op: str) -> int:
        return ours["ops"].get(phase, {}).get(op, 0) - floor["ops"].get(phase, {}).get(op, 0)

    problems = []
    if spec["config"]["dropout"] > 0:
        source = "aten.native_dropout" if device == "cuda" else "aten.random_"
        other = "aten.random_" if device == "cuda" else "aten.native_dropout"
        got = [extra("forward", source), extra("backward", source), extra("forward", other), extra("backward", other)]
        if got[0] != n or got[1] < n or got[2] or got[3]:
            problems.append(f"dropout masks: expected {n} x {source} in forward, at least {n} in backward and no "
                            f"{other}, got {source} {got[0]} / {got[1]}, {other} {got[2]} / {got[3]}")
    if dtype == "bf16" and spec.get("adapter_dtype", "fp32") == "fp32":
        casts = extra("forward", "aten._to_copy")
        if casts != 2 * n:
            problems.append(f"bf16 products: expected {2 * n} extra casts in forward (A and B of {n} layers), got {casts}")
    if problems:
        raise AssertionError(f"ours did not take the expected adapter paths on {device}: " + "; ".join(problems))


# ---------------------------------------------------------------------- torch.compile
def run_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """Eager vs compiled training steps of ours and PEFT (plain loop, AdamW), compiled with
    `lightning_lora.tasks.compile.TrainingCompile` (each decoder layer, lengths dynamic): eager median,
    the first compiled step (the compile), compiled median, graphs compiled, recompiles and graph breaks
    (dynamo's counters), and the graphs a batch of another length adds afterwards (should be none)."""
    import torch._dynamo as dynamo

    from lightning_lora.tasks.compile import CompileEvents, TrainingCompile

    device = spec["device"]
    other_seq = max(8, spec["seq"] // 2 + 3)
    backend = spec.get("compile_backend") or "inductor"
    result: dict[str, Any] = {"lengths": {"batch": spec["batch"], "seq": spec["seq"], "other_seq": other_seq},
                              "backend": backend}
    for kind in ("ours", "peft"):
        dynamo.reset()
        dynamo.utils.counters.clear()
        model = prepare(spec_model(spec), kind, spec)
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = make_batch(vocab, spec["batch"], spec["seq"], spec["seed"], device)
        runner = Runner(model, ids, device)
        for _ in range(spec["warmup"]):
            runner.step()
        eager = [runner.step() for _ in range(spec["steps"])]
        compiled = TrainingCompile(model, backend=backend)
        with CompileEvents() as events:
            first = runner.step()
            for _ in range(max(spec["warmup"] - 1, 0)):
                runner.step()
            times = [runner.step() for _ in range(spec["steps"])]
            graphs = dynamo.utils.counters["stats"]["unique_graphs"]
            runner.ids = make_batch(vocab, spec["batch"], other_seq, spec["seed"] + 1, device)
            runner.step()
        result[kind] = {"eager": eager, "compiled": times, "first_compiled_step_s": first, "graphs": graphs,
                        "new_graphs_other_length": dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
                        "compiles": events.compiles, "recompiles": events.recompiles,
                        "graph_breaks": sum(dynamo.utils.counters["graph_break"].values())}
        compiled.remove()
        del model, runner
        _free(device)
    dynamo.reset()
    return result


# ---------------------------------------------------------------------- inference latency
def run_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward latency (no grad, eval) of the base, the injected-unmerged and the merged model."""
    from lightning_lora import inject_lora, merge_and_unload
    from lightning_lora.surgery import lora_layers

    device = spec["device"]
    base = build_model(spec["model"], device, spec.get("dtype", "fp32")).eval()
    model = build_model(spec["model"], device, spec.get("dtype", "fp32")).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = make_batch(vocab, spec["batch"], spec["seq"], spec["seed"], device)
    reps = spec["latency_reps"]

    def timed(net: torch.nn.Module) -> float:
        _sync(device)
        t0 = time.perf_counter()
        net(input_ids=ids)
        _sync(device)
        return time.perf_counter() - t0

    def interleaved(other: torch.nn.Module) -> tuple[list[float], list[float]]:
        """Alternate base and `other` forward by forward, so that drift hits both alike."""
        a: list[float] = []
        b: list[float] = []
        with torch.inference_mode():
            timed(base), timed(other)  # warm-up
            for _ in range(reps):
                a.append(timed(base))
                b.append(timed(other))
        return a, b

    inject_lora(model, lora_config(spec))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
    model.eval()
    base1, unmerged = interleaved(model)
    model = merge_and_unload(model).eval()
    base2, merged = interleaved(model)
    return {"base": base1 + base2, "unmerged": unmerged, "merged": merged,
            "unmerged_over_base": statistics.median(unmerged) / statistics.median(base1),
            "merged_over_base": statistics.median(merged) / statistics.median(base2)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    out_path = Path(sys.argv[2])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    # Import every library any contender uses *before* the memory baseline, so that the baseline is
    # the same for all contenders and library code is not counted as training memory.
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lightning_lora  # noqa: F401
    import lightning_lora.hub  # noqa: F401
    if spec["contender"] == "latency":
        result = run_latency(spec)
    elif spec["contender"] == "casts":
        result = run_casts(spec)
    elif spec["contender"] == "paired":
        result = run_paired(spec)
    elif spec["contender"] == "counts":
        result = run_counts(spec)
    elif spec["contender"] == "compile":
        result = run_compile(spec)
    else:
        result = run_training(spec)
    result["spec"] = spec
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
