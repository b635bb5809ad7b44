"""`benchmarks/run.py --quick` produces well-formed output (structure only, never timings), and an
injected model compiles without graph breaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["floor", "ours", "ours-trainer", "peft", "full"]
CONFIGS = ["qv-r8", "all-r16-do"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.md").write_text(proc.stdout)
    return out


def test_quick_run_writes_all_files(quick_run):
    for name in ("cpu.md", "cpu.json", "cpu.png"):
        assert (quick_run / name).stat().st_size > 0, name
    assert (quick_run / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_json_structure(quick_run):
    report = json.loads((quick_run / "cpu.json").read_text())
    assert {"meta", "settings", "results", "targets", "raw"} <= set(report)
    for key in ("device", "date", "machine", "cpu_count", "torch", "transformers", "peft", "memory_method"):
        assert key in report["meta"], key
    assert report["settings"]["quick"] is True and report["settings"]["model"] == "tiny-llama"
    assert list(report["results"]) == CONFIGS
    for cfg, res in report["results"].items():
        assert list(res["contenders"]) == CONTENDERS
        for name, row in res["contenders"].items():
            assert {"median_s", "q1_s", "q3_s", "min_s", "max_s", "n"} <= set(row["time"])
            assert row["time"]["n"] >= 1 and row["time"]["median_s"] > 0
            assert isinstance(row["peak_bytes"], int)
            assert row["trainable_params"] == (0 if name == "floor" else row["trainable_params"])
            assert (row["checkpoint_bytes"] is None) == (name == "floor")
        c = res["contenders"]
        assert c["ours"]["trainable_params"] == c["peft"]["trainable_params"] == c["ours-trainer"]["trainable_params"]
        assert c["full"]["trainable_params"] > c["ours"]["trainable_params"] > 0
        assert {"base", "unmerged", "merged", "merged_over_base", "unmerged_over_base"} <= set(res["latency"])
        for key in ("time_ours_over_peft", "time_ours_over_floor", "time_ours_over_peft_paired",
                    "time_ours_over_floor_paired", "mem_ours_over_peft", "mem_ours_over_floor",
                    "latency_merged_over_base", "ckpt_over_budget"):
            assert res["ratios"][key] > 0, key
        assert len(res["per_round"]["time_ours_over_peft"]) == report["settings"]["rounds"]
        assert res["paired"]["ours_over_peft"]["n"] == report["settings"]["rounds"] * report["settings"]["paired_steps"]
        casts = res["casts"]
        assert list(casts) == ["floor", "ours", "peft"]
        assert casts["ours"]["adapted_layers"] == casts["peft"]["adapted_layers"] == (4 if cfg == "qv-r8" else 14)
        assert casts["ours"]["adapter_dtypes"] == casts["peft"]["adapter_dtypes"] == ["torch.float32"]
        # counts, not timings: the base path of a bf16 model runs without casting a base parameter; the
        # adapters cast as often as PEFT's forward, and backward at most once more per adapted layer
        # (x is cast again for A's gradient instead of being kept as an fp32 copy)
        assert casts["ours"]["base_param_casts"] == 0
        assert casts["floor"]["forward"] < casts["ours"]["forward"] == casts["peft"]["forward"]
        assert casts["ours"]["backward"] <= casts["peft"]["backward"] + casts["ours"]["adapted_layers"]
        # bytes saved for backward (a count, not a timing): fp32 adapters on a bf16 base keep the bf16
        # input, not an fp32 copy (plus, with dropout, a mask) per adapter as PEFT does
        act = {k: casts[k]["saved_activation_bytes"] for k in casts}
        assert act["floor"] < act["ours"] < act["peft"]
    assert {t["target"] for t in report["targets"]} >= {"step time ours/PEFT (paired)", "merged latency / base",
                                                         "bf16 base: casts reading a base parameter"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])


def test_quick_run_markdown_has_a_row_per_contender_and_config(quick_run):
    md = (quick_run / "cpu.md").read_text()
    assert md.strip() in (quick_run / "stdout.md").read_text()   # the table also goes to stdout
    sections = md.split("\n## ")[1:]
    labels = ["r=8, q_proj+v_proj, dropout 0", "r=16, all-linear, dropout 0.05"]
    for label in labels:
        section = next(s for s in sections if s.startswith(label))
        for name in CONTENDERS:
            assert f"\n| {name} | " in section, (label, name)
        for name in ("base", "unmerged", "merged"):
            assert f"\n| {name} | " in section, (label, name)
    assert "## Targets" in md
    for word in ("torch", "transformers", "peft", "CPU count"):
        assert word in md


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
