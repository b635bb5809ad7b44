"""`benchmarks/run.py` produces well-formed output (structure and counts, never timings): the CPU `--quick`
run, the GPU recipe (`--preset gpu-8b`) parsed and dry-run on CPU at a tiny shape, partial results when
measurements fail, merging re-run jobs into a report; and an injected model compiles without graph breaks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
CONTENDERS = ["floor", "ours", "ours-trainer", "peft", "full"]
CONFIGS = ["qv-r8", "all-r16-do"]
LAYERS = {"qv-r8": 4, "all-r16-do": 14}   # adapted layers of tiny-llama (2 decoder layers)
PRESET_JOBS = [("floor", "qv-r8"), ("ours", "qv-r8"), ("peft", "qv-r8"), ("floor", "all-r16-do"),
               ("ours", "all-r16-do"), ("peft", "all-r16-do"), ("paired", "qv-r8"), ("paired", "all-r16-do"),
               ("counts", "qv-r8"), ("counts", "all-r16-do"), ("compile", "qv-r8"), ("compile", "all-r16-do")]

sys.path.insert(0, str(ROOT / "benchmarks"))
import run as bench  # noqa: E402


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dry")
    proc = _run("--preset", "gpu-8b", "--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


# ---------------------------------------------------------------------- operator counts (any run)
def check_counts(res: dict, dtypes: list[str], gc: bool) -> dict:
    """The operator counts of one config: structure, arithmetic and the counts that do not depend on timing."""
    counts = res["counts"]
    assert counts["gradient_checkpointing"] is gc
    assert counts["optimizer"] == "AdamW(foreach=True)"
    assert list(counts["by_dtype"]) == dtypes
    for entry in counts["by_dtype"].values():
        rows = entry["contenders"]
        # on CPU the dropout config also counts ours with the CUDA (Philox) masks
        philox = ["ours-philox"] if res["config"]["dropout"] > 0 else []
        assert list(rows) == ["floor", "ours", "peft", *philox]
        assert [rows[n]["adapted_layers"] for n in rows] == [0, *[LAYERS[res_key(res)]] * (len(rows) - 1)]
        for row in rows.values():
            assert row["forward"] + row["backward"] + row["optimizer"] == row["total"]
            assert row["views"] > 0
        floor, ours, peft = rows["floor"], rows["ours"], rows["peft"]
        # the floor has no optimizer; ours and PEFT update the same tensors with the same foreach AdamW
        assert floor["optimizer"] == 0 and ours["optimizer"] == peft["optimizer"] > 0
        # every adapted layer adds operators to forward and backward
        assert ours["forward"] > floor["forward"] and peft["forward"] > floor["forward"]
        n = ours["adapted_layers"]
        assert ours["per_layer"] == pytest.approx((ours["total"] - floor["total"]) / n)
        assert ours["per_layer_fwd_bwd"] == pytest.approx(
            (ours["forward"] + ours["backward"] - floor["forward"] - floor["backward"]) / n)
        assert entry["ratios"]["ops_ours_over_peft"] == pytest.approx(ours["total"] / peft["total"])
        assert entry["ratios"]["ops_ours_over_floor"] == pytest.approx(ours["total"] / floor["total"])
        # the per-layer difference by operator adds up to the difference of the totals
        diff = entry["ours_minus_peft_per_layer"]
        assert sum(sum(d.values()) for d in diff.values()) * n == pytest.approx(ours["total"] - peft["total"])
    return counts


def res_key(res: dict) -> str:
    return "qv-r8" if res["config"]["target_modules"] == ["q_proj", "v_proj"] else "all-r16-do"


# ---------------------------------------------------------------------- --quick (CPU)
def test_quick_run_writes_all_files(quick_run):
    for name in ("cpu.md", "cpu.json", "cpu.png", "cpu.jsonl"):
        assert (quick_run / name).stat().st_size > 0, name
    assert (quick_run / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_json_structure(quick_run):
    report = json.loads((quick_run / "cpu.json").read_text())
    assert {"meta", "settings", "results", "targets", "raw", "errors", "complete"} <= set(report)
    assert report["errors"] == [] and report["complete"] is True
    for key in ("device", "date", "machine", "cpu_count", "torch", "transformers", "peft", "memory_method"):
        assert key in report["meta"], key
    s = report["settings"]
    assert s["quick"] is True and s["model"] == "tiny-llama" and s["dtype"] == "fp32" and s["adapter_dtype"] == "fp32"
    assert s["counts_dtypes"] == ["fp32", "bf16"]
    assert list(report["results"]) == CONFIGS
    for cfg, res in report["results"].items():
        assert res["gradient_checkpointing"] is False
        assert list(res["contenders"]) == CONTENDERS
        for name, row in res["contenders"].items():
            assert {"median_s", "q1_s", "q3_s", "min_s", "max_s", "n"} <= set(row["time"])
            assert row["time"]["n"] >= 1 and row["time"]["median_s"] > 0
            assert row["tokens_per_s"] == pytest.approx(s["batch"] * s["seq"] / row["time"]["median_s"])
            assert isinstance(row["peak_bytes"], int)
            assert row["steady_peak_bytes"] is None          # CUDA only
            # the profiler's tensor peak (CPU, first round) of the contenders the estimate is checked on
            assert (isinstance(row["tensor_peak_bytes"], int) and row["tensor_peak_bytes"] > 0) == (
                name in ("floor", "ours", "peft"))
            assert row["trainable_params"] == (0 if name == "floor" else row["trainable_params"])
            assert (row["checkpoint_bytes"] is None) == (name == "floor")
        c = res["contenders"]
        assert c["ours"]["trainable_params"] == c["peft"]["trainable_params"] == c["ours-trainer"]["trainable_params"]
        assert c["full"]["trainable_params"] > c["ours"]["trainable_params"] > 0
        est = c["ours"]["estimate"]
        assert est["precision"] == "32-true" and est["total_bytes"] > est["weights_bytes"] > 0
        assert res["ratios"]["estimate_over_measured"] == pytest.approx(est["total_bytes"] / c["ours"]["tensor_peak_bytes"])
        assert {"base", "unmerged", "merged", "merged_over_base", "unmerged_over_base"} <= set(res["latency"])
        for key in ("time_ours_over_peft", "time_ours_over_floor", "time_ours_over_peft_paired",
                    "time_ours_over_floor_paired", "mem_ours_over_peft", "mem_ours_over_floor",
                    "latency_merged_over_base", "ckpt_over_budget", "ops_ours_over_peft", "ops_ours_over_floor",
                    "ops_ours_over_peft_bf16", "ops_ours_over_floor_bf16"):
            assert res["ratios"][key] > 0, key
        assert len(res["per_round"]["time_ours_over_peft"]) == s["rounds"]
        assert res["paired"]["ours_over_peft"]["n"] == s["rounds"] * s["paired_steps"]
        casts = res["casts"]
        assert list(casts) == ["floor", "ours", "peft"]
        assert casts["ours"]["adapted_layers"] == casts["peft"]["adapted_layers"] == LAYERS[cfg]
        assert casts["ours"]["adapter_dtypes"] == casts["peft"]["adapter_dtypes"] == ["torch.float32"]
        # counts, not timings: the base path of a bf16 model runs without casting a base parameter; the
        # adapters cast as often as PEFT's forward, and backward at most once more per adapted layer
        # (x is cast again for A's gradient instead of being kept as an fp32 copy)
        assert casts["ours"]["base_param_casts"] == 0
        assert casts["floor"]["forward"] < casts["ours"]["forward"] == casts["peft"]["forward"]
        assert casts["ours"]["backward"] <= casts["peft"]["backward"] + casts["ours"]["adapted_layers"]
        # bytes saved for backward (a count, not a timing): fp32 adapters on a bf16 base keep the bf16
        # input, not an fp32 copy (plus, with dropout, a mask) per adapter as PEFT does (ours keeps bf16 copies
        # of A and B instead, r-wide: smaller than an input of more than r tokens)
        act = {k: casts[k]["saved_activation_bytes"] for k in casts}
        assert act["floor"] < act["ours"] < act["peft"]
        check_counts(res, ["fp32", "bf16"], gc=False)
    targets = {t["target"] for t in report["targets"]}
    assert targets >= {"step time ours/PEFT (paired)", "merged latency / base", "operators dispatched per step ours/PEFT",
                       "bf16 base: casts reading a base parameter"}
    assert "steady peak memory ours/PEFT" not in targets            # a CUDA target
    assert all(isinstance(t["met"], bool) for t in report["targets"])


def test_quick_run_operator_counts(quick_run):
    """Ours' operators per step, recorded for both configs (counts: the same on a busy machine)."""
    results = json.loads((quick_run / "cpu.json").read_text())["results"]
    counts = {cfg: res["counts"]["by_dtype"] for cfg, res in results.items()}
    # the frozen floor does not depend on the LoRA config
    for dtype in ("fp32", "bf16"):
        assert counts["qv-r8"][dtype]["contenders"]["floor"] == counts["all-r16-do"][dtype]["contenders"]["floor"]
    # fp32, q/v without dropout: one addmm adds the adapter output (PEFT: mm, mul, add), so ours dispatches
    # fewer operators than PEFT
    qv = counts["qv-r8"]["fp32"]["contenders"]
    assert qv["ours"]["forward"] < qv["peft"]["forward"] and qv["ours"]["total"] < qv["peft"]["total"]
    diff = counts["qv-r8"]["fp32"]["ours_minus_peft_per_layer"]["forward"]
    assert diff == {"aten.add": -1.0, "aten.addmm": 1.0, "aten.mm": -1.0, "aten.mul": -1.0}
    # a bf16 base casts in the adapters (ours: A and B down in forward, their gradients up in backward)
    for cfg in CONFIGS:
        bf16 = counts[cfg]["bf16"]["contenders"]
        assert bf16["ours"]["per_layer_fwd_bwd"] > counts[cfg]["fp32"]["contenders"]["ours"]["per_layer_fwd_bwd"]
    # the Philox (CUDA) masks: per adapted layer one native_dropout in forward where the lane masks dispatch
    # random_, lt and where, and in backward native_dropout + native_dropout_backward for those + masked_fill_
    do = counts["all-r16-do"]["fp32"]["contenders"]
    assert do["ours"]["per_layer_fwd_bwd"] - do["ours-philox"]["per_layer_fwd_bwd"] == pytest.approx(4.0)


def test_quick_run_markdown_and_stdout(quick_run):
    md = (quick_run / "cpu.md").read_text()
    stdout = (quick_run / "stdout.txt").read_text()
    sections = md.split("\n## ")[1:]
    assert sections[0].startswith("Summary")
    labels = ["r=8, q_proj+v_proj, dropout 0", "r=16, all-linear, dropout 0.05"]
    for label in labels:
        section = next(s for s in sections if s.startswith(label))
        for name in CONTENDERS:
            assert f"\n| {name} | " in section, (label, name)
        for name in ("base", "unmerged", "merged"):
            assert f"\n| {name} | " in section, (label, name)
        for dtype in ("fp32", "bf16"):
            for name in ("floor", "ours", "peft"):
                assert f"\n| {dtype} (adapters fp32) | {name} | " in section, (label, dtype, name)
        assert "ops ours/PEFT" in section and "ours - PEFT per adapted layer" in section
        summary_row = next(line for line in sections[0].splitlines() if line.startswith(f"| {label} |"))
        assert summary_row in stdout                      # the summary table also goes to stdout
    assert "## Targets" in md and "## Errors" not in md
    for word in ("torch", "transformers", "peft", "CPU count"):
        assert word in md
    # one JSON line per measurement, on stdout and (with the full result) in cpu.jsonl
    lines = _json_lines(stdout)
    jobs = bench.jobs_for_round(CONFIGS, first=True, settings=bench.resolve_settings(bench.parser().parse_args(["--quick"])))
    assert [(x["job"], x["config"]) for x in lines] == jobs
    assert all(x["ok"] for x in lines)
    stored = [json.loads(line) for line in (quick_run / "cpu.jsonl").read_text().splitlines()]
    assert [(x["job"], x["config"]) for x in stored] == jobs and all("result" in x for x in stored)
    counts_line = next(x for x in lines if x["job"] == "counts" and x["config"] == "qv-r8")
    assert counts_line["adapted_layers"] == 4 and set(counts_line["ops_per_step"]) == {"fp32", "bf16"}


# ---------------------------------------------------------------------- the GPU recipe
def test_gpu_preset_settings():
    s = bench.resolve_settings(bench.parser().parse_args(["--preset", "gpu-8b"]))
    assert {k: s[k] for k in ("device", "model", "dtype", "adapter_dtype", "batch", "seq", "warmup", "steps",
                              "paired_steps", "rounds", "counts_batch", "counts_seq", "counts_dtypes", "preset")} == {
        "device": "cuda", "model": "llama-3-8b", "dtype": "bf16", "adapter_dtype": "fp32", "batch": 1, "seq": 2048,
        "warmup": 2, "steps": 8, "paired_steps": 8, "rounds": 1, "counts_batch": 1, "counts_seq": 2048,
        "counts_dtypes": ["bf16"], "preset": "gpu-8b"}
    # no job starts after the deadline and the last one is cut to what is left: done in under 8 minutes
    assert s["deadline"] <= 7 * 60 and s["timeout"] <= s["deadline"]
    assert [bench.gc_of(s, c) for c in CONFIGS] == [True, False]
    assert [bench.label_of(s, c) for c in CONFIGS] == ["r=8, q_proj+v_proj, dropout 0, gradient checkpointing",
                                                      "r=16, all-linear, dropout 0.05"]
    # one floor per checkpointing setting, one process per contender, a paired run and the counts per config
    assert bench.jobs_for_round(CONFIGS, first=True, settings=s) == PRESET_JOBS
    # flags override the preset
    s = bench.resolve_settings(bench.parser().parse_args(
        ["--preset", "gpu-8b", "--seq", "1024", "--no-gradient-checkpointing", "--model", "llama-3.2-1b"]))
    assert (s["seq"], s["model"], s["gradient_checkpointing"]) == (1024, "llama-3.2-1b", False)
    assert [j for j in bench.jobs_for_round(CONFIGS, first=True, settings=s) if j[0] == "floor"] == [("floor", "qv-r8")]
    s = bench.resolve_settings(bench.parser().parse_args(["--preset", "gpu-8b", "--dry-run"]))
    assert (s["device"], s["model"], s["dtype"], s["seq"], s["dry_run"]) == ("cpu", "tiny-llama", "bf16", 32, True)
    with pytest.raises(SystemExit):
        bench.resolve_settings(bench.parser().parse_args(["--jobs", "ours,bogus"]))
    with pytest.raises(SystemExit, match="--configs: unknown config.s. qv-r9; expected some of qv-r8, all-r16-do"):
        bench.selected_configs("qv-r9,all-r16-do")
    # DoRA's contenders are opt-in (each adds a process per config and round)
    assert {"ours-dora", "peft-dora"} <= set(bench.JOB_KINDS) and {"ours-dora", "peft-dora"}.isdisjoint(bench.DEFAULTS["jobs"])


def test_gpu_preset_dry_run(dry_run):
    report = json.loads((dry_run / "cpu.json").read_text())
    assert report["errors"] == [] and report["complete"] is True
    s = report["settings"]
    assert (s["preset"], s["dry_run"], s["dtype"], s["adapter_dtype"], s["batch"], s["seq"]) == (
        "gpu-8b", True, "bf16", "fp32", 1, 32)
    assert [(r["contender"], r["config"]) for r in report["raw"]] == PRESET_JOBS
    results = report["results"]
    assert [results[c]["gradient_checkpointing"] for c in CONFIGS] == [True, False]
    for cfg, res in results.items():
        assert list(res["contenders"]) == ["floor", "ours", "peft"]
        assert res["contenders"]["ours"]["estimate"]["precision"] == "bf16-true"
        assert res["ratios"]["time_ours_over_peft_paired"] > 0 and res["ratios"]["estimate_over_measured"] > 0
        check_counts(res, ["bf16"], gc=cfg == "qv-r8")
        compiled = res["compile"]
        assert compiled["backend"] == "aot_eager" and list(compiled["contenders"]) == ["ours", "peft"]
        for row in compiled["contenders"].values():
            # one graph for every decoder layer, none for a batch of another length, no graph break
            assert (row["graphs"], row["recompiles"], row["graph_breaks"], row["new_graphs_other_length"]) == (1, 0, 0, 0)
            assert row["eager_s"] > 0 and row["compiled_s"] > 0
        assert res["ratios"]["time_compiled_over_eager"] > 0 and res["ratios"]["time_ours_over_peft_compiled"] > 0
    # checkpointing recomputes the forward inside backward: the counts show it
    floor_gc = results["qv-r8"]["counts"]["by_dtype"]["bf16"]["contenders"]["floor"]
    floor = results["all-r16-do"]["counts"]["by_dtype"]["bf16"]["contenders"]["floor"]
    assert floor_gc["forward"] == floor["forward"] and floor_gc["backward"] > floor["backward"]
    md = (dry_run / "cpu.md").read_text()
    assert "- preset: `gpu-8b`" in md and "**--dry-run**" in md
    # the packed + chunked row (benchmarks/data_and_loss.py, at the dry run's tiny shape)
    data = report["data_loss"]
    assert data["errors"] == [] and data["settings"]["dry_run"] is True
    packing, loss = data["results"]["packing"], data["results"]["loss-memory"]
    assert packing["packed_fill"] >= 0.9 and packing["padded_fill"] < 1 and packing["throughput_ratio"] > 0
    assert packing["examples"] == 24 and packing["packed_batches"] < packing["examples"]
    assert loss["vocab"] == 8192 and loss["transformers_added"] > 0 and loss["ours_added"] > 0
    assert "## Packed vs padded batches, loss memory" in md and "| packed / padded |" in md
    assert "| loss memory ours / transformers' |" in md
    summary = md.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    for label in ("r=8, q_proj+v_proj, dropout 0, gradient checkpointing", "r=16, all-linear, dropout 0.05"):
        assert f"| {label} | " in summary
    stdout = (dry_run / "stdout.txt").read_text()
    assert [(x["job"], x["config"]) for x in _json_lines(stdout)] == PRESET_JOBS
    assert "summary" in stdout and "| config | floor | ours | PEFT |" in stdout


def test_merge_replaces_only_the_jobs_run_again(dry_run, tmp_path):
    out = tmp_path / "merged"
    shutil.copytree(dry_run, out)
    before = json.loads((out / "cpu.json").read_text())
    proc = _run("--preset", "gpu-8b", "--dry-run", "--out", str(out), "--jobs", "counts", "--merge",
                "--counts-seq", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((out / "cpu.json").read_text())
    assert [(x["job"], x["config"]) for x in _json_lines(proc.stdout)] == [("counts", c) for c in CONFIGS]
    assert after["settings"] == before["settings"]
    assert [u["jobs"] for u in after["meta"]["updates"]] == [["counts"]]
    assert after["meta"]["updates"][0]["settings"]["counts_seq"] == 16
    for cfg in CONFIGS:
        assert after["results"][cfg]["contenders"] == before["results"][cfg]["contenders"]   # timed runs kept
        assert after["results"][cfg]["counts"]["seq"] == 16 and before["results"][cfg]["counts"]["seq"] == 32
    assert "re-ran counts" in (out / "cpu.md").read_text()


# ---------------------------------------------------------------------- partial results
def test_deadline_writes_what_finished(tmp_path):
    proc = _run("--preset", "gpu-8b", "--dry-run", "--out", str(tmp_path), "--deadline", "0", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["complete"] is False and report["raw"] == []
    assert "data_loss" not in report and "data_and_loss.py: skipped (deadline reached)" in proc.stderr
    assert [(e["job"], e["config"], e["error"]) for e in report["errors"]] == [
        (j, c, "skipped: deadline reached") for j, c in PRESET_JOBS]
    md = (tmp_path / "cpu.md").read_text()
    assert "## Errors" in md and "**partial**" in md


def test_a_failing_measurement_is_recorded_and_the_run_goes_on(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = _run("--dry-run", "--out", str(tmp_path), "--model", str(missing), "--jobs", "ours", "--rounds", "1",
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _json_lines(proc.stdout)
    assert [(x["job"], x["config"], x["ok"]) for x in lines] == [("ours", "qv-r8", False), ("ours", "all-r16-do", False)]
    assert all("no-such-model" in x["error"] for x in lines)     # the worker's own error, in one line
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert [e["job"] for e in report["errors"]] == ["ours", "ours"] and report["raw"] == []
    assert report["complete"] is True
    assert "## Errors" in (tmp_path / "cpu.md").read_text()
    assert len((tmp_path / "cpu.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------------- torch.compile
def test_injected_model_has_no_graph_breaks_under_dynamo():
    from lightning_lora import LoRAConfig, inject_lora

    model = make_tiny_llama().train()
    inject_lora(model, LoRAConfig(r=4, target_modules="all-linear", dropout=0.1))
    ids = torch.randint(1, 128, (2, 8))
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


# ---------------------------------------------------------------------- DoRA next to LoRA (issue 17)
def test_dora_contenders_time_and_memory_next_to_lora(tmp_path):
    proc = _run("--quick", "--out", str(tmp_path), "--jobs", "ours,ours-dora,peft-dora", "--configs", "all-r16-do",
                "--steps", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["errors"] == [] and list(report["results"]) == ["all-r16-do"]
    for cfg in ["all-r16-do"]:
        res = report["results"][cfg]
        c, r = res["contenders"], res["ratios"]
        assert set(c) == {"ours", "ours-dora", "peft-dora"}
        # DoRA trains the magnitude vectors on top of the same A and B: out_features more per adapted layer
        assert c["ours-dora"]["trainable_params"] == c["peft-dora"]["trainable_params"] > c["ours"]["trainable_params"]
        assert r["time_dora_over_lora_ours"] == pytest.approx(c["ours-dora"]["time"]["median_s"]
                                                              / c["ours"]["time"]["median_s"])
        assert r["mem_dora_ours_over_peft"] == pytest.approx(c["ours-dora"]["peak_bytes"] / c["peft-dora"]["peak_bytes"])
    md = (tmp_path / "cpu.md").read_text()
    assert "| time_dora_over_lora_ours |" in md and "| mem_dora_ours_over_peft |" in md
