"""Instruction tuning data: JSON-lines files -> tokenized, loss-masked, dynamically padded batches.

Three line formats are accepted (extra keys are ignored, except ``answer`` which
:meth:`InstructionDataModule.eval_examples` exposes):

- ``{"prompt": "...", "response": "..."}``: loss only on the response (and its end-of-turn token);
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``:
  loss only on the assistant turns;
- ``{"text": "..."}``: plain language modelling, loss on every token.

Example:
    >>> from lightning_lora.data import InstructionDataModule
    >>> dm = InstructionDataModule(batch_size=4)        # the bundled demo data, SmolLM2's tokenizer
    >>> dm.setup("fit")                                 # doctest: +SKIP
    >>> batch = next(iter(dm.train_dataloader()))      # doctest: +SKIP
    >>> sorted(batch)                                   # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels']
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_lora.errors import DataFormatError

#: label value ignored by the loss (``torch.nn.CrossEntropyLoss(ignore_index=-100)``, transformers' default)
IGNORE_INDEX = -100
DATA_DIR = Path(__file__).resolve().parent
#: the bundled demo data: facts about the made-up company "Brindlewhisk Robotics"
BUNDLED_TRAIN_FILE = DATA_DIR / "company_train.jsonl"
BUNDLED_VAL_FILE = DATA_DIR / "company_val.jsonl"

_FORMATS_HINT = ('each line must be one JSON object: {"prompt": "...", "response": "..."}, '
                 '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
                 'or {"text": "..."}')


@dataclass
class Example:
    """One parsed line of a data file.

    Exactly one of ``messages`` (prompt/response lines become a user and an assistant message) and
    ``text`` is set.

    Example:
        >>> ex = Example(source="train.jsonl:1", messages=[{"role": "user", "content": "Hi?"},
        ...                                                 {"role": "assistant", "content": "Hello."}])
        >>> ex.prompt, ex.response
        ('Hi?', 'Hello.')
    """

    source: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    answer: str | list[str] | None = None
    fact: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_assistant_index(self) -> int | None:
        """Index of the last assistant message (None for a text example)."""
        if self.messages is None:
            return None
        return max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")

    @property
    def prompt(self) -> str | None:
        """The last user message before the final assistant message (None for a text example)."""
        last = self.final_assistant_index
        if last is None:
            return None
        users = [m["content"] for m in self.messages[:last] if m["role"] == "user"]  # type: ignore[index]
        return users[-1] if users else ""

    @property
    def response(self) -> str | None:
        """The content of the final assistant message (None for a text example)."""
        last = self.final_assistant_index
        return None if last is None else self.messages[last]["content"]  # type: ignore[index]

    @property
    def keywords(self) -> list[str]:
        """``answer`` as a list (empty when the line had none)."""
        if self.answer is None:
            return []
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)


# --------------------------------------------------------------------------------------------- reading


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _string_field(obj: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: {key!r} must be a string, got {_type_name(value)} ({json.dumps(value)[:60]}).")
    if not allow_empty and not value.strip():
        raise DataFormatError(f"{where}: {key!r} is empty; every example needs a non-empty {key}.")
    return value


def _parse_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: 'messages' must be a non-empty array of "
                              f'{{"role": ..., "content": ...}} objects, got {_type_name(value)}.')
    messages = []
    for i, message in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataFormatError(f'{at} must be an object {{"role": ..., "content": ...}}, got {_type_name(message)}.')
        missing = [k for k in ("role", "content") if k not in message]
        if missing:
            raise DataFormatError(f"{at}: missing field(s) {', '.join(map(repr, missing))}; "
                                  'each message needs "role" and "content".')
        role = _string_field(message, "role", at)
        content = _string_field(message, "content", at, allow_empty=True)
        messages.append({"role": role, "content": content})
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        raise DataFormatError(f"{where}: 'messages' has no message with role 'assistant', so there is nothing "
                              f"to learn; roles found: {', '.join(sorted({m['role'] for m in messages}))}.")
    if not messages[assistants[-1]]["content"].strip():
        raise DataFormatError(f"{where}: messages[{assistants[-1]}]: the final assistant message (the response) "
                              "is empty; every example needs a non-empty response.")
    return messages


def parse_example(obj: Any, where: str = "<example>") -> Example:
    """Validate one decoded JSON line and turn it into an :class:`Example`.

    Args:
        obj: the decoded JSON value of the line.
        where: ``file:line``, used as the prefix of error messages.

    Raises:
        DataFormatError: missing fields, wrong types or an empty response.

    Example:
        >>> parse_example({"prompt": "Capital of France?", "response": "Paris."}).response
        'Paris.'
    """
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {_type_name(obj)}; {_FORMATS_HINT}.")
    answer = obj.get("answer")
    if answer is not None and not (isinstance(answer, str) or (
            isinstance(answer, list) and all(isinstance(a, str) for a in answer))):
        raise DataFormatError(f"{where}: 'answer' must be a string or an array of strings, got {_type_name(answer)}.")
    fact = obj.get("fact")
    fact = None if fact is None else str(fact)
    known = {"prompt", "response", "messages", "text", "answer", "fact"}
    extra = {k: v for k, v in obj.items() if k not in known}
    if "messages" in obj:
        return Example(where, messages=_parse_messages(obj["messages"], where), answer=answer, fact=fact,
                       extra=extra)
    if "prompt" in obj or "response" in obj:
        missing = [k for k in ("prompt", "response") if k not in obj]
        if missing:
            raise DataFormatError(f"{where}: missing field {missing[0]!r}; a prompt/response example needs both "
                                  f'"prompt" and "response" (found keys: {", ".join(obj) or "none"}).')
        prompt = _string_field(obj, "prompt", where)
        response = _string_field(obj, "response", where)
        return Example(where, messages=[{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": response}],
                       answer=answer, fact=fact, extra=extra)
    if "text" in obj:
        return Example(where, text=_string_field(obj, "text", where), answer=answer, fact=fact, extra=extra)
    raise DataFormatError(f"{where}: missing fields: found keys {', '.join(map(repr, obj)) or 'none'}, but "
                          f"{_FORMATS_HINT}.")


def check_file(path: str | os.PathLike, argument: str = "file") -> Path:
    """The path as a `Path`, or a `FileNotFoundError` that names it and says what to pass instead.

    Example:
        >>> check_file("nope.jsonl", "train_file")   # doctest: +SKIP
        Traceback (most recent call last):
        FileNotFoundError: train_file='nope.jsonl' does not exist (looked for /home/me/nope.jsonl). ...
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{argument}={str(path)!r} {what} (looked for {p.resolve()}). Pass the path of a JSON-lines file "
            f"({_FORMATS_HINT}), or leave train_file and val_file unset to use the bundled demo data.")
    return p


def read_examples(path: str | os.PathLike, argument: str = "file") -> list[Example]:
    """Read and validate a JSON-lines file (blank lines are skipped).

    Args:
        path: the file.
        argument: the name of the option the path came from, for the not-found message.

    Raises:
        FileNotFoundError: the file does not exist (the message names it and gives a hint).
        DataFormatError: a bad line (``file:line: reason``) or a file without any example.

    Example:
        >>> from lightning_lora.data import BUNDLED_VAL_FILE
        >>> examples = read_examples(BUNDLED_VAL_FILE)
        >>> examples[0].answer
        'Odalys Penhallow'
    """
    p = check_file(path, argument)
    examples = []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                                      "save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip())
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); "
                                      f"{_FORMATS_HINT}.") from None
            examples.append(parse_example(obj, where))
    if not examples:
        raise DataFormatError(f"{path}: the file has no examples; {_FORMATS_HINT}.")
    return examples


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic train/validation split: the same seed gives the same split.

    ``round(len(examples) * val_fraction)`` examples (at least one when ``val_fraction > 0``) go to
    validation; both parts keep the file order.

    Example:
        >>> train, val = split_examples(read_examples(BUNDLED_TRAIN_FILE), val_fraction=0.1, seed=42)
        >>> len(train), len(val)
        (194, 22)
    """
    n = len(examples)
    if val_fraction <= 0:
        return list(examples), []
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"Cannot split {n} example(s) with val_fraction={val_fraction}: nothing would be left to "
                         "train on. Add examples, lower val_fraction, or pass val_file.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([ex for i, ex in enumerate(examples) if i not in val_idx],
            [ex for i, ex in enumerate(examples) if i in val_idx])


# -------------------------------------------------------------------------------------------- encoding


class ExampleEncoder:
    """Turns an :class:`Example` into ``input_ids`` and ``labels`` (``-100`` where there is no loss).

    With a chat template (and ``use_chat_template``) a conversation is rendered by the template; the
    tokens of each assistant turn up to and including its end-of-turn token (the first special token
    after the content, e.g. ``<|im_end|>``) are learned, everything else (system prompt, user turns,
    the ``assistant`` header, the newline after a middle turn's end-of-turn token) is masked, and what
    the template writes after the final end-of-turn token is left out. Without one, a
    conversation is ``"prompt\\n"`` + ``"response"`` + eos and only the response and eos are learned.
    A text example is learned entirely (eos appended).

    Args:
        tokenizer: a transformers tokenizer.
        use_chat_template: use the tokenizer's chat template when it has one.
        system_prompt: added as a system message to conversations that have none.

    Example:
        >>> from lightning_lora.hub import load_tokenizer
        >>> enc = ExampleEncoder(load_tokenizer("smollm2-135m-instruct"))                  # doctest: +SKIP
        >>> ids, labels = enc.encode(parse_example({"prompt": "Hi?", "response": "Hello."}))  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool = True, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.eos_token_id: int | None = tokenizer.eos_token_id
        specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(token, "special", False):
                specials.add(token_id)
        specials.discard(getattr(tokenizer, "unk_token_id", None))
        if self.eos_token_id is not None:
            specials.add(self.eos_token_id)
        #: token ids that end an assistant turn when they follow its content
        self.end_of_turn_ids = specials

    # ------------------------------------------------------------------ helpers
    def _ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if add_special_tokens and ids and ids[-1] == self.eos_token_id:
            # some tokenizers append eos when adding special tokens: a prompt must not end the sequence
            plain = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > len(plain):
                ids = ids[:-1]
        return ids

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def _supervised(self, text: str) -> tuple[list[int], list[int]]:
        """Tokens of an assistant turn's rendered text: learned up to the first end-of-turn token."""
        ids = self._ids(text)
        for k, token_id in enumerate(ids):
            if token_id in self.end_of_turn_ids:
                return ids, ids[:k + 1] + [IGNORE_INDEX] * (len(ids) - k - 1)
        if self.eos_token_id is not None:  # a template without an end-of-turn token: the model must learn eos
            ids = ids + [self.eos_token_id]
        return ids, list(ids)

    # ------------------------------------------------------------------ conversations
    def _chat_pieces(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """(text, learned) pieces whose concatenation is the rendered conversation."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i in turns:
            prompt = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[:i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                break  # a template whose renderings are not prefixes of each other: learn the final turn only
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        else:
            return pieces
        last = turns[-1]
        prompt = self._render(messages[:last], add_generation_prompt=True)
        full = self._render(messages, add_generation_prompt=False)
        answer = full[len(prompt):] if full.startswith(prompt) else messages[last]["content"]
        return [(prompt, False), (answer, True)]

    def _encode_conversation(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], int]:
        """input_ids, labels and where the final assistant turn starts."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = self._with_system(messages[:last + 1])
        ids: list[int] = []
        labels: list[int] = []
        final_start = 0
        if self.chat:
            for text, learned in self._chat_pieces(messages):
                if learned:
                    final_start = len(ids)
                    piece_ids, piece_labels = self._supervised(text)
                else:
                    piece_ids = self._ids(text)
                    piece_labels = [IGNORE_INDEX] * len(piece_ids)
                ids += piece_ids
                labels += piece_labels
            # nothing is learned after the final end-of-turn token (e.g. the template's newline): drop it
            end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
            return ids[:end], labels[:end], final_start
        context = ""
        for message in messages:
            if message["role"] != "assistant":
                context += (message["content"] + "\n\n") if message["role"] == "system" else (message["content"] + "\n")
                continue
            context_ids = self._ids(context, add_special_tokens=not ids)
            ids += context_ids
            labels += [IGNORE_INDEX] * len(context_ids)
            context = ""
            final_start = len(ids)
            answer = self._ids(message["content"]) + ([] if self.eos_token_id is None else [self.eos_token_id])
            ids += answer
            labels += answer
        return ids, labels, final_start

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example, not truncated.

        Example:
            >>> ids, labels = encoder.encode(parse_example({"text": "Once upon a time"}))   # doctest: +SKIP
            >>> ids == labels                                                                  # doctest: +SKIP
            True
        """
        if example.text is not None:
            ids = self._ids(example.text, add_special_tokens=True)
            if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
                ids.append(self.eos_token_id)
            return ids, list(ids)
        assert example.messages is not None
        ids, labels, _ = self._encode_conversation(example.messages)
        return ids, labels

    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids to feed `generate` for a question: exactly the masked prefix used in training.

        Args:
            prompt: a user message, or a conversation that ends with a user message.

        Example:
            >>> ids = encoder.encode_prompt("Who founded Brindlewhisk Robotics?")   # doctest: +SKIP
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if self.chat:
            return self._ids(self._render(self._with_system(messages), add_generation_prompt=True))
        ids, _, final_start = self._encode_conversation([*messages, {"role": "assistant", "content": ""}])
        return ids[:final_start]


# ------------------------------------------------------------------------------------ batching


class TokenizedDataset(Dataset):
    """A list of ``{"input_ids": [...], "labels": [...]}`` dicts (any extra int keys are batched too).

    Example:
        >>> ds = TokenizedDataset([{"input_ids": [5, 6], "labels": [-100, 6]}])
        >>> len(ds), ds[0]["labels"]
        (1, [-100, 6])
    """

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class PadCollator:
    """Dynamic padding: pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) to the
    longest sequence in the batch and adds ``attention_mask``; any other key (e.g. ``index``) is
    stacked into a tensor. Picklable, so it works with ``num_workers > 0``.

    Args:
        pad_token_id: the id written into padded positions of ``input_ids``.
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.

    Example:
        >>> collate = PadCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [8, -100, -100]])
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'right' or 'left'.")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def _pad(self, rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                if self.padding_side == "right":
                    out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                else:
                    out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [list(item["input_ids"]) for item in items]
        width = max((len(r) for r in rows), default=0)
        batch = {"input_ids": self._pad(rows, self.pad_token_id, width),
                 "attention_mask": self._pad([[1] * len(r) for r in rows], 0, width)}
        if all("labels" in item for item in items):
            batch["labels"] = self._pad([list(item["labels"]) for item in items], IGNORE_INDEX, width)
        for key in items[0] if items else ():
            if key not in ("input_ids", "labels"):
                batch[key] = torch.tensor([item[key] for item in items])
        return batch


# ------------------------------------------------------------------------------------ data module


class InstructionDataModule(LightningDataModule):
    """Instruction / chat / plain-text fine-tuning data from JSON-lines files.

    Files are read and validated on first use; the tokenizer is loaded in ``prepare_data``/``setup``
    (never in ``__init__``), and everything is tokenized once in ``setup`` and kept in memory.

    Args:
        train_file: JSON-lines training data; None uses the bundled demo data (facts about the made-up
            company "Brindlewhisk Robotics").
        val_file: validation data. None with the bundled train file: the bundled validation file
            (different phrasings of the same facts). None with your own train file: a deterministic
            split of ``val_fraction`` of it (by ``seed``).
        tokenizer: a model name or path resolved with :func:`lightning_lora.hub.load_tokenizer`
            (from Python, an already loaded tokenizer object is accepted too).
        max_length: longer examples are truncated (one warning counts them); examples whose response
            is cut off entirely are dropped.
        batch_size: examples per batch (padded to the longest in the batch).
        val_fraction: share of ``train_file`` used for validation when ``val_file`` is None
            (0 = no validation).
        seed: seeds the split and the shuffling of the training data.
        num_workers: DataLoader worker processes.
        use_chat_template: render conversations with the tokenizer's chat template when it has one;
            otherwise (or when False) use ``prompt + "\\n" + response + eos``.
        system_prompt: a system message added to every conversation that has none (with the
            SmolLM2 template, None keeps the template's default system prompt).

    Example:
        >>> from lightning_lora.data import InstructionDataModule
        >>> dm = InstructionDataModule(train_file="train.jsonl", max_length=512, batch_size=16)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)                                                    # doctest: +SKIP

        or in a LightningCLI config::

            data:
              class_path: lightning_lora.data.InstructionDataModule
              init_args: {train_file: train.jsonl, max_length: 512}
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str = "smollm2-135m-instruct",
        max_length: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 42,
        num_workers: int = 0,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length={max_length}; expected a positive number of tokens, e.g. 256.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer, e.g. 8.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction}; expected a share in [0, 1), e.g. 0.1 "
                             "(0 = no validation split).")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}; expected 0 or more.")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, (str, os.PathLike)) else ["tokenizer"])
        self.train_file = train_file
        self.val_file = val_file
        self.tokenizer_name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        self._tokenizer: Any = None if self.tokenizer_name is not None else tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self._examples: dict[str, list[Example]] | None = None
        self._encoder: ExampleEncoder | None = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.predict_dataset: TokenizedDataset | None = None

    # ------------------------------------------------------------------ files and tokenizer
    @property
    def train_path(self) -> Path:
        """The training file in use (the bundled one when ``train_file`` is None)."""
        return BUNDLED_TRAIN_FILE if self.train_file is None else Path(self.train_file).expanduser()

    @property
    def val_path(self) -> Path | None:
        """The validation file in use, or None when validation is split off the training file."""
        if self.val_file is not None:
            return Path(self.val_file).expanduser()
        return BUNDLED_VAL_FILE if self.train_file is None else None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first access with :func:`lightning_lora.hub.load_tokenizer`)."""
        if self._tokenizer is None:
            from lightning_lora.hub import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def encoder(self) -> ExampleEncoder:
        """The :class:`ExampleEncoder` that turns examples into ``input_ids``/``labels``."""
        if self._encoder is None:
            self._encoder = ExampleEncoder(self.tokenizer, self.use_chat_template, self.system_prompt)
        return self._encoder

    def examples(self, split: str = "train") -> list[Example]:
        """The parsed (untokenized) examples of ``"train"`` or ``"val"``; needs no tokenizer.

        Example:
            >>> dm = InstructionDataModule()
            >>> len(dm.examples("train")), len(dm.examples("val"))
            (216, 108)
        """
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; expected 'train' or 'val'.")
        if self._examples is None:
            train = read_examples(self.train_path, "train_file")
            val_path = self.val_path
            if val_path is None:
                train, val = split_examples(train, self.val_fraction, self.seed)
            else:
                val = read_examples(val_path, "val_file")
            self._examples = {"train": train, "val": val}
        return self._examples[split]

    def eval_examples(self, split: str = "val") -> list[dict[str, Any]]:
        """The raw question/answer pairs of a split, e.g. for a before/after table of generations.

        Returns:
            One dict per prompt/response or chat example (text examples are skipped) with ``prompt``
            (the last user message), ``response`` (the expected answer), ``answer`` (as in the file, or
            None), ``keywords`` (``answer`` as a list), ``fact`` (or None), ``messages`` (the
            conversation before the final answer, for :meth:`encode_prompt`) and ``source``
            (``file:line``).

        Example:
            >>> ex = InstructionDataModule().eval_examples()[0]
            >>> ex["prompt"], ex["answer"]
            ('Who started the company Brindlewhisk Robotics?', 'Odalys Penhallow')
        """
        out = []
        for ex in self.examples(split):
            if ex.messages is None:
                continue
            last = ex.final_assistant_index
            out.append({"prompt": ex.prompt, "response": ex.response, "answer": ex.answer,
                        "keywords": ex.keywords, "fact": ex.fact, "messages": ex.messages[:last],
                        "source": ex.source})
        return out

    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> torch.Tensor:
        """``input_ids`` of shape ``(1, T)`` for ``model.generate``, formatted exactly like training
        prompts (same chat template and system prompt).

        Example:
            >>> ids = dm.encode_prompt("Who founded Brindlewhisk Robotics?")        # doctest: +SKIP
            >>> out = model.generate(ids, max_new_tokens=32)                          # doctest: +SKIP
            >>> dm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # doctest: +SKIP
        """
        return torch.tensor([self.encoder.encode_prompt(prompt)], dtype=torch.long)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def prepare_data(self) -> None:
        """Check that the files exist and resolve the tokenizer once (converts a bundled model on first use)."""
        check_file(self.train_path, "train_file")
        if self.val_path is not None:
            check_file(self.val_path, "val_file")
        if self.tokenizer_name is not None:
            from lightning_lora.hub import resolve_model

            resolve_model(self.tokenizer_name)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the data the stage needs (once; later calls reuse it)."""
        wanted = {"fit": ["train", "val"], None: ["train", "val"], "validate": ["val"], "test": ["val"],
                  "predict": ["predict"]}.get(stage, ["train", "val"])
        counts: dict[str, int] = {}
        total = dropped = 0
        for split in wanted:
            if getattr(self, f"{split}_dataset") is not None:
                continue
            if split == "predict":
                self.predict_dataset = TokenizedDataset(
                    [{"input_ids": self.encoder.encode_prompt(ex["messages"]), "index": i}
                     for i, ex in enumerate(self.eval_examples("val"))])
                continue
            items = []
            counts[split] = 0
            for ex in self.examples(split):
                ids, labels = self.encoder.encode(ex)
                total += 1
                if len(ids) > self.max_length:
                    counts[split] += 1
                    ids, labels = ids[:self.max_length], labels[:self.max_length]
                    if all(label == IGNORE_INDEX for label in labels):
                        dropped += 1
                        continue
                items.append({"input_ids": ids, "labels": labels})
            setattr(self, f"{split}_dataset", TokenizedDataset(items))
        truncated = sum(counts.values())
        if truncated:
            per_split = ", ".join(f"{split}: {n}" for split, n in counts.items())
            message = (f"{truncated} of {total} examples ({per_split}) were longer than max_length={self.max_length} "
                       f"tokens and were truncated")
            if dropped:
                message += f"; {dropped} of them had no response tokens left and were dropped"
            rank_zero_warn(message + ". Raise max_length to keep whole examples.")

    def _loader(self, dataset: TokenizedDataset, shuffle: bool, padding_side: str = "right") -> DataLoader:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=PadCollator(pad, padding_side), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled (with a generator seeded by ``seed``), right-padded training batches."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order (an empty list when there is no validation data)."""
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, shuffle=False) if len(self.val_dataset) else []

    @override
    def test_dataloader(self) -> DataLoader | list:
        """The validation batches (there is no separate test set)."""
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompts of :meth:`eval_examples` (``input_ids``, ``attention_mask`` and ``index``
        into ``eval_examples()``), ready for ``model.generate``."""
        if self.predict_dataset is None:
            self.setup("predict")
        assert self.predict_dataset is not None
        return self._loader(self.predict_dataset, shuffle=False, padding_side="left")
