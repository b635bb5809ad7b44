"""Side-by-side LoRA training benchmark: lightning-lora vs PEFT vs full fine-tuning vs the frozen floor.

    python benchmarks/run.py [--device cpu|cuda] [--model NAME|PATH] [--dtype fp32|bf16] [--adapter-dtype fp32|bf16]
                             [--gradient-checkpointing] [--batch N] [--seq N] [--quick] [--out DIR] [--rounds N]
                             [--steps N] [--jobs floor,ours,...] [--configs qv-r8,all-r16-do] [--merge]
    python benchmarks/run.py --preset gpu-8b             # the GPU recipe (one CUDA GPU, < 8 minutes)
    python benchmarks/run.py --preset gpu-8b --dry-run   # the same jobs on CPU at a tiny shape (a minute)

Models: `smollm2-135m-instruct` (the bundled real weights; the CPU default), `tiny-llama` (built in
code), any config shipped in `lightning_lora/model_configs/` (`llama-3-8b`, `llama-3.2-1b`,
`mistral-7b`, `qwen2.5-7b`, `smollm2-135m`: random weights built directly on the device in the
chosen dtype, nothing downloaded) or a local model directory.

Contenders (same model, random tokens with a fixed seed, batch, sequence length, AdamW lr 1e-4):

- floor: the frozen base model, forward + backward to the input embeddings, no adapters, no optimizer.
  Any LoRA implementation must at least backpropagate through the whole network, so this is the
  lower bound of a LoRA step.
- ours: `inject_lora` + a plain loop (AdamW over the trainable parameters).
- ours-trainer: the same through `lightning.Trainer` + the `LoRA` callback (step time from a callback,
  `on_train_batch_start` -> `on_train_batch_end`).
- peft: `peft.get_peft_model` with the same config, the same loop.
- full: full fine-tuning, the same loop.
- ours-dora / peft-dora (opt-in, `--jobs ...,ours-dora,peft-dora`): ours and PEFT with `use_dora=True`,
  the same loop: DoRA's time and memory next to plain LoRA's.

Besides, per config and round: `paired` runs floor, ours and PEFT in one process, one step each
in turn (the order rotating), so that the per-step time ratios compare neighbouring steps; the
step-time targets use these paired ratios (the separate-process ratios are reported too).
`latency` times inference of base / unmerged / merged; `casts` (first round only) counts dtype
casts in one step on a bf16 base with fp32 adapters; `counts` (first round only) counts the
operators dispatched in one training step of floor, ours and PEFT (`lightning_lora.profiling`:
device-independent, our proxy for kernel launches; on CPU also ours with the CUDA dropout masks,
`ours-philox`), and checks that ours took the adapter paths it should on the device; `compile` (first
round only, not in the default jobs: name it with `--jobs`; in the `gpu-8b` preset) times eager and
`torch.compile`d training steps of ours and PEFT (`lightning_lora.tasks.compile.TrainingCompile`) with
the compile time, graphs and recompiles.

Configs: (a) r=8 on q_proj, v_proj, dropout 0; (b) r=16 on all linear layers, dropout 0.05. The
`gpu-8b` preset runs (a) with gradient checkpointing and (b) without, as in issue 14, and then the packed +
chunked row: `benchmarks/data_and_loss.py --preset gpu-8b` (packed vs padded useful tokens/s on an
Alpaca-like length mix, and the memory the loss adds, chunked vs transformers'), appended to the report.

Every measurement runs in its own subprocess (`benchmarks/_worker.py`) so that its memory peak is
its own, and the contenders alternate round-robin (round 1: A B C D ..., round 2: A B C D ...), so
that slow drift of the machine hits every contender alike. Memory on CPU is the peak RSS of the
subprocess (`resource.getrusage`) minus its peak RSS before the model was built (so it includes the
model's weights, which are the same for every contender); on CUDA it is `torch.cuda.max_memory_allocated`
minus the allocation before the model was built, and the steady-state peak is `max_memory_allocated()`
after a reset that follows the warm-up steps (the number `lightning_lora.estimate` predicts).

A measurement that fails or times out is recorded under "Errors" and the rest goes on. After every
measurement one JSON line goes to stdout and the full result to `<out>/<name>.jsonl`, and
`<out>/<name>.md` and `<out>/<name>.json` are rewritten with what has finished (`<name>`: the device,
or `--name`); at the end `<out>/<name>.png` (when matplotlib imports) and the summary table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"
GIB = 1024**3

CONFIGS: dict[str, dict[str, Any]] = {
    "qv-r8": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "label": "r=8, q_proj+v_proj, dropout 0"},
    "all-r16-do": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
                   "label": "r=16, all-linear, dropout 0.05"},
}
TRAIN_CONTENDERS = ("floor", "ours", "ours-trainer", "peft", "full", "ours-dora", "peft-dora")
#: contenders whose measurement does not depend on the LoRA config (measured once per round and per
#: gradient-checkpointing setting)
CONFIG_FREE = ("floor", "full")
JOB_KINDS = (*TRAIN_CONTENDERS, "latency", "paired", "casts", "counts", "compile")
#: jobs run in the first round only: those whose results do not depend on timing, and compile (minutes)
FIRST_ROUND_ONLY = ("casts", "counts", "compile")
#: jobs left out unless named (`--jobs`, a preset): compile takes minutes per contender on a CPU
OPT_IN_JOBS = ("compile", "ours-dora", "peft-dora")

DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m-instruct", "rounds": 3, "steps": 3, "warmup": 1, "batch": 4, "seq": 256,
    "latency_reps": 4, "casts_seq": 256, "paired_steps": 6, "counts_batch": 1, "counts_seq": 64,
    "counts_dtypes": None, "compile_backend": "inductor", "dtype": "fp32", "adapter_dtype": "fp32", "gradient_checkpointing": False,
    "jobs": [j for j in JOB_KINDS if j not in OPT_IN_JOBS], "timeout": 900.0, "deadline": None, "tensor_peak": True, "seed": 0,
}
QUICK: dict[str, Any] = {"model": "tiny-llama", "rounds": 1, "batch": 2, "seq": 16, "latency_reps": 3, "casts_seq": 64,
                         "paired_steps": 2, "counts_seq": 16}
PRESETS: dict[str, dict[str, Any]] = {
    # issue 14: Llama-3-8B shape, random bf16 weights, fp32 adapters, batch 1 x 2048, AdamW, median of 8
    # steps after 2 warm-up steps, one process per contender plus a paired run; (a) with gradient
    # checkpointing, (b) without. About 4 minutes on an H200; the deadline keeps it under 8.
    "gpu-8b": {"device": "cuda", "model": "llama-3-8b", "dtype": "bf16", "adapter_dtype": "fp32", "batch": 1,
               "seq": 2048, "warmup": 2, "steps": 8, "paired_steps": 8, "rounds": 1,
               "jobs": ["floor", "ours", "peft", "paired", "counts", "compile"],
               "gradient_checkpointing": {"qv-r8": True, "all-r16-do": False},
               "counts_batch": 1, "counts_seq": 2048, "counts_dtypes": ["bf16"], "timeout": 240.0,
               "deadline": 420.0, "data_loss": True},
}
#: `--dry-run`: the preset's jobs on CPU at a tiny shape, written to a temporary directory (compile with the
#: aot_eager backend: the same tracing and autograd graphs; inductor's CPU code generation takes minutes)
DRY_RUN: dict[str, Any] = {"device": "cpu", "model": "tiny-llama", "batch": 1, "seq": 32, "warmup": 1, "steps": 2,
                           "paired_steps": 2, "counts_seq": 32, "timeout": 300.0, "deadline": None,
                           "compile_backend": "aot_eager"}

#: targets: (name, ratio key, config or None for all, upper bound, lower bound, devices)
TARGETS: list[tuple[str, str, str | None, float, float | None, tuple[str, ...]]] = [
    ("step time ours/PEFT (paired)", "time_ours_over_peft_paired", None, 1.00, None, ("cpu",)),
    ("step time ours/floor (paired)", "time_ours_over_floor_paired", "qv-r8", 1.10, None, ("cpu",)),
    ("step time ours/PEFT (separate processes)", "time_ours_over_peft", None, 1.00, None, ("cpu",)),
    ("step time ours/floor (separate processes)", "time_ours_over_floor", "qv-r8", 1.10, None, ("cpu",)),
    ("peak memory ours/PEFT (dropout 0)", "mem_ours_over_peft", "qv-r8", 1.00, None, ("cpu",)),
    ("peak memory ours/PEFT (dropout 0.05, all-linear)", "mem_ours_over_peft", "all-r16-do", 0.85, None, ("cpu",)),
    # issue 14 on CUDA
    ("step time ours/PEFT (paired)", "time_ours_over_peft_paired", "qv-r8", 0.97, None, ("cuda",)),
    ("step time ours/PEFT (paired)", "time_ours_over_peft_paired", "all-r16-do", 0.90, None, ("cuda",)),
    ("step time ours/floor (paired)", "time_ours_over_floor_paired", "qv-r8", 1.15, None, ("cuda",)),
    ("steady peak memory ours/PEFT", "steady_mem_ours_over_peft", "all-r16-do", 0.80, None, ("cuda",)),
    ("estimate / measured peak (ours)", "estimate_over_measured", "qv-r8", 1.01, 0.99, ("cuda",)),
    # both
    ("operators dispatched per step ours/PEFT", "ops_ours_over_peft", None, 1.00, None, ("cpu", "cuda")),
    ("compiled / eager step time (ours)", "time_compiled_over_eager", None, 1.00, None, ("cuda",)),
    ("merged latency / base", "latency_merged_over_base", None, 1.03, 0.97, ("cpu", "cuda")),
    ("adapter checkpoint / (raw x1.02 + 64KB)", "ckpt_over_budget", None, 1.00, None, ("cpu", "cuda")),
    ("bf16 base: casts reading a base parameter", "casts_on_base_path", None, 0, None, ("cpu", "cuda")),
]


# ---------------------------------------------------------------------- settings
def gc_of(settings: dict[str, Any], cfg: str) -> bool:
    """Whether config `cfg` trains with gradient checkpointing (one bool for all, or one per config)."""
    gc = settings.get("gradient_checkpointing", False)
    return bool(gc.get(cfg, False) if isinstance(gc, dict) else gc)


def counts_dtypes(settings: dict[str, Any]) -> list[str]:
    """Base dtypes the operator counts are taken in: the run's dtype first; on an fp32 run also bf16 (the
    GPU recipe's, where the adapters take the cast path)."""
    if settings.get("counts_dtypes"):
        return list(settings["counts_dtypes"])
    return ["fp32", "bf16"] if settings["dtype"] == "fp32" else [settings["dtype"]]


def representative(settings: dict[str, Any], configs: list[str], cfg: str) -> str:
    """The config under whose name the config-free contenders (floor, full) of `cfg` are measured: the
    first config with the same gradient-checkpointing setting."""
    return next(c for c in configs if gc_of(settings, c) == gc_of(settings, cfg))


def label_of(settings: dict[str, Any], cfg: str) -> str:
    return CONFIGS[cfg]["label"] + (", gradient checkpointing" if gc_of(settings, cfg) else "")


def selected_configs(flag: str | None) -> list[str]:
    """The configs `--configs` names (in `CONFIGS` order), all of them without the flag.

    Example:
        >>> selected_configs("all-r16-do"), selected_configs(None) == list(CONFIGS)
        (['all-r16-do'], True)
    """
    if not flag:
        return list(CONFIGS)
    names = [c.strip() for c in flag.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        raise SystemExit(f"--configs: unknown config(s) {', '.join(unknown) or repr(flag)}; expected some of "
                         f"{', '.join(CONFIGS)}")
    return [c for c in CONFIGS if c in names]


# ---------------------------------------------------------------------- running
def jobs_for_round(configs: list[str], ablation: bool = False, first: bool = True,
                   settings: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(job, config) pairs of one round, alternating the contenders; the jobs that do not depend on
    timing (casts, counts) only in the first round."""
    settings = settings or DEFAULTS
    kinds = set(settings.get("jobs") or JOB_KINDS)
    jobs: list[tuple[str, str]] = []
    for cfg in configs:
        rep = representative(settings, configs, cfg)
        if "floor" in kinds and rep == cfg:
            jobs.append(("floor", cfg))
        jobs += [(kind, cfg) for kind in ("ours", "peft", "ours-trainer", "ours-dora", "peft-dora") if kind in kinds]
        if (ablation or "ours-unfused" in kinds) and CONFIGS[cfg]["dropout"] > 0:
            jobs.append(("ours-unfused", cfg))
    if "full" in kinds:
        jobs += [("full", cfg) for cfg in configs if representative(settings, configs, cfg) == cfg]
    for kind in ("latency", "paired", *FIRST_ROUND_ONLY):
        if kind in kinds and (first or kind not in FIRST_ROUND_ONLY):
            jobs += [(kind, cfg) for cfg in configs]
    return jobs


def run_job(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a subprocess; its result, or `{"error": ...}` when it failed or timed out."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS=str(spec["threads"]))
        try:
            proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec), str(out)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-2000:]
            return {"error": f"timed out after {timeout:.0f} s",
                    "stderr": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            return {"error": f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no output'}",
                    "stderr": proc.stderr[-4000:]}
        return json.loads(out.read_text())


# ---------------------------------------------------------------------- statistics
def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_stats(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "q1_s": _quantile(xs, 0.25), "q3_s": _quantile(xs, 0.75),
            "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


def _median_or_none(xs: list[Any]) -> int | None:
    xs = [x for x in xs if x is not None]
    return int(statistics.median(xs)) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _put(ratios: dict[str, Any], key: str, value: float | None) -> None:
    if value is not None:
        ratios[key] = value


def _median_time(contenders: dict[str, Any], name: str) -> float | None:
    return contenders[name]["time"]["median_s"] if name in contenders else None


def _field(contenders: dict[str, Any], name: str, key: str) -> Any:
    return contenders[name].get(key) if name in contenders else None


def summarise_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """Per dtype: per contender the operators of each phase, their total, views and others, and the
    operators per adapted layer above the floor; ours/PEFT and ours/floor; and ours - PEFT by operator
    and phase, per adapted layer (where ours does more or fewer launches than PEFT)."""
    by_dtype = counts.get("by_dtype") or {counts.get("dtype", "fp32"): {k: counts[k] for k in ("floor", "ours", "peft")
                                                                        if k in counts}}
    out: dict[str, Any] = {}
    for dtype, rows in by_dtype.items():
        table: dict[str, Any] = {}
        floor = rows.get("floor")
        for name, row in rows.items():
            phases = {ph: v["compute"] for ph, v in row["phases"].items()}
            entry = {"adapted_layers": row["adapted_layers"], "forward": phases.get("forward", 0),
                     "backward": phases.get("backward", 0), "optimizer": phases.get("optimizer", 0),
                     "total": row["total"]["compute"], "views": row["total"]["view"],
                     "other": row["total"]["other"], "devices": row.get("devices", {})}
            n = row["adapted_layers"]
            if floor is not None and n:
                entry["per_layer"] = (entry["total"] - floor["total"]["compute"]) / n
                fb_floor = sum(v["compute"] for ph, v in floor["phases"].items() if ph in ("forward", "backward"))
                entry["per_layer_fwd_bwd"] = (entry["forward"] + entry["backward"] - fb_floor) / n
            table[name] = entry
        diff: dict[str, dict[str, float]] = {}
        if "ours" in rows and "peft" in rows and rows["ours"]["adapted_layers"]:
            n = rows["ours"]["adapted_layers"]
            for ph in ("forward", "backward", "optimizer"):
                o, p = rows["ours"]["ops"].get(ph, {}), rows["peft"]["ops"].get(ph, {})
                d = {op: (o.get(op, 0) - p.get(op, 0)) / n for op in sorted(set(o) | set(p))
                     if o.get(op, 0) != p.get(op, 0)}
                diff[ph] = dict(sorted(d.items(), key=lambda kv: (-abs(kv[1]), kv[0])))
        ratios = {}
        if "ours" in table and "peft" in table:
            ratios["ops_ours_over_peft"] = table["ours"]["total"] / table["peft"]["total"]
        if "ours" in table and "floor" in table:
            ratios["ops_ours_over_floor"] = table["ours"]["total"] / table["floor"]["total"]
        out[dtype] = {"contenders": table, "ours_minus_peft_per_layer": diff, "ratios": ratios}
    return out


def summarise_compile(result: dict[str, Any]) -> dict[str, Any]:
    """Per contender: compile time (first compiled step minus the compiled median), eager and compiled step
    medians, compiled/eager, graphs compiled and recompiles (also after a batch of another length); and
    ours/PEFT compiled."""
    rows: dict[str, Any] = {}
    for name, r in result.items():
        if not isinstance(r, dict) or "eager" not in r:
            continue
        eager, comp = statistics.median(r["eager"]), statistics.median(r["compiled"])
        rows[name] = {"eager_s": eager, "compiled_s": comp, "compiled_over_eager": comp / eager,
                      "first_compiled_step_s": r["first_compiled_step_s"],
                      "compile_s": r["first_compiled_step_s"] - comp, "graphs": r["graphs"],
                      "recompiles": r["recompiles"], "graph_breaks": r["graph_breaks"],
                      "new_graphs_other_length": r["new_graphs_other_length"]}
    ratios: dict[str, float] = {}
    if "ours" in rows:
        ratios["time_compiled_over_eager"] = rows["ours"]["compiled_over_eager"]
        ratios["compile_seconds_ours"] = rows["ours"]["compile_s"]
    if "peft" in rows:
        ratios["time_compiled_over_eager_peft"] = rows["peft"]["compiled_over_eager"]
    if "ours" in rows and "peft" in rows:
        ratios["time_ours_over_peft_compiled"] = rows["ours"]["compiled_s"] / rows["peft"]["compiled_s"]
    return {"contenders": rows, "ratios": ratios, "lengths": result.get("lengths"), "backend": result.get("backend")}


def summarise(raw: dict[tuple[str, str], list[dict[str, Any]]], configs: list[str],
              settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per config: contender rows, ratios, latency, paired, casts and counts, from whatever finished."""
    settings = settings or DEFAULTS
    tokens = settings["batch"] * settings["seq"]
    out: dict[str, Any] = {}
    for cfg in configs:
        rep = representative(settings, configs, cfg)
        keys = {name: (name, rep if name in CONFIG_FREE else cfg) for name in (*TRAIN_CONTENDERS, "ours-unfused")}
        runs_of = {name: raw[key] for name, key in keys.items() if raw.get(key)}
        contenders: dict[str, Any] = {}
        for name, runs in runs_of.items():
            times = [t for r in runs for t in r["times"]]
            est = next((r["estimate"] for r in runs if r.get("estimate")), None)
            contenders[name] = {
                "time": time_stats(times),
                "tokens_per_s": tokens / statistics.median(times),
                "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs)),
                "train_peak_bytes": int(statistics.median(r["train_peak_bytes"] for r in runs)),
                "peak_bytes_min_max": [min(r["peak_bytes"] for r in runs), max(r["peak_bytes"] for r in runs)],
                "steady_peak_bytes": _median_or_none([r.get("steady_peak_bytes") for r in runs]),
                "tensor_peak_bytes": _median_or_none([r.get("tensor_peak_bytes") for r in runs]),
                "estimate": est,
                "trainable_params": runs[0]["trainable_params"],
                "raw_trainable_bytes": runs[0]["raw_trainable_bytes"],
                "checkpoint_bytes": runs[0].get("checkpoint_bytes")}
        c = contenders
        ratios: dict[str, Any] = {}
        put = functools.partial(_put, ratios)
        med = functools.partial(_median_time, c)
        field = functools.partial(_field, c)

        put("time_ours_over_peft", _ratio(med("ours"), med("peft")))
        put("time_ours_over_floor", _ratio(med("ours"), med("floor")))
        put("time_trainer_over_ours", _ratio(med("ours-trainer"), med("ours")))
        put("time_full_over_ours", _ratio(med("full"), med("ours")))
        put("mem_ours_over_peft", _ratio(field("ours", "peak_bytes"), field("peft", "peak_bytes")))
        put("mem_ours_over_floor", _ratio(field("ours", "peak_bytes"), field("floor", "peak_bytes")))
        put("train_mem_ours_over_peft", _ratio(field("ours", "train_peak_bytes"), field("peft", "train_peak_bytes")))
        put("steady_mem_ours_over_peft", _ratio(field("ours", "steady_peak_bytes"), field("peft", "steady_peak_bytes")))
        est = field("ours", "estimate") or {}
        measured = field("ours", "steady_peak_bytes") or field("ours", "tensor_peak_bytes")
        put("estimate_over_measured", _ratio(est.get("total_bytes"), measured))
        if "ours" in c and c["ours"]["checkpoint_bytes"]:
            budget = c["ours"]["raw_trainable_bytes"] * 1.02 + 64 * 1024
            put("ckpt_over_budget", c["ours"]["checkpoint_bytes"] / budget)
            put("ckpt_ours_over_peft", _ratio(c["ours"]["checkpoint_bytes"], field("peft", "checkpoint_bytes")))
        latency = None
        if raw.get(("latency", cfg)):
            lat_runs = raw[("latency", cfg)]
            latency = {k: time_stats([t for r in lat_runs for t in r[k]]) for k in ("base", "unmerged", "merged")}
            latency["merged_over_base"] = statistics.median(r["merged_over_base"] for r in lat_runs)
            latency["unmerged_over_base"] = statistics.median(r["unmerged_over_base"] for r in lat_runs)
            put("latency_merged_over_base", latency["merged_over_base"])
            put("latency_unmerged_over_base", latency["unmerged_over_base"])
        # the same ratios round by round (each round's contenders ran back to back): their spread
        # shows how much of a difference is the machine's drift
        per_round: dict[str, list[float]] = {}
        if all(n in runs_of for n in ("ours", "peft", "floor")):
            by_round = {n: [statistics.median(r["times"]) for r in runs_of[n]] for n in ("ours", "peft", "floor")}
            per_round = {"time_ours_over_peft": [o / q for o, q in zip(by_round["ours"], by_round["peft"])],
                         "time_ours_over_floor": [o / f for o, f in zip(by_round["ours"], by_round["floor"])]}
        paired_runs = raw.get(("paired", cfg), [])
        paired = {k: [x for r in paired_runs for x in r[k]] for k in ("ours_over_peft", "ours_over_floor")}
        if paired["ours_over_peft"]:
            put("time_ours_over_peft_paired", statistics.median(paired["ours_over_peft"]))
            put("time_ours_over_floor_paired", statistics.median(paired["ours_over_floor"]))
        paired_times = ({n: time_stats([t for r in paired_runs for t in r["times"][n]]) for n in ("floor", "ours", "peft")}
                        if paired_runs else None)
        casts = ({k: v for k, v in raw[("casts", cfg)][0].items() if k != "spec"}
                 if raw.get(("casts", cfg)) else None)
        if casts is not None:
            put("casts_ours_over_peft", (casts["ours"]["forward"] + casts["ours"]["backward"])
                / (casts["peft"]["forward"] + casts["peft"]["backward"]))
            put("casts_on_base_path", casts["ours"]["base_param_casts"])
            put("bf16_activations_ours_over_peft", casts["ours"]["saved_activation_bytes"]
                / casts["peft"]["saved_activation_bytes"])
        counts = None
        if raw.get(("counts", cfg)):
            counts_raw = raw[("counts", cfg)][0]
            counts = {"batch": counts_raw["batch"], "seq": counts_raw["seq"], "optimizer": counts_raw.get("optimizer"),
                      "adapter_dtype": counts_raw.get("adapter_dtype"),
                      "gradient_checkpointing": counts_raw.get("gradient_checkpointing"),
                      "by_dtype": summarise_counts(counts_raw)}
            first_dtype = next(iter(counts["by_dtype"]))
            for dtype, entry in counts["by_dtype"].items():
                suffix = "" if dtype == first_dtype else f"_{dtype}"
                for key, value in entry["ratios"].items():
                    put(key + suffix, value)
        compiled = None
        if raw.get(("compile", cfg)):
            compiled = summarise_compile(raw[("compile", cfg)][0])
            for key, value in compiled["ratios"].items():
                put(key, value)
        put("time_dora_over_lora_ours", _ratio(med("ours-dora"), med("ours")))
        put("mem_dora_over_lora_ours", _ratio(field("ours-dora", "peak_bytes"), field("ours", "peak_bytes")))
        put("time_dora_ours_over_peft", _ratio(med("ours-dora"), med("peft-dora")))
        put("mem_dora_ours_over_peft", _ratio(field("ours-dora", "peak_bytes"), field("peft-dora", "peak_bytes")))
        if "ours-unfused" in c:
            put("time_ours_over_unfused", _ratio(med("ours"), med("ours-unfused")))
            put("mem_ours_over_unfused", _ratio(field("ours", "peak_bytes"), field("ours-unfused", "peak_bytes")))
            put("train_mem_ours_over_unfused", _ratio(field("ours", "train_peak_bytes"),
                                                      field("ours-unfused", "train_peak_bytes")))
        out[cfg] = {"label": label_of(settings, cfg),
                    "config": {k: v for k, v in CONFIGS[cfg].items() if k != "label"},
                    "gradient_checkpointing": gc_of(settings, cfg),
                    "contenders": contenders, "latency": latency, "ratios": ratios, "per_round": per_round,
                    "paired": {k: time_stats(v) if v else None for k, v in paired.items()},
                    "paired_times": paired_times, "casts": casts, "counts": counts, "compile": compiled}
    return out


def check_targets(results: dict[str, Any], device: str = "cpu") -> list[dict[str, Any]]:
    rows = []
    for name, key, only, hi, lo, devices in TARGETS:
        if device not in devices:
            continue
        for cfg, res in results.items():
            if only is not None and cfg != only:
                continue
            if key not in res["ratios"]:
                continue
            value = res["ratios"][key]
            ok = value <= hi and (lo is None or value >= lo)
            bound = f"{lo:.2f}..{hi:.2f}" if lo is not None else f"<= {hi:.2f}" if isinstance(hi, float) else f"== {hi}"
            rows.append({"target": name, "config": cfg, "value": value, "bound": bound, "met": ok})
    return rows


# ---------------------------------------------------------------------- reporting
#: the order of the ratio table (others follow by name)
RATIO_ORDER = ["time_ours_over_peft_paired", "time_ours_over_floor_paired", "time_ours_over_peft", "time_ours_over_floor",
               "time_trainer_over_ours", "time_full_over_ours", "mem_ours_over_peft", "mem_ours_over_floor",
               "train_mem_ours_over_peft", "steady_mem_ours_over_peft", "estimate_over_measured",
               "latency_unmerged_over_base", "latency_merged_over_base", "ckpt_ours_over_peft", "ckpt_over_budget",
               "time_ours_over_unfused", "mem_ours_over_unfused", "train_mem_ours_over_unfused",
               "casts_ours_over_peft", "casts_on_base_path", "bf16_activations_ours_over_peft",
               "ops_ours_over_peft", "ops_ours_over_floor", "time_compiled_over_eager", "time_compiled_over_eager_peft",
               "time_ours_over_peft_compiled", "compile_seconds_ours", "time_dora_over_lora_ours", "mem_dora_over_lora_ours",
               "time_dora_ours_over_peft", "mem_dora_ours_over_peft"]


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _memory_label(device: str) -> str:
    return "steady peak (CUDA)" if device == "cuda" else "peak RSS"


def summary_table(report: dict[str, Any]) -> list[str]:
    """The issue-14 table: per config floor / ours / PEFT step time, paired ratios, tokens/s, peak memory
    ours / PEFT, estimate vs measured, operators dispatched per step."""
    device = report["meta"]["device"]
    lines = ["| config | floor | ours | PEFT | ours/PEFT (paired) | ours/floor (paired) | tokens/s ours | "
             f"{_memory_label(device)} ours / PEFT | estimate / measured peak (ours) | ops per step floor / ours / PEFT |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in report["results"].values():
        c, r = res["contenders"], res["ratios"]
        med = functools.partial(_median_time, c)
        peak = functools.partial(_field, c, key="steady_peak_bytes" if device == "cuda" else "peak_bytes")
        sep = _r(r.get("time_ours_over_peft"))
        paired = _r(r.get("time_ours_over_peft_paired"))
        est = (c.get("ours") or {}).get("estimate") or {}
        measured = (c.get("ours") or {}).get("steady_peak_bytes") or (c.get("ours") or {}).get("tensor_peak_bytes")
        est_cell = (f"{_size(est['total_bytes'])} / {_size(measured)} ({r['estimate_over_measured']:.3f})"
                    if est.get("total_bytes") and measured else "-")
        ops = "-"
        if res.get("counts"):
            first = next(iter(res["counts"]["by_dtype"].values()))["contenders"]
            ops = " / ".join(str(first[n]["total"]) if n in first else "-" for n in ("floor", "ours", "peft"))
        tps = f"{c['ours']['tokens_per_s']:,.0f}" if "ours" in c else "-"
        lines.append(f"| {res['label']} | {_s(med('floor'))} | {_s(med('ours'))} | {_s(med('peft'))} | "
                     f"{sep} ({paired}) | {_r(r.get('time_ours_over_floor_paired'))} | {tps} | "
                     f"{_size(peak('ours'))} / {_size(peak('peft'))} | {est_cell} | {ops} |")
    lines += ["", "ours/PEFT: separate processes (paired run in parentheses). Ops per step: compute operators "
              "dispatched in one training step (see the operator table of each config)."]
    return lines


def counts_lines(counts: dict[str, Any]) -> list[str]:
    gc = ", gradient checkpointing (recompute counted in backward)" if counts.get("gradient_checkpointing") else ""
    lines = [f"Operators dispatched per training step (`lightning_lora.profiling.DispatchCounter`: ATen operators "
             f"below autograd, forward + backward + {counts.get('optimizer') or 'AdamW'}; one step after a "
             f"warm-up step; batch {counts['batch']} x {counts['seq']}{gc}). `ops per step` counts the operators "
             "that can launch a kernel; views and others (allocations, metadata, profiler markers) are shown apart. "
             "`per adapted layer` = (contender - floor) / adapted layers.", "",
             "| base dtype | contender | adapted layers | forward | backward | optimizer | ops per step | "
             "per adapted layer (all / fwd+bwd) | views | others |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for dtype, entry in counts["by_dtype"].items():
        for name, row in entry["contenders"].items():
            per = (f"{row['per_layer']:.2f} / {row['per_layer_fwd_bwd']:.2f}" if "per_layer" in row else "-")
            lines.append(f"| {dtype} (adapters {counts.get('adapter_dtype') or 'fp32'}) | {name} | "
                         f"{row['adapted_layers']} | {row['forward']} | {row['backward']} | {row['optimizer']} | "
                         f"**{row['total']}** | {per} | {row['views']} | {row['other']} |")
    lines.append("")
    for dtype, entry in counts["by_dtype"].items():
        rr = entry["ratios"]
        text = f"{dtype}: ops ours/PEFT {_r(rr.get('ops_ours_over_peft'))}, ours/floor {_r(rr.get('ops_ours_over_floor'))}"
        diffs = []
        for ph, d in entry["ours_minus_peft_per_layer"].items():
            if d:
                diffs.append(f"{ph} " + ", ".join(f"{op.removeprefix('aten.')} {v:+.2f}" for op, v in list(d.items())[:8]))
        if diffs:
            text += "; ours - PEFT per adapted layer: " + "; ".join(diffs)
        lines += [text, ""]
    return lines[:-1]


def compile_lines(compiled: dict[str, Any]) -> list[str]:
    lengths = compiled.get("lengths") or {}
    lines = [f"`torch.compile` (backend {compiled.get('backend', 'inductor')}; "
             "`lightning_lora.tasks.compile.TrainingCompile`: each decoder layer compiled once "
             f"for all layers, lengths dynamic), plain loop, batch {lengths.get('batch', '?')} x {lengths.get('seq', '?')}; "
             "compile time = first compiled step - compiled median; a batch of "
             f"{lengths.get('other_seq', '?')} tokens afterwards must not recompile", "",
             "| contender | eager step | compiled step | compiled/eager | compile time | graphs | recompiles | "
             "graph breaks | new graphs, other length |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in compiled["contenders"].items():
        lines.append(f"| {name} | {_s(row['eager_s'])} | {_s(row['compiled_s'])} | {row['compiled_over_eager']:.3f} | "
                     f"{row['compile_s']:.1f} s | {row['graphs']} | {row['recompiles']} | {row['graph_breaks']} | "
                     f"{row['new_graphs_other_length']} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m, s = report["meta"], report["settings"]
    device = m["device"]
    dtype_text = (f"base {s.get('dtype', 'fp32')}, adapters {s.get('adapter_dtype', 'fp32')}")
    lines = [f"# lightning-lora benchmark ({device})", "",
             f"- date: {m['date']}",
             f"- machine: {m['machine']}; CPU count {m['cpu_count']}; torch threads {s['threads']}",
             f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"lightning {m['lightning']}",
             f"- model: {s['model']} ({dtype_text}); batch {s['batch']} x seq {s['seq']} random tokens "
             f"(seed {s['seed']}); AdamW lr 1e-4; {s['warmup']} warm-up + {s['steps']} timed steps per run "
             f"({s.get('paired_steps', s['steps'])} per model in a paired run); {s['rounds']} round(s), "
             "contenders alternating round-robin, one subprocess per measurement",
             f"- memory: {m['memory_method']}"]
    if any(res.get("latency") for res in report["results"].values()):
        lines.append(f"- inference latency: forward of batch {s['batch']} x seq {s['seq']} under `inference_mode`, "
                     f"{s['latency_reps']} reps per round, base and the other model alternating forward by forward")
    if s.get("preset"):
        lines.append(f"- preset: `{s['preset']}`")
    for update in m.get("updates", []):
        differ = "".join(f", {k} {v}" for k, v in update.get("settings", {}).items())
        lines.append(f"- updated {update['date']}: re-ran {', '.join(update['jobs'])} "
                     f"(torch {update['torch']}, transformers {update['transformers']}, peft {update['peft']}{differ})")
    if not report.get("complete", True):
        lines.append("- **partial**: written while the run was going on, or the run was stopped")
    lines += ["", "## Summary", "", *summary_table(report), ""]
    for res in report["results"].values():
        lines += [f"## {res['label']}", ""]
        if res["contenders"]:
            peak2 = "steady peak" if device == "cuda" else "tensor peak (profiler)"
            lines += [f"| contender | step time median | IQR | min..max | tokens/s | peak memory | {peak2} | "
                      "trainable params | checkpoint |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for name, row in res["contenders"].items():
                t = row["time"]
                p2 = row.get("steady_peak_bytes") if device == "cuda" else row.get("tensor_peak_bytes")
                lines.append(f"| {name} | {t['median_s'] * 1e3:,.1f} ms | {t['q1_s'] * 1e3:,.1f}..{t['q3_s'] * 1e3:,.1f} | "
                             f"{t['min_s'] * 1e3:,.1f}..{t['max_s'] * 1e3:,.1f} | {row.get('tokens_per_s', 0):,.0f} | "
                             f"{_mb(row['peak_bytes'])} | {_size(p2)} | "
                             f"{row['trainable_params']:,} | {_size(row['checkpoint_bytes'])} |")
            est = (res["contenders"].get("ours") or {}).get("estimate")
            if est and est.get("total_bytes"):
                lines += ["", f"estimate (`lightning_lora.estimate.estimate_memory`, {est['precision']}): "
                          f"{_size(est['total_bytes'])} for ours (weights {_size(est['weights_bytes'])}, "
                          f"activations {_size(est['activations_bytes'])}); measured/estimate "
                          f"{1 / res['ratios']['estimate_over_measured']:.3f}" if "estimate_over_measured" in res["ratios"]
                          else f"estimate: {_size(est['total_bytes'])} for ours (no measured tensor peak)"]
            elif est and est.get("error"):
                lines += ["", f"estimate: not available ({est['error']})"]
        lat = res.get("latency")
        if lat:
            lines += ["", "| inference | latency median | IQR | / base |", "| --- | ---: | ---: | ---: |"]
            for k, ratio in (("base", 1.0), ("unmerged", lat["unmerged_over_base"]), ("merged", lat["merged_over_base"])):
                t = lat[k]
                lines.append(f"| {k} | {t['median_s'] * 1e3:,.2f} ms | {t['q1_s'] * 1e3:,.2f}..{t['q3_s'] * 1e3:,.2f} | "
                             f"{ratio:.3f} |")
        casts = res.get("casts")
        if casts:
            lines += ["", f"bf16 base, fp32 adapters, one training step of batch 1 x {s['casts_seq']}: dtype casts "
                      "(`aten._to_copy`) and the activations autograd saves for backward", "",
                      "| contender | adapted layers | casts forward | casts backward | cast bytes | "
                      "casts reading a base parameter | saved activations |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for name, cc in casts.items():
                lines.append(f"| {name} | {cc['adapted_layers']} | {cc['forward']} | {cc['backward']} | "
                             f"{_size(cc['bytes'])} | {cc['base_param_casts']} | {_size(cc['saved_activation_bytes'])} |")
        if res.get("counts"):
            lines += ["", *counts_lines(res["counts"])]
        if res.get("compile"):
            lines += ["", *compile_lines(res["compile"])]
        pr = res.get("per_round", {})
        if pr:
            lines += ["", "step time ratio by round (separate processes, each round's runs back to back): "
                      + "; ".join(f"{k} " + ", ".join(f"{v:.3f}" for v in vs) for k, vs in pr.items())]
        if (res.get("paired") or {}).get("ours_over_peft"):
            lines += ["", "paired (floor, ours, PEFT in one process, one step each in turn): per-step ratio median "
                      "(IQR, n): " + "; ".join(
                          f"{k} {v['median_s']:.3f} ({v['q1_s']:.3f}..{v['q3_s']:.3f}, {v['n']})"
                          for k, v in res["paired"].items() if v)]
            if res.get("paired_times"):
                lines[-1] += "; step time medians " + ", ".join(
                    f"{n} {_s(v['median_s'])}" for n, v in res["paired_times"].items())
        r = res["ratios"]
        if r:
            lines += ["", "| ratio | value |", "| --- | ---: |"]
            for key in sorted(r, key=lambda k: (RATIO_ORDER.index(k) if k in RATIO_ORDER else len(RATIO_ORDER), k)):
                lines.append(f"| {key} | {r[key]:.3f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | config | value | bound | met |", "| --- | --- | ---: | ---: | --- |"]
    for t in report["targets"]:
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        lines.append(f"| {t['target']} | {t['config']} | {value} | {t['bound']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    if report.get("errors"):
        lines += ["", "## Errors", "", "| job | config | round | error |", "| --- | --- | ---: | --- |"]
        for e in report["errors"]:
            lines.append(f"| {e['job']} | {e['config']} | {e['round']} | {e['error']} |")
    if any("ours-unfused" in res["contenders"] for res in report["results"].values()):
        lines += ["", "`ours-unfused` (ablation): ours with the adapter path through plain autograd "
                  "(`nn.Dropout` + the `lora_A`/`lora_B` modules), i.e. without the fused paths of `layers.py`."]
    lines += ["", "`train_mem_*` is the peak minus the memory right after the model was built/injected "
              "(the training-only share); `peak memory` includes the model weights."]
    if any(res.get("counts") for res in report["results"].values()):
        lines += ["", "Operator counts do not depend on timing (valid on a busy machine) and, apart from a few "
                  "device-specific kernels, not on the device: on CUDA `F.dropout` is one fused `native_dropout` "
                  "where CPU dispatches `bernoulli_` + `div_` + `mul` (PEFT's dropout path there: 2 operators fewer "
                  "per adapted layer in forward). AdamW's `_local_scalar_dense` (2 per parameter) reads its CPU "
                  "step counters on the host on either device."]
    if s.get("quick"):
        lines += ["", "**--quick run**: tiny model, few steps; the numbers only check that the benchmark works."]
    if s.get("dry_run"):
        lines += ["", "**--dry-run**: the preset's jobs on CPU at a tiny shape; the numbers only check the recipe."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar chart of the main ratios; False (no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [("time_ours_over_peft_paired", "time ours/PEFT"), ("time_ours_over_floor_paired", "time ours/floor"),
            ("mem_ours_over_peft", "memory ours/PEFT"), ("mem_ours_over_floor", "memory ours/floor"),
            ("steady_mem_ours_over_peft", "steady memory ours/PEFT"), ("ops_ours_over_peft", "ops ours/PEFT"),
            ("ops_ours_over_floor", "ops ours/floor"), ("latency_merged_over_base", "merged latency/base"),
            ("ckpt_ours_over_peft", "checkpoint ours/PEFT")]
    cfgs = list(report["results"])
    keys = [(k, label) for k, label in keys if any(k in report["results"][c]["ratios"] for c in cfgs)]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(cfgs), 1)
    for i, cfg in enumerate(cfgs):
        vals = [report["results"][cfg]["ratios"].get(k, float("nan")) for k, _ in keys]
        xs = [j + (i - (len(cfgs) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, vals, width, label=report["results"][cfg]["label"])
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)), [label for _, label in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ratio (lower is better; 1 = parity)")
    ax.set_title(f"lightning-lora vs PEFT / floor, {report['settings']['model']} on {report['meta']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "lightning")}


def meta(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "cuda":
        try:
            import torch

            cpu += f"; GPU {torch.cuda.get_device_name(0)}"
        except Exception as err:  # no usable GPU: the jobs will say so; the report still gets written
            cpu += f"; GPU unavailable ({type(err).__name__})"
    mem = ("CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the model was built; "
           "steady peak: max_memory_allocated() after a reset that follows the warm-up steps (absolute)"
           if device == "cuda" else
           "CPU: peak RSS of the measurement's subprocess (resource.getrusage ru_maxrss) minus its peak RSS "
           "before the model was built; includes model weights, gradients, optimizer state, activations and "
           "allocator slack; tensor peak: live tensors at the start of one extra step plus the highest running "
           "sum of its allocations (torch.profiler memory events)")
    return {"device": device, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.system()} {platform.release()}, {cpu}", "cpu_count": os.cpu_count(),
            "python": platform.python_version(), **_versions(), "memory_method": mem}


# ---------------------------------------------------------------------- command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="gpu-8b: issue 14's table (Llama-3-8B shape, bf16, batch 1 x 2048, both configs) on CUDA")
    p.add_argument("--dry-run", action="store_true",
                   help="run the selected jobs on CPU at a tiny shape (tiny-llama), written to a temporary directory "
                        "unless --out is given: checks a recipe before spending GPU time")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--model", default=None, help="smollm2-135m-instruct (default), tiny-llama, a shipped config "
                   "name (llama-3-8b, smollm2-135m, ...: random weights) or a local path")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="dtype of the base model (default fp32)")
    p.add_argument("--adapter-dtype", choices=["fp32", "bf16"], default=None,
                   help="dtype of A and B (default fp32: LoRAConfig.adapter_dtype='float32')")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="transformers' gradient checkpointing (non-reentrant) for every config "
                        "(default off; the gpu-8b preset: on for r=8 q,v, off for all-linear)")
    p.add_argument("--quick", action="store_true", help="tiny-llama, few steps, one round (a smoke test)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--name", default=None, help="output file stem (default: the device)")
    p.add_argument("--jobs", default=None,
                   help=f"comma-separated jobs to run (default all but {','.join(OPT_IN_JOBS)}): {','.join(JOB_KINDS)}")
    p.add_argument("--merge", action="store_true",
                   help="merge the jobs run now into <out>/<name>.json (replacing those jobs' earlier results, "
                        "keeping the others and the original settings) and re-render the report")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated LoRA configs to measure (default all): {','.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--counts-batch", type=int, default=None, help="batch of the operator-count step (default 1)")
    p.add_argument("--counts-seq", type=int, default=None, help="tokens of the operator-count step (default 64)")
    p.add_argument("--counts-dtypes", default=None,
                   help="comma-separated base dtypes to count operators in (default: the run's dtype, plus bf16 "
                        "on an fp32 run)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compile job (default inductor; --dry-run: aot_eager)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPU count, max 8)")
    p.add_argument("--latency-reps", type=int, default=None)
    p.add_argument("--paired-steps", type=int, default=None, help="timed steps per model in a paired run")
    p.add_argument("--ablation", action="store_true",
                   help="also run 'ours-unfused' (plain autograd through nn.Dropout) on the dropout config")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement (default 900)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no further measurement starts (each one is cut to what is left); "
                        "what finished is written")
    return p


def resolve_settings(args: argparse.Namespace, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- --quick <- the preset <- --dry-run <- (with --merge) the merged report's settings <- flags."""
    s: dict[str, Any] = {**DEFAULTS, "device": "cpu"}
    if args.quick:
        s.update(QUICK)
    if args.preset:
        s.update(PRESETS[args.preset])
        s["preset"] = args.preset
    if args.dry_run:
        s.update(DRY_RUN)
        s["dry_run"] = True
    if previous:
        s.update({k: v for k, v in previous.items() if k not in ("jobs", "counts_dtypes")})
    flags = {"device": args.device, "model": args.model, "dtype": args.dtype, "adapter_dtype": args.adapter_dtype,
             "gradient_checkpointing": args.gradient_checkpointing, "rounds": args.rounds, "steps": args.steps,
             "warmup": args.warmup, "batch": args.batch, "seq": args.seq, "counts_batch": args.counts_batch,
             "counts_seq": args.counts_seq, "latency_reps": args.latency_reps, "paired_steps": args.paired_steps,
             "timeout": args.timeout, "deadline": args.deadline, "threads": args.threads,
             "compile_backend": args.compile_backend}
    s.update({k: v for k, v in flags.items() if v is not None})
    if args.jobs:
        jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
        unknown = sorted(set(jobs) - {*JOB_KINDS, "ours-unfused"})
        if unknown:
            raise SystemExit(f"--jobs: unknown job(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(JOB_KINDS)}, ours-unfused")
        s["jobs"] = jobs
    # the ablation (ours-unfused) runs along with the ours jobs: with --ablation, or in a merge into a run
    # that had it when no --jobs narrows what runs now
    if (args.ablation or (previous and previous.get("ablation") and not args.jobs)) and "ours" in s["jobs"]:
        s["jobs"] = [*s["jobs"], "ours-unfused"]
    if args.counts_dtypes:
        s["counts_dtypes"] = [d.strip() for d in args.counts_dtypes.split(",") if d.strip()]
    s["counts_dtypes"] = counts_dtypes(s)
    s.setdefault("threads", None)
    s["threads"] = s["threads"] or min(os.cpu_count() or 1, 8)
    s["quick"] = bool(args.quick) or bool(previous and previous.get("quick"))
    s["ablation"] = bool(args.ablation) or bool(previous and previous.get("ablation"))
    return s


def compact(job: str, cfg: str, rnd: int, result: dict[str, Any], seconds: float, tokens: int) -> dict[str, Any]:
    """One short JSON line per finished measurement (long console output gets cut)."""
    line: dict[str, Any] = {"job": job, "config": cfg, "round": rnd, "seconds": round(seconds, 1)}
    if "error" in result:
        return {**line, "ok": False, "error": result["error"]}
    line["ok"] = True
    if "times" in result and isinstance(result["times"], list):
        med = statistics.median(result["times"])
        line.update(median_s=round(med, 4), tokens_per_s=round(tokens / med, 1),
                    peak_gib=round(result["peak_bytes"] / GIB, 3))
        for key in ("steady_peak_bytes", "tensor_peak_bytes"):
            if result.get(key):
                line[key.replace("_bytes", "_gib")] = round(result[key] / GIB, 3)
        if (result.get("estimate") or {}).get("total_bytes"):
            line["estimate_gib"] = round(result["estimate"]["total_bytes"] / GIB, 3)
    elif job == "paired":
        line.update({k: round(statistics.median(result[k]), 4) for k in ("ours_over_peft", "ours_over_floor")})
        line["median_s"] = {n: round(statistics.median(v), 4) for n, v in result["times"].items()}
    elif job == "counts":
        line["ops_per_step"] = {dtype: {n: rows[n]["total"]["compute"] for n in ("floor", "ours", "peft")}
                                for dtype, rows in result["by_dtype"].items()}
        line["adapted_layers"] = next(iter(result["by_dtype"].values()))["ours"]["adapted_layers"]
    elif job == "latency":
        line.update(merged_over_base=round(result["merged_over_base"], 4),
                    unmerged_over_base=round(result["unmerged_over_base"], 4))
    elif job == "casts":
        line["casts"] = {n: [result[n]["forward"], result[n]["backward"]] for n in ("floor", "ours", "peft")}
    elif job == "compile":
        summary = summarise_compile(result)
        line["compile"] = {n: {"compile_s": round(r["compile_s"], 1), "compiled_over_eager": round(r["compiled_over_eager"], 3),
                               "graphs": r["graphs"], "recompiles": r["recompiles"]}
                           for n, r in summary["contenders"].items()}
    return line


def data_loss(settings: dict[str, Any], out: Path, name: str) -> None:
    """The preset's packed + chunked row: `benchmarks/data_and_loss.py` (packed vs padded useful tokens/s on an
    Alpaca-like length mix, and the loss's memory, chunked vs transformers') with the same preset, its tables
    appended to `<name>.md` and its report put under `"data_loss"` in `<name>.json`."""
    cmd = [sys.executable, str(HERE / "data_and_loss.py"), "--out", str(out)]
    cmd += ["--dry-run"] if settings.get("dry_run") else ["--preset", settings.get("preset") or "gpu-8b"]
    print("[data and loss] packed vs padded, loss memory ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1"))
    path = out / f"{settings['device']}-data-loss.json"
    if not path.is_file():
        print(f"data_and_loss.py failed (exit {proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
        return
    sub = json.loads(path.read_text())
    report = json.loads((out / f"{name}.json").read_text())
    report["data_loss"] = {k: sub[k] for k in ("results", "errors", "settings")}
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    md = (out / f"{settings['device']}-data-loss.md").read_text()
    tables = md.split("\n", 1)[1].replace("\n## ", "\n### ")
    with (out / f"{name}.md").open("a") as f:
        f.write("\n## Packed vs padded batches, loss memory (`benchmarks/data_and_loss.py`)\n" + tables)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    device_guess = args.device or ("cpu" if args.dry_run else PRESETS.get(args.preset or "", {}).get("device", "cpu"))
    name = args.name or device_guess
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="lightning-lora-bench-"))
    else:
        out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if args.merge:
        path = out / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--merge: {path} does not exist; run without --merge first")
        previous = json.loads(path.read_text())
        raw = {(e["contender"], e["config"]): e["runs"] for e in previous["raw"]}
    settings = resolve_settings(args, previous["settings"] if previous else None)
    # a merge keeps the merged report's settings (they describe its timed runs); settings it lacks are
    # taken from now, and what differs now is recorded with the update
    report_settings = {**settings, **previous["settings"]} if previous else settings
    changed = {k: v for k, v in settings.items() if previous and k in previous["settings"] and k != "jobs"
               and previous["settings"][k] != v}
    device = settings["device"]
    configs = selected_configs(args.configs)
    # a merge keeps the configs of the merged report in the report
    report_configs = [c for c in CONFIGS if c in configs or any(k[1] == c for k in raw)]
    report_meta = previous["meta"] if previous else meta(device)
    rerun = set(jobs_for_round(configs, first=True, settings=settings))
    # errors of an earlier run are kept for the jobs not re-run now
    errors: list[dict[str, Any]] = [e for e in (previous or {}).get("errors", []) if (e["job"], e["config"]) not in rerun]
    started = time.monotonic()
    ran: list[str] = []
    jsonl = out / f"{name}.jsonl"
    if not args.merge:
        jsonl.write_text("")
    replaced: set[tuple[str, str]] = set()
    tokens = settings["batch"] * settings["seq"]
    print(f"benchmark: {settings['model']} on {device}, writing {out}/{name}.md|.json|.jsonl", file=sys.stderr, flush=True)

    def write(complete: bool) -> dict[str, Any]:
        results = summarise(raw, report_configs, report_settings)
        report: dict[str, Any] = {"meta": report_meta, "settings": report_settings, "results": results,
                                  "targets": check_targets(results, device), "errors": errors, "complete": complete}
        report["raw"] = [{"contender": k[0], "config": k[1], "runs": [{kk: vv for kk, vv in r.items() if kk != "spec"}
                                                                        for r in v]} for k, v in raw.items()]
        (out / f"{name}.md").write_text(markdown(report))
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        return report

    stopped = False
    for rnd in range(settings["rounds"]):
        for job, cfg in jobs_for_round(configs, first=rnd == 0, settings=settings):
            left = None if settings["deadline"] is None else settings["deadline"] - (time.monotonic() - started)
            if left is not None and left < 10:
                errors.append({"job": job, "config": cfg, "round": rnd + 1, "error": "skipped: deadline reached"})
                stopped = True
                continue
            spec = {**settings, "contender": job, "config_name": cfg, "config": CONFIGS[cfg],
                    "gradient_checkpointing": gc_of(settings, cfg), "tensor_peak": settings["tensor_peak"] and rnd == 0}
            if job == "paired":
                spec["steps"] = settings["paired_steps"]
            print(f"[round {rnd + 1}/{settings['rounds']}] {job} / {cfg} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            timeout = settings["timeout"] if left is None else max(10.0, min(settings["timeout"], left))
            result = run_job(spec, timeout)
            line = compact(job, cfg, rnd + 1, result, time.monotonic() - t0, tokens)
            print(json.dumps(line), flush=True)
            with jsonl.open("a") as f:
                f.write(json.dumps({**line, "result": {k: v for k, v in result.items() if k != "spec"}}) + "\n")
            ran.append(job)
            if "error" in result:
                errors.append({"job": job, "config": cfg, "round": rnd + 1, "error": result["error"]})
                print(result.get("stderr", "")[-1500:], file=sys.stderr, flush=True)
            else:
                key = (job, cfg)
                if args.merge and key not in replaced:
                    raw[key] = []
                    replaced.add(key)
                raw.setdefault(key, []).append(result)
            write(complete=False)

    if args.merge:
        report_meta.setdefault("updates", []).append(
            {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "jobs": sorted(set(ran)), **_versions(), "settings": changed})
    report = write(complete=not stopped)
    if settings.get("data_loss") and not args.merge:
        if stopped:  # the deadline keeps a GPU session in its time: the row would run past it
            print("data_and_loss.py: skipped (deadline reached)", file=sys.stderr)
        else:
            data_loss(settings, out, name)
    plotted = plot(report, out / f"{name}.png")
    print("\n".join(["", f"## {settings['model']} on {device}: summary", "", *summary_table(report), ""]))
    met = [t for t in report["targets"]]
    print(f"targets met: {sum(t['met'] for t in met)}/{len(met)}; errors: {len(errors)}; wrote {out / name}.md, "
          f".json, .jsonl{', .png' if plotted else ''} in {time.monotonic() - started:.0f} s")
    return report


if __name__ == "__main__":
    main()
