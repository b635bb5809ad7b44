"""The scripts in `examples/` run (as a user runs them: subprocesses) and write what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUESTION = "Who founded Brindlewhisk Robotics?"


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_path):
    """`train_with_callback.py --max-steps 2` once."""
    workdir = tmp_path_factory.mktemp("example")
    proc = run("train_with_callback.py", "--max-steps", "2", "--batch-size", "2", "--output-dir", "out",
               "--question", QUESTION, cwd=workdir)
    return workdir, proc


@pytest.mark.integration
def test_train_with_callback_writes_adapter_and_merged_model(trained):
    workdir, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "out"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert cfg["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "merged" / "tokenizer_config.json").is_file()
    assert list((out / "logs").glob("version_0/events.out.tfevents.*"))
    lines = proc.stdout.splitlines()
    assert f"Q: {QUESTION}" in lines
    answer = [line for line in lines if line.startswith("A: ")]
    assert len(answer) == 1 and len(answer[0]) > 3
    assert f"merged model: {Path('out') / 'merged'}" in lines


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_load_and_generate(trained, kind):
    workdir, proc = trained
    assert proc.returncode == 0
    result = run("load_and_generate.py", f"--{kind}", str(workdir / "out" / kind), "--max-new-tokens", "8",
                 QUESTION, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"Q: {QUESTION}" and lines[1].startswith("A: ") and len(lines[1]) > 3
    if kind == "merged":
        merged_answer = lines[1]
        adapter = run("load_and_generate.py", "--adapter", str(workdir / "out" / "adapter"), "--max-new-tokens", "8",
                      QUESTION, cwd=workdir)
        # the merged model computes what base + adapter computes: the same greedy answer
        assert adapter.stdout.splitlines()[1] == merged_answer


def test_load_and_generate_bad_directory_is_one_line(tmp_path):
    result = run("load_and_generate.py", "--adapter", str(tmp_path / "missing"), "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no adapter_config.json there" in result.stderr.strip().splitlines()[-1]


def test_everyday_workflows_example(tmp_path):
    proc = run("everyday_workflows.py", "--workdir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line[:2] in ("1.", "2.", "3.", "4.")]
    assert len(lines) == 4, proc.stdout
    import re

    best = re.search(r"validate\(ckpt_path='best'\) (\S+) == best_model_score (\S+)$", lines[0])
    assert best and best.group(1) == best.group(2), lines[0]
    assert lines[1].endswith("trained fully and saved: ['score']; 1,984 trainable parameters")
    assert lines[2] == ("3. added tokens: the adapter carries ['model.embed_tokens.weight', 'lm_head.weight']; "
                        "reloaded logits differ by 0.0")
    assert lines[3] == "4. frozen teacher: adapted 4 student layers, 0 teacher layers; the optimizer holds 8 tensors"


@pytest.mark.integration
def test_several_adapters_trains_two_in_one_run_and_serves_both_in_one_batch(tmp_path, smollm2_path):
    """Two adapters trained together with mixed_batch answer each its own way; saved in PEFT's layout, loaded by
    name, one generate call serves both and the base; the merged model answers as its adapter did."""
    proc = run("several_adapters.py", "--output-dir", "out", "--max-steps", "12", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["files"] == ["adapter/en/adapter_config.json", "adapter/en/adapter_model.safetensors",
                                "adapter/fr/adapter_config.json", "adapter/fr/adapter_model.safetensors"]
    assert summary["adapters"] == ["en", "fr", "mix"] and summary["active"] == ["fr"]
    assert summary["answers"]["en"] == "Odalys Penhallow founded it."
    assert summary["answers"]["fr"] == "Elle a été fondée par Odalys Penhallow."
    assert "Penhallow" not in summary["answers"]["__base__"]
    assert summary["merged_answer"] == summary["answers"]["en"]
    assert summary["losses"][-1] < 0.1 * summary["losses"][0]
