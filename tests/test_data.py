"""Tests of `lightning_lora.data`: formats, loss masking, padding, splitting, errors and the bundled demo data."""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from lightning_lora.data import (
    BUNDLED_TRAIN_FILE,
    BUNDLED_VAL_FILE,
    IGNORE_INDEX,
    DataFormatError,
    InstructionDataModule,
    PadCollator,
    count_targets,
    read_examples,
)
from lightning_lora.data.formats import FORMATS_HINT

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from lightning_lora.hub import load_tokenizer

    return load_tokenizer(smollm2_path)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tok, messages) -> list[int]:
    return ids_of(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def learned_spans(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of labels that are not -100."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def make_dm(tmp_path, rows, tok, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule(train_file=write_jsonl(tmp_path / "train.jsonl", rows), tokenizer=tok,
                               val_fraction=kwargs.pop("val_fraction", 0.0), **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------- masking


def test_chat_masking_is_exact_with_real_smollm2_tokenizer(tmp_path, tok):
    rows = [{"prompt": "Who founded Brindlewhisk Robotics?", "response": "Odalys Penhallow founded it."},
            {"prompt": "Hi?", "response": "Hello."}]
    dm = make_dm(tmp_path, rows, tok, batch_size=2)
    assert tok.eos_token == IM_END and tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)

    expected = []
    for row in rows:
        prompt = chat_prompt_ids(tok, [{"role": "user", "content": row["prompt"]}])
        response = ids_of(tok, row["response"] + IM_END)
        assert response[-1] == tok.eos_token_id
        expected.append((prompt, response))
        item = dm.train_dataset.items[rows.index(row)]
        assert item["input_ids"] == prompt + response
        assert item["labels"] == [IGNORE_INDEX] * len(prompt) + response
        assert tok.decode([x for x in item["labels"] if x != IGNORE_INDEX]) == row["response"] + IM_END
        # the prompt the model sees at inference is exactly the masked prefix seen in training
        assert dm.encode_prompt(row["prompt"]).tolist() == [prompt]

    batch = dm._loader(dm.train_dataset, shuffle=False).__iter__().__next__()
    lengths = [len(p) + len(r) for p, r in expected]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    for i, (prompt, response) in enumerate(expected):
        n = len(prompt) + len(response)
        labels = batch["labels"][i].tolist()
        masked = [j for j, x in enumerate(labels) if x == IGNORE_INDEX]
        assert masked == list(range(len(prompt))) + list(range(n, max(lengths)))  # prompt and padding only
        assert labels[len(prompt):n] == response
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (max(lengths) - n)
        rendered = tok.apply_chat_template([{"role": "user", "content": rows[i]["prompt"]},
                                            {"role": "assistant", "content": rows[i]["response"]}], tokenize=False)
        assert tok.decode(batch["input_ids"][i, :n]) == rendered.removesuffix("\n")  # template's trailing newline


def test_system_prompt_replaces_template_default(tmp_path, tok):
    dm = make_dm(tmp_path, [{"prompt": "Q?", "response": "A."}], tok, system_prompt="Answer briefly.")
    item = dm.train_dataset.items[0]
    text = tok.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nQ?")
    assert "SmolLM" not in text
    assert tok.decode([x for x in item["labels"] if x != IGNORE_INDEX]) == "A." + IM_END
    default = make_dm(tmp_path, [{"prompt": "Q?", "response": "A."}], tok)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(default.train_dataset.items[0]["input_ids"])


def test_messages_format_learns_every_assistant_turn(tmp_path, tok):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6."}, {"role": "user", "content": "trailing, ignored"}]
    dm = make_dm(tmp_path, [{"messages": messages}], tok)
    item = dm.train_dataset.items[0]
    spans = learned_spans(item["labels"])
    assert [tok.decode(s) for s in spans] == ["4." + IM_END, "6." + IM_END]
    assert tok.decode(item["input_ids"]) == tok.apply_chat_template(messages[:5], tokenize=False).removesuffix("\n")
    # the final answer is learned with exactly the prompt used at inference before it
    n = len(item["labels"]) - len(spans[-1])
    assert item["input_ids"][:n] == dm.encode_prompt(messages[:4]).tolist()[0]
    assert item["labels"][n:] == ids_of(tok, "6." + IM_END)
    assert dm.eval_examples("train")[0]["prompt"] == "And 3+3?"
    assert dm.eval_examples("train")[0]["response"] == "6."


def test_text_format_learns_every_token(tmp_path, tok):
    dm = make_dm(tmp_path, [{"text": "Brindlewhisk bakes bread."}], tok)
    item = dm.train_dataset.items[0]
    assert item["input_ids"] == ids_of(tok, "Brindlewhisk bakes bread.") + [tok.eos_token_id]
    assert item["labels"] == item["input_ids"]
    assert dm.eval_examples("train") == []  # nothing to ask


def test_plain_format_without_chat_template(tmp_path, tok):
    dm = make_dm(tmp_path, [{"prompt": "Q?", "response": "A."}], tok, use_chat_template=False)
    item = dm.train_dataset.items[0]
    prompt = ids_of(tok, "Q?\n")
    response = ids_of(tok, "A.") + [tok.eos_token_id]
    assert item["input_ids"] == prompt + response
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert dm.encode_prompt("Q?").tolist() == [prompt]


def test_three_formats_mix_in_one_file(tmp_path, tok):
    rows = [{"prompt": "P?", "response": "R.", "extra": 1},
            {"messages": [{"role": "user", "content": "U?"}, {"role": "assistant", "content": "M."}]},
            {"text": "T."}]
    dm = make_dm(tmp_path, rows, tok)
    decoded = [tok.decode([x for x in it["labels"] if x != IGNORE_INDEX]) for it in dm.train_dataset.items]
    assert decoded == ["R." + IM_END, "M." + IM_END, "T." + IM_END]


# ------------------------------------------------------------------------------------ padding / loaders


def test_pad_collator_shapes():
    collate = PadCollator(pad_token_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    left = PadCollator(pad_token_id=7, padding_side="left")([{"input_ids": [1, 2], "index": 0},
                                                             {"input_ids": [3], "index": 1}])
    assert left["input_ids"].tolist() == [[1, 2], [7, 3]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert left["index"].tolist() == [0, 1] and "labels" not in left


def test_dynamic_padding_pads_to_longest_in_each_batch(tmp_path, tok):
    rows = [{"prompt": "Q" * (1 + 5 * i) + "?", "response": "A."} for i in range(6)]
    dm = make_dm(tmp_path, rows, tok, batch_size=2)
    lengths = [len(it["input_ids"]) for it in dm.train_dataset.items]
    assert len(set(lengths)) > 1
    batches = list(dm._loader(dm.train_dataset, shuffle=False))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, max(lengths[i:i + 2])) for i in (0, 2, 4)]
    for b, i in zip(batches, (0, 2, 4)):
        assert b["attention_mask"].sum(1).tolist() == lengths[i:i + 2]


def test_train_shuffle_is_seeded_and_val_is_in_file_order(tmp_path, tok):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    def first_epoch(seed):
        dm = InstructionDataModule(path, tokenizer=tok, batch_size=40, seed=seed, val_fraction=0.25)
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))["input_ids"].tolist()

    dm, a = first_epoch(1)
    assert a == first_epoch(1)[1] and a != first_epoch(2)[1]
    in_file_order = [it["input_ids"] + [tok.pad_token_id] * (len(a[0]) - len(it["input_ids"]))
                     for it in dm.train_dataset.items]
    assert a != in_file_order
    val = [tok.decode(row[row != tok.pad_token_id]) for b in dm.val_dataloader() for row in b["input_ids"]]
    assert [re.search(r"Question \d+\?", v).group() for v in val] == [e["prompt"] for e in dm.eval_examples()]
    assert [e["prompt"] for e in dm.eval_examples()] == sorted((e["prompt"] for e in dm.eval_examples()),
                                                                key=lambda p: int(p.split()[1][:-1]))
    assert len(dm.test_dataloader().dataset) == len(dm.val_dataset) == 10


def test_predict_dataloader_left_pads_eval_prompts(tmp_path, tok):
    rows = [{"prompt": "Hi?", "response": "Hello."},
            {"prompt": "What is the longest question here?", "response": "This."}]
    dm = InstructionDataModule(write_jsonl(tmp_path / "t.jsonl", rows),
                               val_file=write_jsonl(tmp_path / "v.jsonl", rows), tokenizer=tok)
    batch = next(iter(dm.predict_dataloader()))
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    width = max(map(len, prompts))
    assert batch["input_ids"].tolist() == [[tok.pad_token_id] * (width - len(p)) + p for p in prompts]
    assert batch["attention_mask"].sum(1).tolist() == [len(p) for p in prompts]
    assert batch["index"].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------- splitting


def test_deterministic_split(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(50)])

    def split(seed, fraction=0.1):
        dm = InstructionDataModule(path, val_fraction=fraction, seed=seed)  # no tokenizer needed to split
        return [e.prompt for e in dm.examples("train")], [e.prompt for e in dm.examples("val")]

    train, val = split(42)
    assert (len(train), len(val)) == (45, 5)
    assert sorted(train + val, key=lambda p: int(p[1:])) == [f"q{i}" for i in range(50)]
    assert train == sorted(train, key=lambda p: int(p[1:])) and val == sorted(val, key=lambda p: int(p[1:]))
    assert split(42) == (train, val)
    assert split(7)[1] != val
    assert split(42, fraction=0.0) == ([f"q{i}" for i in range(50)], [])
    assert split(42, fraction=0.2)[1] != val and len(split(42, fraction=0.2)[1]) == 10


def test_bundled_files_are_used_when_no_file_is_given(tmp_path):
    dm = InstructionDataModule()
    assert dm.train_path == BUNDLED_TRAIN_FILE and dm.val_path == BUNDLED_VAL_FILE
    assert dm._tokenizer is None and dm.train_dataset is None  # nothing heavy happens in __init__
    assert [e.prompt for e in dm.examples("val")] == [e.prompt for e in read_examples(BUNDLED_VAL_FILE)]
    own = InstructionDataModule(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}]), val_fraction=0.5)
    assert own.val_path is None and len(own.examples("val")) == 1


# ---------------------------------------------------------------------------------------- truncation


def test_truncation_warns_once_with_counts(tmp_path, tok):
    short = {"prompt": "Hi?", "response": "Yes."}
    long_response = {"prompt": "Hi?", "response": "word " * 40}
    long_prompt = {"prompt": "word " * 80, "response": "Yes."}
    train = write_jsonl(tmp_path / "t.jsonl", [short, long_response, short, long_prompt, long_response])
    val = write_jsonl(tmp_path / "v.jsonl", [short, long_response])
    dm = InstructionDataModule(train, val_file=val, tokenizer=tok, max_length=60)
    prompt_len = len(chat_prompt_ids(tok, [{"role": "user", "content": "Hi?"}]))
    assert prompt_len < 60 < len(chat_prompt_ids(tok, [{"role": "user", "content": long_prompt["prompt"]}]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "max_length" in str(w.message)]
    assert messages == [("4 of 7 examples (train: 3, val: 1) were longer than max_length=60 tokens and were "
                        "truncated; 1 of them had no token left to learn and were dropped. "
                        "Raise max_length to keep whole examples.")]
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    assert max(len(it["input_ids"]) for it in dm.train_dataset.items) == 60
    truncated = dm.train_dataset.items[1]
    assert truncated["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert IGNORE_INDEX not in truncated["labels"][prompt_len:]
    with warnings.catch_warnings(record=True) as caught:  # setup again: cached, no second warning
        warnings.simplefilter("always")
        dm.setup("fit")
    assert not [w for w in caught if "max_length" in str(w.message)]


def test_no_warning_without_truncation(tmp_path, tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dm(tmp_path, [{"prompt": "Hi?", "response": "Yes."}], tok)


# ---------------------------------------------------------------------------------------------- errors

GOOD = {"prompt": "ok?", "response": "ok."}
BAD_LINES = [
    ('{"prompt": "a", "response": "b"', "invalid JSON (Expecting ',' delimiter at column 32)"),
    ('["prompt", "response"]', "expected a JSON object, got array"),
    ({"question": "a", "answer_text": "b"}, "missing fields: found keys 'question', 'answer_text'"),
    ({"prompt": "a"}, "missing field 'response'"),
    ({"response": "b"}, "missing field 'prompt'"),
    ({"prompt": 3, "response": "b"}, "'prompt' must be a string, got number (3)"),
    ({"prompt": "a", "response": None}, "'response' must be a string, got null"),
    ({"prompt": "a", "response": "  "}, "'response' is empty"),
    ({"text": ["a"]}, "'text' must be a string, got array"),
    ({"text": ""}, "'text' is empty"),
    ({"messages": "hi"}, "'messages' must be a non-empty array"),
    ({"messages": [{"role": "user", "content": "a"}]}, "'messages' has no message with role 'assistant'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
     "messages[0]: missing field(s) 'content'"),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]},
     "messages[0]: 'content' must be a string, got number"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "messages[1]: the final assistant message (the response) is empty"),
    ({"prompt": "a", "response": "b", "answer": 5}, "'answer' must be a string or an array of strings"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[r.split("(")[0][:40] for _, r in BAD_LINES])
def test_bad_line_names_file_line_and_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])  # blank line 2 is skipped, bad line is 3
    with pytest.raises(DataFormatError) as err:
        read_examples(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert reason in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_line_fails_through_the_data_module(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"prompt": "a", "response": ""}])
    dm = InstructionDataModule(train, val_fraction=0.0)
    with pytest.raises(DataFormatError, match=re.escape(f"{train}:2: 'response' is empty")):
        dm.setup("fit")


def test_invalid_utf8_and_empty_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: not valid UTF-8")):
        read_examples(path)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataFormatError, match=re.escape(f"{empty}: the file has no examples")):
        read_examples(empty)


def test_missing_file_names_path_and_gives_hint(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    dm = InstructionDataModule(train_file=missing)
    with pytest.raises(DataFormatError) as err:
        dm.prepare_data()
    assert str(err.value) == (
        f"train_file={missing!r} does not exist (looked for {missing}). Pass the path of a JSON-lines file "
        f"({FORMATS_HINT}), or leave train_file and val_file unset to use the bundled demo data.")
    with pytest.raises(DataFormatError, match=re.escape(f"train_file={missing!r} does not exist")):
        dm.setup("fit")
    train = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(DataFormatError, match=re.escape(f"val_file={missing!r} does not exist")):
        InstructionDataModule(train, val_file=missing).examples("val")
    with pytest.raises(DataFormatError, match=re.escape(f"train_file={str(tmp_path)!r} is a directory, not a file")):
        InstructionDataModule(str(tmp_path)).examples()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"val_fraction": 1.0}, "val_fraction=1.0; expected a share in [0, 1), e.g. 0.1 (0 = no validation split)."),
    ({"val_fraction": -0.1}, "val_fraction=-0.1; expected a share in [0, 1), e.g. 0.1 (0 = no validation split)."),
    ({"max_length": 0}, ("max_length=0; expected a number of tokens >= 2 (a causal LM learns from the second token "
                        "on), e.g. 256.")),
    ({"max_length": 1}, ("max_length=1; expected a number of tokens >= 2 (a causal LM learns from the second token "
                        "on), e.g. 256.")),
    ({"batch_size": 0}, "batch_size=0; expected a positive integer, e.g. 8."),
    ({"num_workers": -1}, "num_workers=-1; expected 0 or more."),
])
def test_invalid_arguments_are_data_format_errors(kwargs, message):
    with pytest.raises(DataFormatError) as err:
        InstructionDataModule(**kwargs)
    assert str(err.value) == message


def test_a_directory_without_a_tokenizer_is_a_data_format_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    dm = InstructionDataModule(tokenizer=str(tmp_path))
    with pytest.raises(DataFormatError) as err:
        _ = dm.tokenizer
    message = str(err.value)
    assert message.startswith(f"tokenizer={str(tmp_path)!r}: no tokenizer can be loaded from it (")
    assert message.endswith("); pass a model directory with tokenizer files (tokenizer.json, tokenizer_config.json), "
                            "a model in the local Hugging Face cache, or 'smollm2-135m-instruct'.")
    from lightning_lora.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=re.escape("Model 'no-org/no-model' was not found")):
        _ = InstructionDataModule(tokenizer="no-org/no-model").tokenizer  # the hub's own error, a LoRAError too


def test_other_user_errors_are_data_format_errors():
    with pytest.raises(DataFormatError, match=re.escape("split='test'; expected 'train' or 'val'.")):
        InstructionDataModule().examples("test")
    with pytest.raises(DataFormatError, match=re.escape("padding_side='top'; expected 'right' or 'left'.")):
        PadCollator(0, padding_side="top")


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.5), (1, 0.1), (2, 0.75), (3, 0.9)])
def test_too_few_examples_to_split(tmp_path, n, fraction):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD] * n)
    dm = InstructionDataModule(path, val_fraction=fraction)
    with pytest.raises(DataFormatError) as err:
        dm.examples()
    assert str(err.value) == (f"{path}: Cannot split {n} example(s) with val_fraction={fraction}: nothing would be "
                              "left to train on. Add examples, lower val_fraction (0 = no validation), or pass "
                              "val_file.")


def test_buildable_by_jsonargparse_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    cfg = parser.parse_string("data:\n  train_file: my.jsonl\n  max_length: 128\n  system_prompt: Be brief.\n")
    assert cfg.data.train_file == "my.jsonl" and cfg.data.val_file is None and cfg.data.max_length == 128
    assert cfg.data.system_prompt == "Be brief." and cfg.data.tokenizer is None  # None: the model's
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, InstructionDataModule) and dm.hparams["max_length"] == 128


# ----------------------------------------------------------------------------------- bundled demo data


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_bundled_demo_data_is_a_good_fact_set():
    train, val = _rows(BUNDLED_TRAIN_FILE), _rows(BUNDLED_VAL_FILE)
    by_fact: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"train": [], "val": []})
    for split, rows in (("train", train), ("val", val)):
        for row in rows:
            assert set(row) == {"prompt", "response", "fact", "answer"}
            assert row["answer"] in row["response"], row
            assert row["answer"].lower() not in row["prompt"].lower(), row  # the question does not give it away
            assert len(row["response"]) < 120 and row["response"].count(".") <= 2, row  # one short sentence
            by_fact[row["fact"]][split].append(row)
    assert 40 <= len(by_fact) <= 80
    assert all(len(f["train"]) >= 3 and len(f["val"]) >= 1 for f in by_fact.values())
    answers = {}
    for fact, splits in by_fact.items():
        rows = splits["train"] + splits["val"]
        assert len({r["answer"] for r in rows}) == 1 and len({r["response"] for r in rows}) == 1, fact
        answers[fact] = rows[0]["answer"]
    assert len(set(answers.values())) == len(answers)  # every fact has its own keyword
    train_questions = [r["prompt"].strip().lower() for r in train]
    val_questions = [r["prompt"].strip().lower() for r in val]
    assert len(set(train_questions)) == len(train_questions) and len(set(val_questions)) == len(val_questions)
    assert not set(val_questions) & set(train_questions)
    assert all("Brindlewhisk Robotics" in r["prompt"] for r in train + val)


def test_bundled_data_through_the_data_module(tok):
    dm = InstructionDataModule(tokenizer=tok, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation at the default max_length
        dm.setup("fit")
    assert len(dm.train_dataset) == len(_rows(BUNDLED_TRAIN_FILE))
    assert len(dm.val_dataset) == len(_rows(BUNDLED_VAL_FILE))
    examples = dm.eval_examples()
    assert len(examples) == len(dm.val_dataset)
    assert set(examples[0]) == {"prompt", "response", "answer", "keywords", "fact", "messages", "source"}
    assert all(e["keywords"] == [e["answer"]] and e["answer"] in e["response"] for e in examples)
    assert examples[0]["messages"] == [{"role": "user", "content": examples[0]["prompt"]}]
    assert examples[0]["source"] == f"{BUNDLED_VAL_FILE}:1"
    for item, ex in zip(dm.val_dataset.items, examples):
        assert tok.decode([x for x in item["labels"] if x != IGNORE_INDEX]) == ex["response"] + IM_END
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 80


# ------------------------------------------------- truncation that leaves nothing to learn (issue 13, kind 1)

A = lambda content: {"role": "assistant", "content": content}
U = lambda content: {"role": "user", "content": content}
S = lambda content: {"role": "system", "content": content}


def ids_before(tok, rendered: str, content: str) -> list[int]:
    """Token ids of a rendered conversation up to (not including) the first occurrence of `content`."""
    return ids_of(tok, rendered[:rendered.index(content)])


def kinds_of_rows(tok) -> list[tuple[dict, int, int]]:
    """(row, shortest max_length that keeps one target, whole length), computed from the template directly."""
    text = {"text": "Once upon a time there was a robot."}
    pr = {"prompt": "Who founded Brindlewhisk Robotics, and in which year?", "response": "Odalys Penhallow."}
    chat = {"messages": [U("Hi there."), A("Hello."), U("Bye?"), A("Bye.")]}
    first = {"messages": [A("Welcome, how can I help?"), U("Just looking."), A("Sure.")]}
    rows = []
    text_ids = ids_of(tok, text["text"]) + [tok.eos_token_id]
    rows.append((text, 2, len(text_ids)))
    pr_prompt = chat_prompt_ids(tok, [U(pr["prompt"])])
    rows.append((pr, len(pr_prompt) + 1, len(pr_prompt) + len(ids_of(tok, pr["response"] + IM_END))))
    rendered = tok.apply_chat_template(chat["messages"], tokenize=False).removesuffix("\n")
    rows.append((chat, len(ids_before(tok, rendered, "Hello.")) + 1, len(ids_of(tok, rendered))))
    rendered = tok.apply_chat_template(first["messages"], tokenize=False).removesuffix("\n")
    rows.append((first, len(ids_before(tok, rendered, "Welcome")) + 1, len(ids_of(tok, rendered))))
    return rows


def test_a_row_is_kept_only_with_a_target_after_the_shift_for_every_max_length(tmp_path, tok):
    rows = kinds_of_rows(tok)
    needs = [need for _, need, _ in rows]
    assert needs[0] == 2 and min(needs[1:]) > 20  # text rows keep a target at 2 tokens, chat rows need their prompt
    whole = {json.dumps(row): make_dm(tmp_path, [row], tok).train_dataset.items[0] for row, _, _ in rows}
    for row, _, length in rows:
        assert len(whole[json.dumps(row)]["input_ids"]) == length
    for max_length in range(2, max(length for _, _, length in rows) + 2):
        kept_rows = [row for row, need, _ in rows if need <= max_length]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm = make_dm(tmp_path, [row for row, _, _ in rows], tok, max_length=max_length)
        items = dm.train_dataset.items
        assert len(items) == len(kept_rows), max_length
        for item, row in zip(items, kept_rows):
            assert count_targets(item["labels"]) >= 1
            full = whole[json.dumps(row)]
            assert item["input_ids"] == full["input_ids"][:max_length]
            assert item["labels"] == full["labels"][:max_length]


def test_no_batch_gives_a_nan_loss(tmp_path, tok):
    from conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=len(tok))
    rows = [row for row, _, _ in kinds_of_rows(tok)]
    val = write_jsonl(tmp_path / "val.jsonl", rows)
    for max_length in (2, 3, 30, 40, 64):
        for batch_size in (1, 4):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dm = InstructionDataModule(write_jsonl(tmp_path / "train.jsonl", rows), val_file=val, tokenizer=tok,
                                           max_length=max_length, batch_size=batch_size)
                dm.setup("fit")
            for batch in [*dm.train_dataloader(), *dm.val_dataloader()]:
                assert all(count_targets(row.tolist()) >= 1 for row in batch["labels"])
                with torch.no_grad():
                    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).loss
                assert torch.isfinite(loss), (max_length, batch_size)


def long_prompt_rows(n: int = 3) -> list[dict]:
    return [{"prompt": " ".join(f"word{i}" for i in range(120 + 5 * k)) + "?", "response": "A."} for k in range(n)]


def test_truncation_that_empties_the_train_split_is_one_error(tmp_path, tok):
    """Issue 13: three ~250-token prompts, max_length=32, a separate validation file."""
    rows = long_prompt_rows()
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "Hi?", "response": "A."}])
    prompts = [len(chat_prompt_ids(tok, [U(r["prompt"])])) for r in rows]
    assert min(prompts) > 250
    response = len(ids_of(tok, "A." + IM_END))
    dm = InstructionDataModule(train, val_file=val, tokenizer=tok, max_length=32)
    with pytest.raises(DataFormatError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        f"{train}: no training example is left: 3 of 3 were longer than max_length=32 tokens and truncation left "
        f"them no token to learn (they need max_length >= {min(prompts) + 1} to keep one, "
        f"{max(prompts) + response} to stay whole). Raise max_length (data.init_args.max_length) or shorten "
        "the prompts.")
    assert dm.train_dataset is None and dm.val_dataset is None  # nothing half set up
    dm = InstructionDataModule(train, val_file=val, tokenizer=tok, max_length=min(prompts) + 1)
    with pytest.warns(UserWarning, match=re.escape("3 of 4 examples (train: 3, val: 0) were longer than "
                                                   f"max_length={min(prompts) + 1} tokens and were truncated; 2 of "
                                                   "them had no token left to learn and were dropped.")):
        dm.setup("fit")
    assert len(dm.train_dataset) == 1 and count_targets(dm.train_dataset.items[0]["labels"]) == 1


def test_truncation_that_empties_the_validation_split_is_one_error(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Hi?", "response": "A."}] * 3)
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": [U(r["prompt"]), A(r["response"])]}
                                               for r in long_prompt_rows(2)])
    prompts = [len(chat_prompt_ids(tok, [U(r["prompt"])])) for r in long_prompt_rows(2)]
    response = len(ids_of(tok, "A." + IM_END))
    with pytest.raises(DataFormatError) as err:
        InstructionDataModule(train, val_file=val, tokenizer=tok, max_length=40).setup("validate")
    assert str(err.value) == (
        f"{val}: no validation example is left: 2 of 2 were longer than max_length=40 tokens and truncation left "
        f"them no token to learn (they need max_length >= {min(prompts) + 1} to keep one, "
        f"{max(prompts) + response} to stay whole). Raise max_length (data.init_args.max_length) or shorten "
        "the prompts.")
    # the validation split of the train file is named as such
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "short text"}, *long_prompt_rows(1)])
    dm = InstructionDataModule(mixed, tokenizer=tok, max_length=40, val_fraction=0.5, seed=1)
    assert [e.text for e in dm.examples("val")] == [None]  # the long prompt went to validation with this seed
    with pytest.raises(DataFormatError) as err:
        dm.setup("fit")
    assert str(err.value).startswith(f"{mixed} (its val_fraction=0.5 validation split): no validation example is "
                                     "left: 1 of 1 were longer than max_length=40 tokens")


def test_rows_with_nothing_to_learn_even_whole_are_dropped_or_refused(tmp_path, smollm2_path):
    """Without an eos token a one-token text has no target after the shift: dropped (warned), never a NaN row."""
    from lightning_lora.hub import load_tokenizer

    no_eos = load_tokenizer(smollm2_path)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None and len(ids_of(no_eos, "Hi")) == 1
    with pytest.warns(UserWarning) as caught:
        dm = make_dm(tmp_path, [{"text": "Hi"}, {"text": "Hi there"}], no_eos)
    assert [str(w.message) for w in caught] == [
        "1 of 2 examples (train: 1) have no token to learn (a causal LM learns from the second token on) and were "
        "dropped."]
    assert [item["labels"] for item in dm.train_dataset.items] == [ids_of(no_eos, "Hi there")]
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "Hi"}, {"text": "Yes"}])
    with pytest.raises(DataFormatError) as err:
        InstructionDataModule(path, tokenizer=no_eos, val_fraction=0.0).setup("fit")
    assert str(err.value) == (f"{path}: no training example is left: 2 of 2 have no token to learn at all. Give every "
                              "example a response or a longer text.")


# -------------------------------------------------------- conversations in every shape (issue 13, kind 2)

SHAPES = {
    "assistant_first": [A("Hi! I am the shop's assistant."), U("Do you sell robots?"), A("Yes, three kinds.")],
    "assistant_only": [A("Welcome to Brindlewhisk.")],
    "consecutive_users": [U("Hello."), U("Are you there?"), A("Yes.")],
    "consecutive_assistants": [U("Hello."), A("Hi."), A("How can I help?")],
    "system_only_prefix": [S("Be terse."), A("Ready."), U("2+2?"), A("4.")],
    "system_in_the_middle": [U("a?"), A("b."), S("Now shout."), U("c?"), A("D!")],
    "trailing_user": [U("Q1?"), A("A1."), U("ignored?")],
    "empty_middle_turn": [U("Q1?"), A(""), U("Q2?"), A("A2.")],
}


@pytest.mark.parametrize("system_prompt", [None, "Answer briefly."])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_assistant_turn_is_learned_in_every_conversation_shape(tmp_path, tok, shape, system_prompt):
    messages = SHAPES[shape]
    dm = make_dm(tmp_path, [{"messages": messages}], tok, system_prompt=system_prompt)
    item = dm.train_dataset.items[0]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assistants = [m["content"] for m in messages[:last + 1] if m["role"] == "assistant"]
    assert [tok.decode(s) for s in learned_spans(item["labels"])] == [c + IM_END for c in assistants]
    has_system = any(m["role"] == "system" for m in messages)
    shown = messages[:last + 1] if system_prompt is None or has_system else [S(system_prompt), *messages[:last + 1]]
    rendered = tok.apply_chat_template(shown, tokenize=False)
    assert tok.decode(item["input_ids"]) == rendered.removesuffix("\n")
    # the final answer is learned after exactly the prompt used at inference
    final = ids_of(tok, assistants[-1] + IM_END)
    assert item["labels"][-len(final):] == final
    prompt = item["input_ids"][:-len(final)]
    assert dm.encode_prompt(messages[:last]).tolist() == [prompt]
    example = dm.eval_examples("train")[0]
    assert example["messages"] == messages[:last] and example["response"] == assistants[-1]


def test_issue_assistant_first_line_trains_with_and_without_a_system_prompt(tmp_path, tok):
    line = {"messages": [A("Hello! How can I help you today?"), U("What is 2+2?"), A("It is 4.")]}
    for system_prompt in (None, "Answer briefly."):
        dm = make_dm(tmp_path, [line], tok, system_prompt=system_prompt)
        spans = [tok.decode(s) for s in learned_spans(dm.train_dataset.items[0]["labels"])]
        assert spans == ["Hello! How can I help you today?<|im_end|>", "It is 4.<|im_end|>"]


def test_assistant_first_predict_prompt_is_the_training_prefix(tmp_path, tok):
    rows = [{"messages": [A("Welcome to Brindlewhisk.")]}, {"prompt": "Hi?", "response": "Hello."}]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    dm = InstructionDataModule(path, val_file=path, tokenizer=tok)
    dm.setup("fit")
    first = dm.val_dataset.items[0]
    prefix = first["input_ids"][:first["labels"].index(next(x for x in first["labels"] if x != IGNORE_INDEX))]
    assert tok.decode(prefix) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                  "Hugging Face<|im_end|>\n<|im_start|>assistant\n")
    assert dm.eval_examples()[0]["prompt"] == "" and dm.eval_examples()[0]["messages"] == []
    batch = next(iter(dm.predict_dataloader()))
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * (width - len(prefix)) + prefix


def test_conversation_shapes_without_chat_template(tmp_path, tok):
    messages = SHAPES["assistant_first"]
    dm = make_dm(tmp_path, [{"messages": messages}], tok, use_chat_template=False)
    item = dm.train_dataset.items[0]
    assert [tok.decode(s) for s in learned_spans(item["labels"])] == [
        "Hi! I am the shop's assistant.<|im_end|>", "Yes, three kinds.<|im_end|>"]
    assert item["input_ids"] == (ids_of(tok, "Hi! I am the shop's assistant.") + [tok.eos_token_id]
                                 + ids_of(tok, "Do you sell robots?\n") + ids_of(tok, "Yes, three kinds.")
                                 + [tok.eos_token_id])


# Gemma's template: refuses a system message and roles that do not alternate user/assistant
STRICT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.fixture
def strict_tok(smollm2_path):
    from lightning_lora.hub import load_tokenizer

    strict = load_tokenizer(smollm2_path)
    strict.chat_template = STRICT_TEMPLATE
    return strict


@pytest.mark.parametrize(("messages", "roles", "reason"), [
    ([A("Hi."), U("Q?"), A("A.")], "assistant, user, assistant",
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ([U("Q?"), U("Q2?"), A("A.")], "user, user, assistant",
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ([S("Be terse."), U("Q?"), A("A.")], "system, user, assistant", "System role not supported"),
])
def test_conversation_the_template_cannot_render_names_file_and_line(tmp_path, strict_tok, messages, roles, reason):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [U("Q?"), A("A.")]}, "", {"messages": messages}])
    dm = InstructionDataModule(path, tokenizer=strict_tok, val_fraction=0.0)
    with pytest.raises(DataFormatError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        f"{path}:3: the tokenizer's chat template cannot render this conversation (roles: {roles}): {reason}. Order "
        "the messages as the template expects, or set use_chat_template: false (data.init_args) to train on plain "
        "'prompt\\nresponse' text.")


def test_strict_template_alternating_conversation_learns_each_turn(tmp_path, strict_tok):
    dm = make_dm(tmp_path, [{"messages": [U("Q?"), A("  A1. "), U("Q2?"), A("A2.")]}], strict_tok)
    spans = [strict_tok.decode(s) for s in learned_spans(dm.train_dataset.items[0]["labels"])]
    assert spans == ["A1.<|im_end|>", "A2.<|im_end|>"]  # the template trims the content
