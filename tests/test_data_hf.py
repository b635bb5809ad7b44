"""Tests of `lightning_lora.data.hf`: Hugging Face datasets through `InstructionDataModule(dataset=...)`.

Every column shape, read from a local parquet / CSV / JSON / JSON-lines / arrow file or a `save_to_disk`
folder built here, must give exactly the rows (ids and loss masks) the equivalent JSON-lines file gives.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import HUB_DATASET, HUB_DATASET_FILE, HUB_DATASET_ROWS, hub_offline
from hub_server import COMMIT

from lightning_lora.data import IGNORE_INDEX, InstructionDataModule
from lightning_lora.data.encoding import ExampleEncoder
from lightning_lora.data.hf import STREAM_PACK_WINDOW, StreamingTokens
from lightning_lora.errors import (
    DataFileNotFoundError,
    DataFormatError,
    MissingDependencyError,
)

datasets = pytest.importorskip("datasets")

QA = [("What colour is the sky?", "Blue."), ("Who wrote Hamlet?", "Shakespeare."),
      ("Capital of Slovenia?", "Ljubljana."), ("Two plus two?", "Four.")]


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from lightning_lora.hub import load_tokenizer

    return load_tokenizer(smollm2_path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def rows_of(dm: InstructionDataModule, split: str = "train") -> list[tuple[list[int], list[int]]]:
    dm.setup("fit")
    dataset = dm.train_dataset if split == "train" else dm.val_dataset
    return [(list(item["input_ids"]), list(item["labels"])) for item in dataset]


def hf_dm(tmp_path: Path, dataset: str, tok, **kwargs) -> InstructionDataModule:
    kwargs.setdefault("val_fraction", 0)
    return InstructionDataModule(dataset=dataset, tokenizer=tok, cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def json_dm(tmp_path: Path, rows: list[dict], tok, **kwargs) -> InstructionDataModule:
    kwargs.setdefault("val_fraction", 0)
    return InstructionDataModule(train_file=write_jsonl(tmp_path / "same.jsonl", rows), tokenizer=tok, **kwargs)


def saved_arrow_file(tmp_path: Path, rows: list[dict]) -> str:
    """A single `.arrow` file (the file `save_to_disk` writes)."""
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    target = tmp_path / "data.arrow"
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), target)
    return str(target)


# every column shape, each from another kind of local source, against the JSON-lines rows it stands for
ALPACA = [{"instruction": q, "input": "Answer briefly." if i % 2 else "", "output": a} for i, (q, a) in enumerate(QA)]
OPENAI = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                        {"role": "assistant", "content": a}, {"role": "user", "content": "Sure?"},
                        {"role": "assistant", "content": "Yes."}]} for q, a in QA]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q},
                               {"from": "gpt", "value": a}]} for q, a in QA]
COMPLETION = [{"prompt": q, "completion": a} for q, a in QA]
OURS = [{"prompt": q, "response": a} for q, a in QA]
TEXT = [{"text": f"{q} {a}"} for q, a in QA]


def as_ours(shape: str, rows: list[dict]) -> list[dict]:
    if shape == "alpaca":
        return [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), "response": r["output"]}
                for r in rows]
    if shape == "sharegpt":
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        return [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
                for r in rows]
    if shape == "completion":
        return [{"prompt": r["prompt"], "response": r["completion"]} for r in rows]
    return rows


def write_source(tmp_path: Path, kind: str, rows: list[dict]) -> str:
    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
        return str(tmp_path / "data.parquet")
    if kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "data.csv"), index=False)
        return str(tmp_path / "data.csv")
    if kind == "json":
        (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
        return str(tmp_path / "data.json")
    if kind == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if kind == "arrow":
        return saved_arrow_file(tmp_path, rows)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk"))
    return str(tmp_path / "disk")


@pytest.mark.parametrize(("shape", "rows", "kind"), [
    ("alpaca", ALPACA, "parquet"), ("messages", OPENAI, "jsonl"), ("sharegpt", SHAREGPT, "json"),
    ("completion", COMPLETION, "csv"), ("prompt_response", OURS, "arrow"), ("text", TEXT, "save_to_disk"),
])
def test_every_shape_and_source_gives_the_jsonl_rows(tmp_path, tok, shape, rows, kind):
    got = rows_of(hf_dm(tmp_path, write_source(tmp_path, kind, rows), tok))
    expected = rows_of(json_dm(tmp_path, as_ours(shape, rows), tok))
    assert got == expected and len(got) == len(rows)
    if shape != "text":  # prompts are masked, answers learned
        assert all(IGNORE_INDEX in labels and set(labels) != {IGNORE_INDEX} for _, labels in got)


def test_alpaca_prompt_joins_instruction_and_input(tmp_path, tok):
    dm = hf_dm(tmp_path, write_source(tmp_path, "parquet", ALPACA), tok)
    assert [ex.prompt for ex in dm.examples("train")[:2]] == [QA[0][0], f"{QA[1][0]}\n\nAnswer briefly."]
    assert dm.examples("train")[1].source.endswith("data.parquet[train] row 1")


def test_examples_need_no_tokenizer(tmp_path):
    dm = InstructionDataModule(dataset=write_source(tmp_path, "jsonl", SHAREGPT), tokenizer=str(tmp_path / "none"),
                               val_fraction=0.25, cache_dir=str(tmp_path / "hf-cache"))
    assert [e["response"] for e in dm.eval_examples()] == ["Ljubljana."] and len(dm.examples("train")) == 3


def test_truncation_warning_and_empty_split_error_as_for_jsonl(tmp_path, tok):
    source = write_source(tmp_path, "parquet", OURS)
    with pytest.warns(UserWarning) as hf_warnings:
        hf_rows = rows_of(hf_dm(tmp_path, source, tok, max_length=36))
    with pytest.warns(UserWarning) as json_warnings:
        json_rows = rows_of(json_dm(tmp_path, OURS, tok, max_length=36))
    assert hf_rows == json_rows and [str(w.message) for w in hf_warnings] == [str(w.message) for w in json_warnings]
    assert "were longer than max_length=36 tokens and were truncated" in str(hf_warnings[0].message)
    assert one_line_error(hf_dm(tmp_path, source, tok, max_length=3)).startswith(
        f"{source}[train]: no training example is left: 4 of 4 were longer than max_length=3 tokens")


def test_val_fraction_takes_the_rows_split_examples_takes(tmp_path, tok):
    rows = OURS * 3
    hf = hf_dm(tmp_path, write_source(tmp_path, "parquet", rows), tok, val_fraction=0.25, seed=7)
    js = json_dm(tmp_path, rows, tok, val_fraction=0.25, seed=7)
    assert rows_of(hf, "val") == rows_of(js, "val") and len(rows_of(hf, "val")) == 3
    assert rows_of(hf, "train") == rows_of(js, "train")
    assert [e["response"] for e in hf.eval_examples()] == [e["response"] for e in js.eval_examples()]


def test_val_split_of_a_saved_dataset_dict(tmp_path, tok):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(OURS[:3]),
                          "validation": datasets.Dataset.from_list(OURS[3:])}).save_to_disk(str(tmp_path / "dd"))
    dm = hf_dm(tmp_path, str(tmp_path / "dd"), tok, val_split="validation")
    assert rows_of(dm, "val") == rows_of(json_dm(tmp_path, OURS[3:], tok))
    assert len(rows_of(dm, "train")) == 3


def test_columns_mapping(tmp_path, tok):
    rows = [{"question": q, "answer_text": a, "id": i} for i, (q, a) in enumerate(QA)]
    dm = hf_dm(tmp_path, write_source(tmp_path, "csv", rows), tok,
               columns={"prompt": "question", "response": "answer_text"})
    assert rows_of(dm) == rows_of(json_dm(tmp_path, OURS, tok))


def test_tokenization_is_cached_by_datasets(tmp_path, tok, monkeypatch):
    source = write_source(tmp_path, "parquet", OURS)
    first = hf_dm(tmp_path, source, tok)
    expected = rows_of(first)
    cache = [f["filename"] for f in first.train_dataset.items.cache_files]
    assert any(Path(f).name.startswith("cache-") for f in cache)
    mtimes = {f: Path(f).stat().st_mtime_ns for f in cache}

    def not_again(self, example):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(ExampleEncoder, "encode", not_again)  # a second run must read the cache file
    second = hf_dm(tmp_path, source, tok)
    assert rows_of(second) == expected
    assert [f["filename"] for f in second.train_dataset.items.cache_files] == cache
    assert {f: Path(f).stat().st_mtime_ns for f in cache} == mtimes
    with pytest.raises(AssertionError, match="tokenized again"):  # another max_length is another cache entry
        rows_of(hf_dm(tmp_path, source, tok, max_length=100))


def test_streaming_gives_the_same_rows_without_len(tmp_path, tok):
    rows = OURS * 3
    source = write_source(tmp_path, "jsonl", rows)
    dm = hf_dm(tmp_path, source, tok, streaming=True, batch_size=4)
    dm.setup("fit")
    assert isinstance(dm.train_dataset, StreamingTokens) and not hasattr(dm.train_dataset, "__len__")
    expected = rows_of(json_dm(tmp_path, rows, tok))
    assert sorted(rows_of(dm)) == sorted(expected)
    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == len(rows) and "attention_mask" in batches[0]
    assert dm.val_dataloader() == []


def test_num_proc_gives_the_same_rows(tmp_path, tok):
    source = write_source(tmp_path, "parquet", OURS * 2)
    assert rows_of(hf_dm(tmp_path, source, tok, num_proc=2)) == rows_of(json_dm(tmp_path, OURS * 2, tok))


def test_streaming_with_packing_and_val_split(tmp_path, tok):
    rows = OURS * 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(OURS)}).save_to_disk(str(tmp_path / "dd"))
    dm = hf_dm(tmp_path, str(tmp_path / "dd"), tok, streaming=True, packing=True, val_split="test", max_length=128)
    dm.setup("fit")
    packed = list(dm.train_dataset)
    tokens = sum(len(ids) for ids, _ in rows_of(json_dm(tmp_path, rows, tok)))
    assert sum(len(r["input_ids"]) for r in packed) == tokens and len(packed) < len(rows)
    assert all(len(r["input_ids"]) <= 128 for r in packed) and STREAM_PACK_WINDOW > len(rows)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert len(dm.eval_examples()) == len(OURS)


def test_tokenizer_defaults_to_the_model_s(tiny_lm_dir, tmp_path):
    import lightning.pytorch as pl

    from lightning_lora.tasks import CausalLM

    model = CausalLM(tiny_lm_dir)
    dm = InstructionDataModule(train_file=write_jsonl(tmp_path / "d.jsonl", OURS), val_fraction=0)
    assert dm.resolved_tokenizer_name == "smollm2-135m-instruct"  # no model attached
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    assert dm.tokenizer is model.tokenizer and dm.resolved_tokenizer_name == tiny_lm_dir


def test_dataset_options_parse_from_the_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    cfg = parser.parse_args(["--data.dataset", "qa.csv", "--data.columns", '{"prompt": "question", "response": "answer"}',
                             "--data.streaming", "true", "--data.val_split", "test"])
    assert cfg.data.columns == {"prompt": "question", "response": "answer"} and cfg.data.streaming is True
    dm = parser.instantiate_classes(cfg).data
    assert (dm.dataset, dm.val_split, dm.split, dm.tokenizer_name) == ("qa.csv", "test", "train", None)


def cli_config(tmp_path: Path, model_dir: str, data: dict) -> str:
    import yaml

    cfg = {"trainer": {"accelerator": "cpu", "max_steps": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                       "enable_checkpointing": False, "enable_progress_bar": False, "logger": False,
                       "default_root_dir": str(tmp_path)},
           "model": {"class_path": "lightning_lora.tasks.CausalLM",
                     "init_args": {"model_name_or_path": model_dir, "num_generate_examples": 0}},
           "data": {"class_path": "lightning_lora.data.InstructionDataModule",
                    "init_args": {"cache_dir": str(tmp_path / "hf-cache"), "batch_size": 2, **data}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_fit_from_the_command_line_on_a_local_dataset(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from lightning_lora.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-lora"])
    source = write_source(tmp_path, "parquet", ALPACA * 2)
    config = cli_config(tmp_path, tiny_lm_dir, {"dataset": source, "val_fraction": 0.25, "packing": True})
    assert main(["fit", "--config", config]) == 0
    capsys.readouterr()
    bad = write_source(tmp_path, "csv", [{"question": "q?", "reply": "a."}] * 4)
    assert main(["fit", "--config", config, "--data.dataset", bad]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line.startswith(f"lightning-lora fit: error: dataset={bad!r}: cannot tell the shape of its rows")


# ------------------------------------------------------------------ errors: one line, naming dataset, row and fix


STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def one_line_error(dm: InstructionDataModule, cls=DataFormatError) -> str:
    with pytest.raises(cls) as info:
        dm.setup("fit")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_error_unknown_shape_and_bad_mapping(tmp_path, tok):
    source = write_source(tmp_path, "csv", [{"question": "q?", "reply": "a."}])
    assert one_line_error(hf_dm(tmp_path, source, tok)) == (
        f"dataset={source!r}: cannot tell the shape of its rows from its columns (question, reply); expected columns "
        "messages (OpenAI chat), conversations (ShareGPT), instruction/input/output (Alpaca), prompt/completion, "
        "prompt/response or text. Map yours with columns, e.g. --data.columns "
        "'{\"prompt\": \"question\", \"response\": \"answer\"}'.")
    assert one_line_error(hf_dm(tmp_path, source, tok, columns={"prompt": "question", "response": "answer"})) == (
        f"dataset={source!r}: columns maps 'response' to column 'answer', which it does not have; its columns are "
        "question, reply.")
    assert "which is not a field" in one_line_error(hf_dm(tmp_path, source, tok, columns={"query": "question"}))


def test_error_bad_row_names_the_row(tmp_path, tok):
    rows = [*OURS[:2], {"prompt": "Empty answer?", "response": ""}]
    source = write_source(tmp_path, "parquet", rows)
    assert one_line_error(hf_dm(tmp_path, source, tok)) == (
        f"{source}[train] row 2: 'response' is empty; every example needs a non-empty response.")
    bad = [{"conversations": [{"from": "narrator", "value": "Once."}, {"from": "gpt", "value": "Yes."}]}]
    source = write_source(tmp_path, "jsonl", bad)
    assert one_line_error(hf_dm(tmp_path, source, tok)).startswith(
        f"{source}[train] row 0: turn 0 is from 'narrator'; expected one of assistant, bard, bing, chatgpt, gpt, human,")


def test_error_row_the_chat_template_rejects(tmp_path, tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = STRICT
    source = write_source(tmp_path, "parquet", [OPENAI[0]])
    assert one_line_error(hf_dm(tmp_path, source, strict)) == (
        f"{source}[train] row 0: the tokenizer's chat template cannot render this conversation (roles: system, user, "
        "assistant, user, assistant): System role not supported. Order the messages as the template expects, or set "
        "use_chat_template: false (data.init_args) to train on plain 'prompt\\nresponse' text.")


def test_error_empty_and_unknown_split_and_missing_path(tmp_path, tok):
    (tmp_path / "empty.csv").write_text("prompt,response\n", encoding="utf-8")
    empty = str(tmp_path / "empty.csv")
    assert one_line_error(hf_dm(tmp_path, empty, tok)) == (
        f"{empty}[train]: the split has no rows; pass a split with data as split / val_split (data.init_args), "
        "or check dataset_config.")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(OURS),
                          "validation": datasets.Dataset.from_list(OURS)}).save_to_disk(str(tmp_path / "dd"))
    dd = str(tmp_path / "dd")
    assert one_line_error(hf_dm(tmp_path, dd, tok, split="test")) == (
        f"dataset={dd!r} has no split 'test'; its splits are train, validation. Pass one of them as split / val_split.")
    missing = str(tmp_path / "nope.parquet")
    message = one_line_error(hf_dm(tmp_path, missing, tok), DataFileNotFoundError)
    assert message.startswith(f"dataset={missing!r} does not exist (looked for ")
    source = write_source(tmp_path, "parquet", OURS)
    assert "is a single file, so only split='train' exists" in one_line_error(
        hf_dm(tmp_path, source, tok, val_split="validation"))


def test_a_folder_of_files_and_an_unreachable_hub_id(tmp_path, tok):
    (tmp_path / "folder").mkdir()
    datasets.Dataset.from_list(OURS).to_parquet(str(tmp_path / "folder" / "part-0.parquet"))
    assert rows_of(hf_dm(tmp_path, str(tmp_path / "folder"), tok)) == rows_of(json_dm(tmp_path, OURS, tok))
    assert one_line_error(hf_dm(tmp_path, "nobody/nothing-here", tok)) == (  # the tests run offline
        "dataset='nobody/nothing-here': cannot be loaded (Couldn't reach 'nobody/nothing-here' on the Hub "
        "(OfflineModeIsEnabled)). Check the hub id and dataset_config, connect to the Hub once (HF_HUB_OFFLINE unset) "
        "to cache it, or pass a local file or folder.")


def test_error_options_that_need_a_dataset(tmp_path):
    with pytest.raises(DataFormatError, match="pass dataset"):
        InstructionDataModule(streaming=True)
    with pytest.raises(DataFormatError, match="pass one source"):
        InstructionDataModule(dataset="x.parquet", train_file="x.jsonl")


def test_missing_datasets_package_says_what_to_install(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    message = one_line_error(hf_dm(tmp_path, "yahma/alpaca-cleaned", tok), MissingDependencyError)
    assert "pip install 'lightning-lora[data]'" in message


# ------------------------------------------------------------------ a hub id: downloaded from a local Hub, then offline


def _dataset_requests(server) -> list[str]:
    """The requests for `HUB_DATASET`'s files and API (`tests/hub_server.py` records every request)."""
    return [r for r in server.requests if f"/datasets/{HUB_DATASET}/" in r + "/"]


def test_a_hub_dataset_is_downloaded_cached_and_read_offline(local_hub, monkeypatch, tmp_path, tiny_lm_dir):
    got = rows_of(InstructionDataModule(dataset=HUB_DATASET, tokenizer=tiny_lm_dir, val_fraction=0))
    downloads = [r for r in _dataset_requests(local_hub) if r.startswith("GET /datasets/")]
    assert downloads == [f"GET /datasets/{HUB_DATASET}/resolve/{COMMIT}/{HUB_DATASET_FILE}"]
    assert f"GET /api/datasets/{HUB_DATASET}" in local_hub.requests and local_hub.unknown == []
    home = tmp_path / "hf-home"
    cached = home / "hub" / "datasets--tiny-org--tiny-alpaca" / "snapshots" / COMMIT / HUB_DATASET_FILE
    assert cached.read_bytes() == (tmp_path / "tiny-dataset-repo" / HUB_DATASET_FILE).read_bytes()
    prepared = home / "datasets" / "tiny-org___tiny-alpaca" / "default" / "0.0.0" / COMMIT / "tiny-alpaca-train.arrow"
    assert prepared.is_file()
    # the same rows, ids and loss masks as the same rows from a local file and as JSON-lines
    (tmp_path / "local").mkdir()
    assert got == rows_of(hf_dm(tmp_path, write_source(tmp_path / "local", "parquet", HUB_DATASET_ROWS), tiny_lm_dir))
    assert got == rows_of(json_dm(tmp_path, as_ours("alpaca", HUB_DATASET_ROWS), tiny_lm_dir)) and len(got) == 4

    local_hub.stop()  # no Hub at all: the cache alone
    hub_offline(monkeypatch)
    seen = len(local_hub.requests)
    offline = InstructionDataModule(dataset=HUB_DATASET, tokenizer=tiny_lm_dir, val_fraction=0.25, seed=3)
    train, val = rows_of(offline), rows_of(offline, "val")
    assert len(local_hub.requests) == seen and len(val) == 1 and sorted(train + val) == sorted(got)
    assert [e["response"] for e in offline.eval_examples()] == ["Four."]


def test_an_uncached_hub_dataset_offline_is_one_line(local_hub, monkeypatch, tiny_lm_dir):
    hub_offline(monkeypatch)
    dm = InstructionDataModule(dataset=HUB_DATASET, tokenizer=tiny_lm_dir, val_fraction=0)
    assert one_line_error(dm) == (
        f"dataset={HUB_DATASET!r}: cannot be loaded (Couldn't reach {HUB_DATASET!r} on the Hub "
        "(OfflineModeIsEnabled)). Check the hub id and dataset_config, connect to the Hub once (HF_HUB_OFFLINE unset) "
        "to cache it, or pass a local file or folder.")
    assert _dataset_requests(local_hub) == []  # offline means no request at all


def test_online_errors_name_what_to_do(local_hub, monkeypatch, tiny_lm_dir):
    """Online, a hub id the Hub does not have, a split it does not have, and a Hub that cannot be reached each say
    what is wrong (not "unset HF_HUB_OFFLINE", which is unset)."""
    import huggingface_hub.utils._http as hub_http

    def dm(dataset: str, **kwargs) -> InstructionDataModule:
        return InstructionDataModule(dataset=dataset, tokenizer=tiny_lm_dir, val_fraction=0, **kwargs)

    assert one_line_error(dm("nobody/nothing-here")) == (
        "dataset='nobody/nothing-here': cannot be loaded (Dataset 'nobody/nothing-here' doesn't exist on the Hub or "
        "cannot be accessed.). Check the hub id (a private or gated dataset needs HF_TOKEN or `hf auth login`), or "
        "pass a local file or folder.")
    assert one_line_error(dm(HUB_DATASET, split="test")) == (
        f"dataset={HUB_DATASET!r}: no split 'test' (Unknown split \"test\". Should be one of ['train'].). Pass an "
        "existing split as split / val_split (e.g. train, validation, test).")
    # huggingface_hub retries a request it cannot send 5 times (1 to 8 s apart, 23 s in all): skip the waits only
    monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    url = local_hub.url
    local_hub.stop()
    assert one_line_error(dm("tiny-org/not-cached")) == (
        "dataset='tiny-org/not-cached': cannot be loaded (Couldn't reach 'tiny-org/not-cached' on the Hub "
        f"(LocalEntryNotFoundError)). Check the hub id and dataset_config, and that {url} can be reached "
        "(HF_ENDPOINT), then retry; or pass a local file or folder.")
    assert local_hub.unknown == []


def test_a_stream_reshuffles_every_epoch(tmp_path, tok):
    """Each pass over the stream (an epoch) is another seeded order (`set_epoch`), the same rows."""
    rows = [{"prompt": f"Question number {i}?", "response": f"Answer {i}."} for i in range(40)]
    dm = hf_dm(tmp_path, write_source(tmp_path, "jsonl", rows), tok, streaming=True, batch_size=4)
    dm.setup("fit")
    first, second = ([tuple(r["input_ids"]) for r in dm.train_dataset] for _ in range(2))
    assert sorted(first) == sorted(second) and first != second and dm.train_dataset.epoch == 2
