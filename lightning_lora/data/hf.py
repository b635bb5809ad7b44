"""Hugging Face `datasets` as a data source: load, detect the column shape, tokenize with ``datasets.map``.

A dataset is a hub id (``yahma/alpaca-cleaned``), a local data file (parquet, CSV, JSON, JSON-lines,
arrow) or folder of them, or a folder written by ``Dataset.save_to_disk``. Every row becomes the same
:class:`~lightning_lora.data.formats.Example` a JSON-lines line would (through
:func:`~lightning_lora.data.formats.parse_example`), so it is encoded by the same
:class:`~lightning_lora.data.encoding.ExampleEncoder` and gets exactly the same loss mask.

Column shapes, detected from the column names (first match wins; ``columns`` renames yours first):

| shape | columns | becomes |
| --- | --- | --- |
| OpenAI chat | ``messages`` (``role``/``content``) | the conversation |
| ShareGPT | ``conversations`` (``from``/``value``; human/gpt/system) | the conversation, roles user/assistant/system |
| Alpaca | ``instruction``, ``output`` (``input`` optional) | user: instruction (+ ``"\\n\\n"`` + input), assistant: output |
| prompt/completion | ``prompt``, ``completion`` (strings or message lists) | user: prompt, assistant: completion |
| ours | ``prompt``, ``response`` | user: prompt, assistant: response |
| plain text | ``text`` | learned entirely |

``datasets`` is an optional dependency: ``pip install 'lightning-lora[data]'``.

Example:
    >>> from lightning_lora.data.hf import detect_shape, row_to_example
    >>> detect_shape(["instruction", "input", "output"], "alpaca.parquet")
    'alpaca'
    >>> row_to_example({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, "alpaca", "d[train] row 0").messages
    [{'role': 'user', 'content': 'Add 2 and 2.'}, {'role': 'assistant', 'content': '4'}]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset as TorchIterableDataset

from lightning_lora.data.encoding import (
    ExampleEncoder,
    count_targets,
    min_length_for_target,
)
from lightning_lora.data.formats import Example, parse_example
from lightning_lora.data.packing import pack_examples
from lightning_lora.errors import (
    DataFileNotFoundError,
    DataFormatError,
    first_line,
    require_module,
)

#: local file suffixes and the `datasets` builder that reads them
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                 ".arrow": "arrow"}
#: the column shapes, in detection order, with the columns each needs
SHAPES: dict[str, tuple[str, ...]] = {"messages": ("messages",), "sharegpt": ("conversations",),
                                      "alpaca": ("instruction", "output"), "completion": ("prompt", "completion"),
                                      "prompt_response": ("prompt", "response"), "text": ("text",)}
#: the fields a ``columns`` mapping may name (our field -> your column)
MAPPABLE = ("prompt", "response", "completion", "messages", "conversations", "instruction", "input", "output",
            "text", "answer", "fact")
#: ShareGPT speaker names -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool"}
SHAPES_HINT = ("expected columns messages (OpenAI chat), conversations (ShareGPT), instruction/input/output "
               "(Alpaca), prompt/completion, prompt/response or text")
#: bump when what a row encodes to changes, so that cached tokenizations are not reused
ENCODING_VERSION = "1"
#: rows per window when packing a streamed dataset (best fit within each window)
STREAM_PACK_WINDOW = 512


def require_datasets() -> Any:
    """The `datasets` module, or a `MissingDependencyError` that says how to install it.

    Example:
        >>> require_datasets().__name__
        'datasets'
    """
    return require_module(
        "datasets", "data.dataset needs the Hugging Face `datasets` package, which is not installed; run "
        "pip install 'lightning-lora[data]' (or pip install datasets), or pass JSON-lines files with "
        "train_file / val_file instead.")


# --------------------------------------------------------------------------------------------- loading


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_split(dataset: str, split: str, config: str | None = None, streaming: bool = False,
               cache_dir: str | None = None) -> Any:
    """One split of a dataset as a ``datasets.Dataset`` (``IterableDataset`` with ``streaming``).

    Args:
        dataset: a hub id, a local data file or folder, or a ``save_to_disk`` folder.
        split: the split name (``"train"``); a single data file or a saved ``Dataset`` has only ``"train"``.
        config: the dataset's configuration (``load_dataset``'s second argument).
        streaming: read lazily (data larger than memory).
        cache_dir: where ``datasets`` keeps its cache (default: ``HF_DATASETS_CACHE``).

    Raises:
        DataFileNotFoundError: a local path that does not exist.
        DataFormatError: an unknown split, an unreadable file, or a dataset that cannot be found.

    Example:
        >>> load_split("train.parquet", "train")            # doctest: +SKIP
        Dataset({features: ['prompt', 'response'], num_rows: 100})
    """
    datasets = require_datasets()
    path = Path(dataset).expanduser()
    looks_local = path.exists() or dataset.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS
    if looks_local and not path.exists():
        raise DataFileNotFoundError(f"dataset={dataset!r} does not exist (looked for {path.resolve()}). Pass a hub "
                                    "id (e.g. yahma/alpaca-cleaned), a parquet / CSV / JSON / JSON-lines / arrow "
                                    "file or folder, or a folder written by save_to_disk.")
    where = f"dataset={dataset!r}"
    try:
        if path.is_dir() and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataFormatError(f"{where} has no split {split!r}; its splits are {', '.join(loaded)}. "
                                          "Pass one of them as split / val_split.")
                loaded = loaded[split]
            elif split != "train":
                raise DataFormatError(f"{where} is a saved Dataset with no splits, so only split='train' exists "
                                      f"(got {split!r}); use val_fraction to hold out validation rows.")
            return loaded.to_iterable_dataset() if streaming else loaded
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataFormatError(f"{where}: cannot read {path.suffix or 'a file without suffix'}; expected "
                                      f"one of {', '.join(FILE_BUILDERS)}.")
            if split != "train":
                raise DataFormatError(f"{where} is a single file, so only split='train' exists (got {split!r}); "
                                      "pass the validation file as its own dataset or use val_fraction.")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming,
                                         cache_dir=cache_dir, **kwargs)
        return datasets.load_dataset(dataset if not path.is_dir() else str(path), config, split=split,
                                     streaming=streaming, cache_dir=cache_dir)
    except DataFormatError:
        raise
    except (ValueError, KeyError) as err:
        text = first_line(err)
        if "corresponds to no data" in text:
            raise DataFormatError(empty_split_message(f"{dataset}[{split}]")) from None
        if "split" in text.lower():
            raise DataFormatError(f"{where}: no split {split!r} ({text}). Pass an existing split as split / "
                                  "val_split (e.g. train, validation, test).") from None
        raise DataFormatError(f"{where}: cannot be read ({text}).") from None
    except (OSError, ConnectionError) as err:
        raise DataFormatError(f"{where}: cannot be loaded ({first_line(err) or type(err).__name__}). "
                              f"{_load_hint(datasets, err)}") from None


def _load_hint(datasets: Any, err: BaseException) -> str:
    """What to do about a hub id that `datasets` could not load (`err`): offline, not on the Hub, or unreachable.

    Example:
        >>> datasets = require_datasets()
        >>> _load_hint(datasets, datasets.exceptions.DatasetNotFoundError("no")).startswith("Check the hub id")
        True
    """
    if datasets.config.HF_HUB_OFFLINE:
        return ("Check the hub id and dataset_config, connect to the Hub once (HF_HUB_OFFLINE unset) to cache it, or "
                "pass a local file or folder.")
    if isinstance(err, datasets.exceptions.DatasetNotFoundError):
        return ("Check the hub id (a private or gated dataset needs HF_TOKEN or `hf auth login`), or pass a local "
                "file or folder.")
    return (f"Check the hub id and dataset_config, and that {datasets.config.HF_ENDPOINT} can be reached (HF_ENDPOINT), "
            "then retry; or pass a local file or folder.")


def empty_split_message(name: str) -> str:
    """The message for a split without rows (``name``: ``dataset[split]``).

    Example:
        >>> empty_split_message("d.csv[train]")
        'd.csv[train]: the split has no rows; pass a split with data as split / val_split (data.init_args), or check dataset_config.'
    """
    return (f"{name}: the split has no rows; pass a split with data as split / val_split (data.init_args), or check "
            "dataset_config.")


def column_names(ds: Any) -> list[str]:
    """The columns of a ``Dataset`` or ``IterableDataset`` (for a stream without known features, of its first row).

    Example:
        >>> column_names(require_datasets().Dataset.from_dict({"text": ["a"]}))
        ['text']
    """
    names = getattr(ds, "column_names", None)
    if names is None:  # a stream whose features are unknown until read
        first = next(iter(ds), None)
        names = [] if first is None else list(first)
    return list(names)


# --------------------------------------------------------------------------------------------- shapes


def apply_columns(columns: Mapping[str, str] | None, names: Sequence[str], dataset: str) -> dict[str, str]:
    """Check a ``columns`` mapping (our field -> your column) against the dataset's columns.

    Raises:
        DataFormatError: an unknown field, or a column the dataset does not have.

    Example:
        >>> apply_columns({"prompt": "question", "response": "answer"}, ["question", "answer"], "qa.csv")
        {'prompt': 'question', 'response': 'answer'}
    """
    mapping = dict(columns or {})
    for ours, theirs in mapping.items():
        if ours not in MAPPABLE:
            raise DataFormatError(f"dataset={dataset!r}: columns maps {ours!r}, which is not a field; the keys of "
                                  f"columns are fields ({', '.join(MAPPABLE)}) and the values your columns, e.g. "
                                  '{"prompt": "question", "response": "answer"}.')
        if theirs not in names:
            raise DataFormatError(f"dataset={dataset!r}: columns maps {ours!r} to column {theirs!r}, which it does not "
                                  f"have; its columns are {', '.join(names) or 'none'}.")
    return mapping


def detect_shape(names: Sequence[str], dataset: str) -> str:
    """The column shape of a dataset from its column names (see the module docstring).

    Raises:
        DataFormatError: no known shape; the message lists the columns and how to map them.

    Example:
        >>> detect_shape(["conversations", "id"], "sharegpt.json")
        'sharegpt'
    """
    for shape, needed in SHAPES.items():
        if all(column in names for column in needed):
            return shape
    raise DataFormatError(
        f"dataset={dataset!r}: cannot tell the shape of its rows from its columns ({', '.join(names) or 'none'}); "
        f"{SHAPES_HINT}. Map yours with columns, e.g. --data.columns "
        "'{\"prompt\": \"question\", \"response\": \"answer\"}'.")


def _text(value: Any) -> Any:
    return "" if value is None else value


def _messages(value: Any, where: str, role_key: str, content_key: str, roles: Mapping[str, str] | None) -> Any:
    """A list of turns as ``{"role", "content"}`` dicts (left as it is when it is not a list of dicts)."""
    if not isinstance(value, list):
        return value
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            return value
        if role_key not in turn or content_key not in turn:
            raise DataFormatError(f"{where}: turn {i} has keys {', '.join(map(repr, turn))}; each turn needs "
                                  f"{role_key!r} and {content_key!r}.")
        role = turn[role_key]
        if roles is not None:
            if role not in roles:
                raise DataFormatError(f"{where}: turn {i} is from {role!r}; expected one of "
                                      f"{', '.join(sorted(roles))} (ShareGPT speakers). Fix the row or map its "
                                      "column to messages with role/content.")
            role = roles[role]
        out.append({"role": role, "content": _text(turn[content_key])})
    return out


def row_to_example(row: Mapping[str, Any], shape: str, where: str,
                   columns: Mapping[str, str] | None = None) -> Example:
    """One dataset row -> the `Example` the equivalent JSON-lines line gives.

    Args:
        row: the row (a dict of column values).
        shape: from :func:`detect_shape` (after ``columns``).
        where: names the row in error messages, e.g. ``"yahma/alpaca-cleaned[train] row 17"``.
        columns: our field -> your column.

    Raises:
        DataFormatError: a missing or empty field, wrong types, no assistant turn (``where`` first).

    Example:
        >>> row_to_example({"q": "2+2?", "a": "4"}, "prompt_response", "qa.csv[train] row 0",
        ...                {"prompt": "q", "response": "a"}).response
        '4'
    """
    if columns:
        renamed = set(columns.values())
        row = {**{k: v for k, v in row.items() if k not in renamed}, **{ours: row[theirs] for ours, theirs in columns.items()}}
    obj: dict[str, Any]
    if shape == "messages":
        obj = {"messages": _messages(row["messages"], where, "role", "content", None)}
    elif shape == "sharegpt":
        obj = {"messages": _messages(row["conversations"], where, "from", "value", SHAREGPT_ROLES)}
    elif shape == "alpaca":
        instruction, extra = row["instruction"], _text(row.get("input"))
        prompt = f"{instruction}\n\n{extra}" if isinstance(instruction, str) and isinstance(extra, str) and \
            extra.strip() else instruction
        obj = {"prompt": prompt, "response": row["output"]}
    elif shape == "completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion (TRL)
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
                _messages(prompt, where, "role", "content", None)
            reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else \
                _messages(completion, where, "role", "content", None)
            obj = {"messages": [*turns, *reply]} if isinstance(turns, list) and isinstance(reply, list) else \
                {"prompt": prompt, "response": completion}
        else:
            obj = {"prompt": prompt, "response": completion}
    elif shape == "prompt_response":
        obj = {"prompt": row["prompt"], "response": row["response"]}
    else:
        obj = {"text": row["text"]}
    answer = row.get("answer")
    if isinstance(answer, str) or (isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)):
        obj["answer"] = answer
    if isinstance(row.get("fact"), str):
        obj["fact"] = row["fact"]
    return parse_example(obj, where)


# --------------------------------------------------------------------------------------------- tokenizing


class RowEncoder:
    """The ``datasets.map`` function: a row -> ``input_ids``, ``labels`` (truncated to ``max_length``) and the
    counts behind the truncation warning (``whole``, ``need``: see ``InstructionDataModule.setup``).
    Picklable, so ``num_proc > 1`` works.

    Args:
        encoder: the example encoder (None: only :meth:`example` is used).
        shape: the detected shape; columns: the ``columns`` mapping.
        name: names rows in messages (``"name row i"``); rows: original row numbers of the split's rows.
        max_length: truncation length.

    Example:
        >>> fn = RowEncoder(encoder, "text", None, "d[train]", None, 256)    # doctest: +SKIP
        >>> sorted(fn({"text": "Hello"}, 0))                                  # doctest: +SKIP
        ['input_ids', 'keep', 'labels', 'need', 'whole']
    """

    def __init__(self, encoder: ExampleEncoder | None, shape: str, columns: Mapping[str, str] | None, name: str,
                 rows: Sequence[int] | None, max_length: int) -> None:
        self.encoder, self.shape, self.columns = encoder, shape, dict(columns or {})
        self.name, self.rows, self.max_length = name, rows, max_length

    def example(self, row: Mapping[str, Any], index: int) -> Example:
        """The `Example` of the row at position ``index`` of the split."""
        number = index if self.rows is None else self.rows[index]
        return row_to_example(row, self.shape, f"{self.name} row {number}", self.columns)

    def __call__(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        assert self.encoder is not None, "RowEncoder(encoder=None) only parses rows"
        ids, labels = self.encoder.encode(self.example(row, index))
        whole = len(ids)
        need = min_length_for_target(labels)
        ids, labels = ids[:self.max_length], labels[:self.max_length]
        return {"input_ids": ids, "labels": labels, "whole": whole, "need": -1 if need is None else need,
                "keep": need is not None and count_targets(labels) > 0}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what makes a tokenizer encode as it does (vocabulary, specials, chat template).

    Example:
        >>> len(tokenizer_fingerprint(tok))      # doctest: +SKIP
        16
    """
    parts = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None) or "",
             json.dumps(sorted((getattr(tokenizer, "special_tokens_map", {}) or {}).items()), default=str)]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256("\x00".join(parts).encode())
    digest.update(json.dumps(sorted(vocab.items())).encode())
    return digest.hexdigest()[:16]


def encode_dataset(ds: Any, fn: RowEncoder, fingerprint: str, num_proc: int | None, desc: str) -> Any:
    """``ds.map(fn)``: the tokenized dataset with columns ``input_ids``, ``labels``, ``whole``, ``need``, ``keep``.

    A map-style dataset is cached under ``fingerprint`` (the dataset's own fingerprint and every option that
    changes the encoding), so a second run reads the cache file instead of tokenizing again; a stream is
    tokenized lazily.

    Example:
        >>> encode_dataset(ds, fn, "abc", None, "Tokenizing train")     # doctest: +SKIP
    """
    removed = column_names(ds)
    if getattr(ds, "_fingerprint", None) is None or not hasattr(ds, "cache_files"):  # a stream
        return ds.map(fn, with_indices=True, remove_columns=removed)
    return ds.map(fn, with_indices=True, remove_columns=removed, num_proc=num_proc if num_proc and num_proc > 1
                  else None, desc=desc, new_fingerprint=fingerprint)


def shard_for_rank(ds: Any, rank: int, world_size: int) -> Any:
    """This rank's share of a stream under DDP/FSDP (``datasets.distributed.split_dataset_by_node``): Lightning
    adds a `DistributedSampler` only to map-style datasets, so without it every rank would read every row.

    Example:
        >>> ds = require_datasets().Dataset.from_dict({"x": list(range(4))}).to_iterable_dataset()
        >>> [r["x"] for r in shard_for_rank(ds, 1, 2)]
        [1, 3]
    """
    if world_size <= 1:
        return ds
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=rank, world_size=world_size)


class StreamingTokens(TorchIterableDataset):
    """A streamed, tokenized split for a DataLoader: rows with a token to learn, optionally packed.

    Args:
        ds: a tokenized ``datasets.IterableDataset`` (from :func:`encode_dataset`).
        max_length: the row length when packing.
        packing: pack windows of :data:`STREAM_PACK_WINDOW` examples with
            :func:`~lightning_lora.data.packing.pack_examples`.

    Example:
        >>> rows = StreamingTokens(tokenized, max_length=256, packing=True)     # doctest: +SKIP
    """

    def __init__(self, ds: Any, max_length: int, packing: bool = False) -> None:
        super().__init__()
        self.ds, self.max_length, self.packing = ds, max_length, packing
        #: passes made over the stream (each `iter()`: an epoch), so that every epoch reshuffles (`set_epoch`);
        #: the DataLoader's persistent workers keep their copy, and so their count, from epoch to epoch
        self.epoch = 0

    def _items(self) -> Iterator[dict[str, Any]]:
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(self.epoch)
        self.epoch += 1
        for row in self.ds:
            if row["keep"]:
                yield {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.packing:
            yield from self._items()
            return
        window: list[dict[str, Any]] = []
        for item in self._items():
            window.append(item)
            if len(window) == STREAM_PACK_WINDOW:
                yield from pack_examples(window, self.max_length)
                window = []
        if window:
            yield from pack_examples(window, self.max_length)


def hf_options_fingerprint(*parts: Any) -> str:
    """A short hash of the options that change the encoding (for :func:`encode_dataset`).

    Example:
        >>> hf_options_fingerprint("a", 1) == hf_options_fingerprint("a", 1)
        True
    """
    return hashlib.sha256(json.dumps([ENCODING_VERSION, *parts], default=str, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["FILE_BUILDERS", "MAPPABLE", "SHAPES", "RowEncoder", "StreamingTokens", "apply_columns", "column_names",
           "detect_shape", "empty_split_message", "encode_dataset", "hf_options_fingerprint", "load_split",
           "require_datasets", "row_to_example", "shard_for_rank", "tokenizer_fingerprint"]
