"""Side-by-side LoRA training benchmark: lightning-lora vs PEFT vs full fine-tuning vs the frozen floor.

    python benchmarks/run.py [--device cpu|cuda] [--model smollm2-135m-instruct|tiny-llama|PATH]
                             [--quick] [--out DIR] [--rounds N] [--steps N] [--batch N] [--seq N]

Contenders (same model, random tokens with a fixed seed, batch, sequence length, AdamW lr 1e-4):

- floor: the frozen base model, forward + backward to the input embeddings, no adapters, no optimizer.
  Any LoRA implementation must at least backpropagate through the whole network, so this is the
  lower bound of a LoRA step.
- ours: `inject_lora` + a plain loop (AdamW over the trainable parameters).
- ours-trainer: the same through `lightning.Trainer` + the `LoRA` callback (step time from a callback,
  `on_train_batch_start` -> `on_train_batch_end`).
- peft: `peft.get_peft_model` with the same config, the same loop.
- full: full fine-tuning, the same loop.

Besides, per config and round: `paired` runs floor, ours and PEFT in one process, one step each
in turn (the order rotating), so that the per-step time ratios compare neighbouring steps; the
step-time targets use these paired ratios (the separate-process ratios are reported too).
`latency` times inference of base / unmerged / merged; `casts` (first round only) counts dtype
casts in one step on a bf16 base with fp32 adapters.

Configs: (a) r=8 on q_proj, v_proj, dropout 0; (b) r=16 on all linear layers, dropout 0.05.

Every measurement runs in its own subprocess (`benchmarks/_worker.py`) so that its memory peak is
its own, and the contenders alternate round-robin (round 1: A B C D ..., round 2: A B C D ...), so
that slow drift of the machine hits every contender alike. Memory on CPU is the peak RSS of the
subprocess (`resource.getrusage`) minus its peak RSS before the model was built (so it includes the
model's weights, which are the same for every contender); on CUDA it is `torch.cuda.max_memory_allocated`
minus the allocation before the model was built.

Writes `<out>/<device>.md` (also printed), `<out>/<device>.json` and `<out>/<device>.png`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"

CONFIGS: dict[str, dict[str, Any]] = {
    "qv-r8": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
              "label": "r=8, q_proj+v_proj, dropout 0"},
    "all-r16-do": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
                   "label": "r=16, all-linear, dropout 0.05"},
}
TRAIN_CONTENDERS = ("floor", "ours", "ours-trainer", "peft", "full")
#: contenders whose measurement does not depend on the LoRA config (measured once per round)
CONFIG_FREE = ("floor", "full")

#: targets: (name, ratio key, config or None for all, upper bound, lower bound)
TARGETS: list[tuple[str, str, str | None, float, float | None]] = [
    ("step time ours/PEFT (paired)", "time_ours_over_peft_paired", None, 1.00, None),
    ("step time ours/floor (paired)", "time_ours_over_floor_paired", "qv-r8", 1.10, None),
    ("step time ours/PEFT (separate processes)", "time_ours_over_peft", None, 1.00, None),
    ("step time ours/floor (separate processes)", "time_ours_over_floor", "qv-r8", 1.10, None),
    ("peak memory ours/PEFT (dropout 0)", "mem_ours_over_peft", "qv-r8", 1.00, None),
    ("peak memory ours/PEFT (dropout 0.05, all-linear)", "mem_ours_over_peft", "all-r16-do", 0.85, None),
    ("merged latency / base", "latency_merged_over_base", None, 1.03, 0.97),
    ("adapter checkpoint / (raw x1.02 + 64KB)", "ckpt_over_budget", None, 1.00, None),
    ("bf16 base: casts reading a base parameter", "casts_on_base_path", None, 0, None),
]


# ---------------------------------------------------------------------- running
def jobs_for_round(configs: list[str], ablation: bool = False, first: bool = True) -> list[tuple[str, str]]:
    """(contender, config) pairs of one round, alternating the contenders; the bf16 cast counts
    (deterministic, not timed) only in the first round."""
    jobs: list[tuple[str, str]] = [("floor", configs[0])]
    for cfg in configs:
        jobs += [("ours", cfg), ("peft", cfg), ("ours-trainer", cfg)]
        if ablation and CONFIGS[cfg]["dropout"] > 0:
            jobs.append(("ours-unfused", cfg))
    jobs.append(("full", configs[0]))
    jobs += [("latency", cfg) for cfg in configs]
    jobs += [("paired", cfg) for cfg in configs]
    if first:
        jobs += [("casts", cfg) for cfg in configs]
    return jobs


def run_job(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS=str(spec["threads"]))
        proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec), str(out)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker failed for {spec['contender']} / {spec['config_name']}:\n"
                               f"{proc.stderr[-4000:]}")
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


def summarise(raw: dict[tuple[str, str], list[dict[str, Any]]], configs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in configs:
        contenders: dict[str, Any] = {}
        keys = {name: (name, configs[0] if name in CONFIG_FREE else cfg) for name in (*TRAIN_CONTENDERS, "ours-unfused")}
        runs_of = {name: raw[key] for name, key in keys.items() if key in raw}
        for name, runs in runs_of.items():
            times = [t for r in runs for t in r["times"]]
            row = {"time": time_stats(times),
                   "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs)),
                   "train_peak_bytes": int(statistics.median(r["train_peak_bytes"] for r in runs)),
                   "peak_bytes_min_max": [min(r["peak_bytes"] for r in runs), max(r["peak_bytes"] for r in runs)],
                   "trainable_params": runs[0]["trainable_params"],
                   "raw_trainable_bytes": runs[0]["raw_trainable_bytes"],
                   "checkpoint_bytes": runs[0].get("checkpoint_bytes")}
            contenders[name] = row
        by_round = {name: [statistics.median(r["times"]) for r in runs_of[name]] for name in ("ours", "peft", "floor")}
        lat_runs = raw[("latency", cfg)]
        latency = {k: time_stats([t for r in lat_runs for t in r[k]]) for k in ("base", "unmerged", "merged")}
        latency["merged_over_base"] = statistics.median(r["merged_over_base"] for r in lat_runs)
        latency["unmerged_over_base"] = statistics.median(r["unmerged_over_base"] for r in lat_runs)

        c = contenders
        budget = c["ours"]["raw_trainable_bytes"] * 1.02 + 64 * 1024
        ratios = {
            "time_ours_over_peft": c["ours"]["time"]["median_s"] / c["peft"]["time"]["median_s"],
            "time_ours_over_floor": c["ours"]["time"]["median_s"] / c["floor"]["time"]["median_s"],
            "time_trainer_over_ours": c["ours-trainer"]["time"]["median_s"] / c["ours"]["time"]["median_s"],
            "time_full_over_ours": c["full"]["time"]["median_s"] / c["ours"]["time"]["median_s"],
            "mem_ours_over_peft": c["ours"]["peak_bytes"] / c["peft"]["peak_bytes"],
            "mem_ours_over_floor": c["ours"]["peak_bytes"] / c["floor"]["peak_bytes"],
            "train_mem_ours_over_peft": c["ours"]["train_peak_bytes"] / c["peft"]["train_peak_bytes"],
            "latency_merged_over_base": latency["merged_over_base"],
            "latency_unmerged_over_base": latency["unmerged_over_base"],
            "ckpt_over_budget": c["ours"]["checkpoint_bytes"] / budget,
            "ckpt_ours_over_peft": c["ours"]["checkpoint_bytes"] / c["peft"]["checkpoint_bytes"],
        }
        # the same ratios round by round (each round's contenders ran back to back): their spread
        # shows how much of a difference is the machine's drift
        per_round = {"time_ours_over_peft": [o / q for o, q in zip(by_round["ours"], by_round["peft"])],
                     "time_ours_over_floor": [o / f for o, f in zip(by_round["ours"], by_round["floor"])]}
        paired_runs = raw.get(("paired", cfg), [])
        paired = {k: [x for r in paired_runs for x in r[k]] for k in ("ours_over_peft", "ours_over_floor")}
        if paired["ours_over_peft"]:
            ratios["time_ours_over_peft_paired"] = statistics.median(paired["ours_over_peft"])
            ratios["time_ours_over_floor_paired"] = statistics.median(paired["ours_over_floor"])
        casts = ({k: v for k, v in raw[("casts", cfg)][0].items() if k != "spec"}
                 if ("casts", cfg) in raw else None)
        if casts is not None:
            ratios["casts_ours_over_peft"] = ((casts["ours"]["forward"] + casts["ours"]["backward"])
                                              / (casts["peft"]["forward"] + casts["peft"]["backward"]))
            ratios["casts_on_base_path"] = casts["ours"]["base_param_casts"]
            ratios["bf16_activations_ours_over_peft"] = (casts["ours"]["saved_activation_bytes"]
                                                         / casts["peft"]["saved_activation_bytes"])
        if "ours-unfused" in c:
            ratios["time_ours_over_unfused"] = c["ours"]["time"]["median_s"] / c["ours-unfused"]["time"]["median_s"]
            ratios["mem_ours_over_unfused"] = c["ours"]["peak_bytes"] / c["ours-unfused"]["peak_bytes"]
            ratios["train_mem_ours_over_unfused"] = c["ours"]["train_peak_bytes"] / c["ours-unfused"]["train_peak_bytes"]
        out[cfg] = {"label": CONFIGS[cfg]["label"], "config": {k: v for k, v in CONFIGS[cfg].items() if k != "label"},
                    "contenders": contenders, "latency": latency, "ratios": ratios, "per_round": per_round,
                    "paired": {k: time_stats(v) if v else None for k, v in paired.items()}, "casts": casts}
    return out


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, key, only, hi, lo in TARGETS:
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
def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def markdown(report: dict[str, Any]) -> str:
    m, s = report["meta"], report["settings"]
    lines = [f"# lightning-lora benchmark ({m['device']})", "",
             f"- date: {m['date']}",
             f"- machine: {m['machine']}; CPU count {m['cpu_count']}; torch threads {s['threads']}",
             f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
             f"lightning {m['lightning']}",
             f"- model: {s['model']}; batch {s['batch']} x seq {s['seq']} random tokens (seed {s['seed']}); "
             f"AdamW lr 1e-4; {s['warmup']} warm-up + {s['steps']} timed steps per run "
             f"({s.get('paired_steps', s['steps'])} per model in a paired run); {s['rounds']} round(s), "
             "contenders alternating round-robin, one subprocess per measurement",
             f"- memory: {m['memory_method']}",
             f"- inference latency: forward of batch {s['batch']} x seq {s['seq']} under `inference_mode`, "
             f"{s['latency_reps']} reps per round, base and the other model alternating forward by forward",
             ""]
    for cfg, res in report["results"].items():
        lines += [f"## {res['label']}", "",
                  "| contender | step time median | IQR | min..max | peak memory | trainable params | checkpoint |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in res["contenders"].items():
            t = row["time"]
            lines.append(f"| {name} | {t['median_s'] * 1e3:,.1f} ms | {t['q1_s'] * 1e3:,.1f}..{t['q3_s'] * 1e3:,.1f} | "
                         f"{t['min_s'] * 1e3:,.1f}..{t['max_s'] * 1e3:,.1f} | {_mb(row['peak_bytes'])} | "
                         f"{row['trainable_params']:,} | {_size(row['checkpoint_bytes'])} |")
        lat = res["latency"]
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
            for name, c in casts.items():
                lines.append(f"| {name} | {c['adapted_layers']} | {c['forward']} | {c['backward']} | "
                             f"{_size(c['bytes'])} | {c['base_param_casts']} | {_size(c['saved_activation_bytes'])} |")
        pr = res.get("per_round", {})
        if pr:
            lines += ["", "step time ratio by round (separate processes, each round's runs back to back): "
                      + "; ".join(f"{k} " + ", ".join(f"{v:.3f}" for v in vs) for k, vs in pr.items())]
        if res.get("paired", {}).get("ours_over_peft"):
            lines += ["", "paired (floor, ours, PEFT in one process, one step each in turn): per-step ratio median "
                      "(IQR, n): " + "; ".join(
                          f"{k} {v['median_s']:.3f} ({v['q1_s']:.3f}..{v['q3_s']:.3f}, {v['n']})"
                          for k, v in res["paired"].items())]
        r = res["ratios"]
        lines += ["", "| ratio | value |", "| --- | ---: |"]
        for key in ("time_ours_over_peft_paired", "time_ours_over_floor_paired",
                    "time_ours_over_peft", "time_ours_over_floor", "time_trainer_over_ours", "time_full_over_ours",
                    "mem_ours_over_peft", "mem_ours_over_floor", "train_mem_ours_over_peft",
                    "latency_unmerged_over_base", "latency_merged_over_base", "ckpt_ours_over_peft",
                    "ckpt_over_budget", "time_ours_over_unfused", "mem_ours_over_unfused",
                    "train_mem_ours_over_unfused", "casts_ours_over_peft", "bf16_activations_ours_over_peft"):
            if key in r:
                lines.append(f"| {key} | {r[key]:.3f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | config | value | bound | met |", "| --- | --- | ---: | ---: | --- |"]
    for t in report["targets"]:
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        lines.append(f"| {t['target']} | {t['config']} | {value} | {t['bound']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    if any("ours-unfused" in res["contenders"] for res in report["results"].values()):
        lines += ["", "`ours-unfused` (ablation): ours with the adapter path through plain autograd "
                  "(`nn.Dropout` + the `lora_A`/`lora_B` modules), i.e. without the fused paths of `layers.py`."]
    lines += ["", "`train_mem_*` is the peak minus the memory right after the model was built/injected "
              "(the training-only share); `peak memory` includes the model weights."]
    if report["settings"]["quick"]:
        lines += ["", "**--quick run**: tiny model, few steps; the numbers only check that the benchmark works."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("time_ours_over_peft_paired", "time ours/PEFT"), ("time_ours_over_floor_paired", "time ours/floor"),
            ("mem_ours_over_peft", "memory ours/PEFT"), ("mem_ours_over_floor", "memory ours/floor"),
            ("latency_merged_over_base", "merged latency/base"), ("ckpt_ours_over_peft", "checkpoint ours/PEFT")]
    cfgs = list(report["results"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(cfgs)
    for i, cfg in enumerate(cfgs):
        vals = [report["results"][cfg]["ratios"][k] for k, _ in keys]
        xs = [j + (i - (len(cfgs) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, vals, width, label=report["results"][cfg]["label"])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)), [label for _, label in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ratio (lower is better; 1 = parity)")
    ax.set_title(f"lightning-lora vs PEFT / floor, {report['settings']['model']} on {report['meta']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def meta(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

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
        import torch

        cpu += f"; GPU {torch.cuda.get_device_name(0)}"
    mem = ("CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the model was built"
           if device == "cuda" else
           "CPU: peak RSS of the measurement's subprocess (resource.getrusage ru_maxrss) minus its peak RSS "
           "before the model was built; includes model weights, gradients, optimizer state, activations and "
           "allocator slack")
    return {"device": device, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.system()} {platform.release()}, {cpu}", "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
            "peft": version("peft"), "lightning": version("lightning"), "memory_method": mem}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="smollm2-135m-instruct (default), tiny-llama, or a local path")
    p.add_argument("--quick", action="store_true", help="tiny-llama, few steps, one round (a smoke test)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPU count)")
    p.add_argument("--latency-reps", type=int, default=None)
    p.add_argument("--paired-steps", type=int, default=None, help="timed steps per model in a paired run")
    p.add_argument("--ablation", action="store_true",
                   help="also run 'ours-unfused' (plain autograd through nn.Dropout) on the dropout config")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    args = p.parse_args(argv)

    quick = args.quick
    settings = {
        "model": args.model or ("tiny-llama" if quick else "smollm2-135m-instruct"),
        "rounds": args.rounds or (1 if quick else 3),
        "steps": args.steps or 3,
        "warmup": args.warmup if args.warmup is not None else 1,
        "batch": args.batch or (2 if quick else 4),
        "seq": args.seq or (16 if quick else 256),
        "threads": args.threads or min(os.cpu_count() or 1, 8),
        "latency_reps": args.latency_reps or (3 if quick else 4),
        "casts_seq": 8 if quick else 256,
        "paired_steps": args.paired_steps or (2 if quick else 6),
        "seed": 0,
        "quick": quick,
        "ablation": args.ablation,
    }
    configs = list(CONFIGS)
    raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rnd in range(settings["rounds"]):
        for contender, cfg in jobs_for_round(configs, args.ablation, first=rnd == 0):
            spec = {**settings, "contender": contender, "config_name": cfg, "config": CONFIGS[cfg],
                    "device": args.device}
            if contender == "paired":
                spec["steps"] = settings["paired_steps"]
            print(f"[round {rnd + 1}/{settings['rounds']}] {contender} / {cfg} ...", file=sys.stderr, flush=True)
            raw.setdefault((contender, cfg), []).append(run_job(spec, args.timeout))

    results = summarise(raw, configs)
    report = {"meta": meta(args.device), "settings": settings, "results": results}
    report["targets"] = check_targets(results)
    report["raw"] = [{"contender": k[0], "config": k[1], "runs": [{kk: vv for kk, vv in r.items() if kk != "spec"}
                                                                    for r in v]} for k, v in raw.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md_text = markdown(report)
    (out / f"{args.device}.md").write_text(md_text)
    (out / f"{args.device}.json").write_text(json.dumps(report, indent=1))
    plot(report, out / f"{args.device}.png")
    print(md_text)
    return report


if __name__ == "__main__":
    main()
