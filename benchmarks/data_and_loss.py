"""Packed vs padded batches, and the loss's memory: chunked cross-entropy vs transformers' loss.

    python benchmarks/data_and_loss.py [--device cpu|cuda] [--out DIR]   # CPU defaults (a few minutes)
    python benchmarks/data_and_loss.py --preset gpu-8b                   # the GPU recipe (Llama-3-8B shape)
    python benchmarks/data_and_loss.py --dry-run                         # every job at a tiny shape (seconds)

Jobs (each in its own subprocess, so that its memory peak is its own):

- `packing`: an Alpaca-like length mix (lognormal token counts, median 160, clipped to `max_length`; the
  first 40% of each example is its prompt, without loss), trained with LoRA (r=8 on every linear layer) for
  the same steps in one process, padded and packed batches alternating (`InstructionDataModule`'s two
  batchings: `PadCollator` over shuffled examples, `pack_examples` + `PackedCollator`). Reported: the fill
  (share of the computed token slots that hold an example token) of each, and useful (example) tokens per
  second, packed / padded side by side.
- `loss-memory`: one training step of a model with Llama-3's 128,256-token vocabulary at `seq` tokens, three
  ways in separate processes: no loss head (the decoder's output squared: the baseline), transformers' own
  loss (`model(..., labels=...)`, what `CausalLM` computed before) and ours (`causal_lm_loss`, chunked). The
  peak is `torch.cuda.max_memory_allocated` on CUDA, the profiler's live-tensor peak on CPU; what the loss
  adds is the peak minus the baseline's. Reported: both additions and ours / transformers'.

Results: `<out>/<name>.json` and `<out>/<name>.md` (`<name>`: `<device>-data-loss`), one JSON line per job on
stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIB = 1024**2

DEFAULTS: dict[str, Any] = {
    "device": "cpu", "dtype": "fp32",
    # packing: a small Llama on CPU
    "packing_model": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "vocab_size": 32000},
    "examples": 96, "max_length": 512, "padded_batch": 8, "packed_rows": 2, "steps": 6, "seed": 0,
    # loss memory: Llama-3's vocabulary on a one-layer tiny model
    "loss_model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 128256},
    "seq": 2048, "timeout": 900.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3-8B shape in bf16 with fp32 adapters, as run.py's gpu-8b preset; packed rows of 2048
    "gpu-8b": {"device": "cuda", "dtype": "bf16", "packing_model": "llama-3-8b", "examples": 256,
               "max_length": 2048, "padded_batch": 8, "packed_rows": 2, "steps": 8, "loss_model": "llama-3-8b",
               "seq": 2048, "timeout": 300.0},
}
DRY_RUN: dict[str, Any] = {
    "device": "cpu", "dtype": "fp32",
    "packing_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "num_key_value_heads": 1, "vocab_size": 256},
    "examples": 24, "max_length": 128, "padded_batch": 4, "packed_rows": 1, "steps": 2,
    "loss_model": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "vocab_size": 8192},
    "seq": 256, "timeout": 300.0,
}
#: targets: (what, result key, upper bound, lower bound, devices). Useful tokens/s is a target on CUDA only:
#: there flash-attention's variable-length path skips the blocks between examples, while SDPA on a CPU computes a
#: packed row's whole (max_length x max_length) masked attention
TARGETS = [
    ("packed fill", "packing.packed_fill", None, 0.9, ("cpu", "cuda")),
    ("packed fill / padded fill", "packing.fill_ratio", None, 1.5, ("cpu", "cuda")),
    ("useful tokens/s packed / padded", "packing.throughput_ratio", None, 1.0, ("cuda",)),
    ("loss memory ours / transformers'", "loss-memory.ratio", 0.5, None, ("cpu", "cuda")),
]


# ---------------------------------------------------------------------- models and data
def build(model: Any, device: str, dtype: str) -> Any:
    """A random-weight causal LM: a dict of LlamaConfig fields, or a config shipped in `model_configs/`."""
    import torch
    from _worker import DTYPES, random_model, shipped_config
    from transformers import AutoConfig, LlamaConfig

    if isinstance(model, dict):
        config = LlamaConfig(max_position_embeddings=8192, pad_token_id=0, **model)
    else:
        config = AutoConfig.from_pretrained(str(shipped_config(model)))
    m = random_model(config, device, DTYPES[dtype])
    m.config.use_cache = False
    torch.manual_seed(0)
    return m.train()


def alpaca_like(n: int, max_length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """`n` examples whose lengths follow an Alpaca-like mix: lognormal, median 160 tokens, sigma 0.75, clipped
    to [24, max_length]; the first 40% is the prompt (labels -100).

    Example:
        >>> ex = alpaca_like(200, 512, 1000, 0)
        >>> lengths = sorted(len(e["input_ids"]) for e in ex)
        >>> 24 <= lengths[0] and lengths[-1] <= 512 and 120 < lengths[100] < 200
        True
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(max_length, max(24, round(rng.lognormvariate(math.log(160), 0.75)))))
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = int(length * 0.4)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def padded_batches(examples: list[dict], batch: int, seed: int) -> list[dict]:
    """`InstructionDataModule`'s batching: shuffled, `batch` examples padded to the longest."""
    from lightning_lora.data.collate import PadCollator

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    collate = PadCollator(0)
    return [collate([examples[i] for i in order[k:k + batch]]) for k in range(0, len(order), batch)
            if len(order[k:k + batch]) == batch] or [collate(examples)]


def packed_batches(examples: list[dict], rows: int, max_length: int, seed: int) -> list[dict]:
    """`InstructionDataModule(packing=True)`'s batching: packed rows, shuffled, `rows` per batch."""
    from lightning_lora.data.packing import PackedCollator, pack_examples

    packed = pack_examples(examples, max_length)
    random.Random(seed).shuffle(packed)
    collate = PackedCollator(0)
    return [collate(packed[k:k + rows]) for k in range(0, len(packed), rows)]


def useful_tokens(batch: dict) -> int:
    """Tokens of examples in a batch (not padding): the attention mask, or for a packed batch the positions
    whose id is not the pad id 0 (the examples here draw their ids from 1 up)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != 0).sum())


# ---------------------------------------------------------------------- jobs (in a subprocess)
def job_packing(s: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.loss import causal_lm_loss

    device = s["device"]
    model = build(s["packing_model"], device, s["dtype"])
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    examples = alpaca_like(s["examples"], s["max_length"], model.config.vocab_size, s["seed"])
    kinds = {"padded": padded_batches(examples, s["padded_batch"], s["seed"]),
             "packed": packed_batches(examples, s["packed_rows"], s["max_length"], s["seed"])}
    out: dict[str, Any] = {"examples": len(examples), "example_tokens": sum(len(e["input_ids"]) for e in examples)}
    for kind, batches in kinds.items():
        out[f"{kind}_batches"] = len(batches)
        out[f"{kind}_fill"] = round(sum(useful_tokens(b) for b in batches) / sum(b["input_ids"].numel()
                                                                                 for b in batches), 4)

    def step(batch: dict) -> None:
        b = {k: v.to(device) for k, v in batch.items()}
        total, n = causal_lm_loss(model, b["input_ids"], b["labels"], b.get("attention_mask"), b.get("position_ids"))
        (total / n.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for kind in kinds:                                   # warm-up: one step each
        step(kinds[kind][0])
    seconds = {"padded": 0.0, "packed": 0.0}
    tokens = {"padded": 0, "packed": 0}
    for i in range(s["steps"]):                          # alternate, so that drift hits both alike
        for kind in (("padded", "packed") if i % 2 == 0 else ("packed", "padded")):
            batch = kinds[kind][(i + 1) % len(kinds[kind])]
            sync()
            start = time.perf_counter()
            step(batch)
            sync()
            seconds[kind] += time.perf_counter() - start
            tokens[kind] += useful_tokens(batch)
    for kind in kinds:
        out[f"{kind}_tokens_per_s"] = round(tokens[kind] / seconds[kind], 1)
    out["fill_ratio"] = round(out["packed_fill"] / out["padded_fill"], 3)
    out["throughput_ratio"] = round(out["packed_tokens_per_s"] / out["padded_tokens_per_s"], 3)
    return out


def _cpu_step_peak(step: Any) -> int:
    """Live-tensor peak (bytes) of `step()` on CPU from the profiler's memory events, over what was live."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        running += nbytes
        peak = max(peak, running)
    return peak


def job_loss_memory(s: dict[str, Any], way: str) -> dict[str, Any]:
    """One training step's peak (over what was live before it) with the loss computed `way`."""
    import torch

    from lightning_lora import LoRAConfig, inject_lora
    from lightning_lora.loss import causal_lm_loss

    device = s["device"]
    model = build(s["loss_model"], device, s["dtype"])
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, s["seq"]), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : s["seq"] // 4] = -100                    # a prompt without loss

    def step() -> None:
        if way == "baseline":
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            hidden.float().pow(2).mean().backward()
        elif way == "transformers":
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        else:
            total, n = causal_lm_loss(model, ids, labels)
            (total / n).backward()
        model.zero_grad(set_to_none=True)

    step()                                               # warm-up (allocator caches, lazy inits)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _cpu_step_peak(step)
    return {"way": way, "step_peak_bytes": int(peak), "vocab": model.config.vocab_size, "seq": s["seq"]}


# ---------------------------------------------------------------------- driver
def run_child(job: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, json.dumps(settings), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"{job}: timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"{job}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
        return json.loads(out.read_text())


def lookup(results: dict[str, Any], key: str) -> Any:
    job, _, field = key.partition(".")
    return (results.get(job) or {}).get(field)


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    s = report["settings"]
    lines = [f"# Packed vs padded batches, loss memory ({report['device']})", "",
             f"- run: {report['date']}, {report['machine']}; torch {report['torch']}, transformers "
             f"{report['transformers']}" + ("; **--dry-run**" if s.get("dry_run") else ""),
             f"- command: `{report['command']}`", ""]
    p = r.get("packing") or {}
    if "error" in p or not p:
        lines += [f"packing: {p.get('error', 'not run')}", ""]
    else:
        lines += [f"## Packing ({p['examples']} Alpaca-like examples, {p['example_tokens']} tokens, max_length "
                  f"{s['max_length']}; LoRA r=8 all-linear; {s['steps']} steps each, alternating)", "",
                  "| batching | batches | fill | useful tokens/s |", "| --- | ---: | ---: | ---: |",
                  f"| padded ({s['padded_batch']} examples) | {p['padded_batches']} | {p['padded_fill']:.3f} | "
                  f"{p['padded_tokens_per_s']:.1f} |",
                  f"| packed ({s['packed_rows']} rows) | {p['packed_batches']} | {p['packed_fill']:.3f} | "
                  f"{p['packed_tokens_per_s']:.1f} |",
                  f"| packed / padded | | {p['fill_ratio']:.2f}x | {p['throughput_ratio']:.2f}x |", ""]
    m = r.get("loss-memory") or {}
    if "error" in m or not m:
        lines += [f"loss memory: {m.get('error', 'not run')}", ""]
    else:
        lines += [f"## Loss memory (vocab {m['vocab']}, {m['seq']} tokens, one step)", "",
                  "| loss | step peak (MiB) | added by the loss (MiB) |", "| --- | ---: | ---: |",
                  f"| none (baseline) | {m['baseline_bytes'] / MIB:.1f} | |",
                  f"| transformers' | {m['transformers_bytes'] / MIB:.1f} | {m['transformers_added'] / MIB:.1f} |",
                  f"| ours (chunked) | {m['ours_bytes'] / MIB:.1f} | {m['ours_added'] / MIB:.1f} |",
                  f"| ours / transformers' (added) | | {m['ratio']:.3f} |", ""]
    lines += ["## Targets", "", "| target | value | bound | met |", "| --- | ---: | ---: | --- |"]
    for what, key, upper, lower, devices in TARGETS:
        if report["device"] not in devices:
            continue
        value = lookup(r, key)
        bound = f"<= {upper}" if upper is not None else f">= {lower}"
        met = value is not None and (upper is None or value <= upper) and (lower is None or value >= lower)
        lines.append(f"| {what} | {value if value is not None else '-'} | {bound} | {'yes' if met else 'NO'} |")
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        job, settings, out = argv[1], json.loads(argv[2]), Path(argv[3])
        result = job_packing(settings) if job == "packing" else job_loss_memory(settings, job.split(":", 1)[1])
        out.write_text(json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--dry-run", action="store_true", help="every job on CPU at a tiny shape")
    ap.add_argument("--jobs", default="packing,loss-memory")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    settings = dict(DEFAULTS)
    if args.preset:
        settings.update(PRESETS[args.preset])
    if args.dry_run:
        settings.update(DRY_RUN, dry_run=True)
    if args.device:
        settings["device"] = args.device
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = sorted(set(jobs) - {"packing", "loss-memory"})
    if unknown:
        raise SystemExit(f"--jobs: unknown job(s) {', '.join(unknown)}; expected packing, loss-memory")
    import torch
    import transformers

    results: dict[str, Any] = {}
    errors: list[str] = []
    if "packing" in jobs:
        res = run_child("packing", settings, settings["timeout"])
        results["packing"] = res
        print(json.dumps({"job": "packing", **res}), flush=True)
    if "loss-memory" in jobs:
        ways = {w: run_child(f"loss:{w}", settings, settings["timeout"]) for w in ("baseline", "transformers", "ours")}
        print(json.dumps({"job": "loss-memory", **ways}), flush=True)
        bad = [w["error"] for w in ways.values() if "error" in w]
        if bad:
            results["loss-memory"] = {"error": "; ".join(bad)}
        else:
            base = ways["baseline"]["step_peak_bytes"]
            t_add = ways["transformers"]["step_peak_bytes"] - base
            o_add = ways["ours"]["step_peak_bytes"] - base
            results["loss-memory"] = {"vocab": ways["ours"]["vocab"], "seq": ways["ours"]["seq"],
                                      "baseline_bytes": base, "transformers_bytes": base + t_add,
                                      "ours_bytes": base + o_add, "transformers_added": t_add, "ours_added": o_add,
                                      "ratio": round(o_add / t_add, 4) if t_add > 0 else None}
    errors = [v["error"] for v in results.values() if isinstance(v, dict) and "error" in v]
    device = settings["device"]
    report = {"device": device, "settings": settings, "results": results, "errors": errors,
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
              + (f", {torch.cuda.get_device_name()}" if device == "cuda" and torch.cuda.is_available() else ""),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": "python benchmarks/data_and_loss.py " + " ".join(argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{device}-data-loss"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
