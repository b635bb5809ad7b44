"""The data file format: JSON-lines files -> validated `Example`s, and the train/validation split.

Three line formats are accepted (extra keys are kept in `Example.extra`; ``answer`` and ``fact`` are
read for :meth:`lightning_lora.data.InstructionDataModule.eval_examples`):

- ``{"prompt": "...", "response": "..."}``: loss only on the response (and its end-of-turn token);
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``:
  loss only on the assistant turns (any order of roles: assistant first, repeated roles, system turns);
- ``{"text": "..."}``: plain language modelling, loss on every token.

Every problem a user can cause here is a :class:`~lightning_lora.errors.DataFormatError` whose
message starts with ``file:line`` (or names the file / option).

Example:
    >>> from lightning_lora.data.formats import parse_example
    >>> parse_example({"prompt": "Capital of France?", "response": "Paris."}, "train.jsonl:1").messages[1]
    {'role': 'assistant', 'content': 'Paris.'}
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_lora.errors import DataFileNotFoundError, DataFormatError

DATA_DIR = Path(__file__).resolve().parent
#: the bundled demo data: facts about the made-up company "Brindlewhisk Robotics"
BUNDLED_TRAIN_FILE = DATA_DIR / "company_train.jsonl"
BUNDLED_VAL_FILE = DATA_DIR / "company_val.jsonl"

#: what a line may look like (used in error messages)
FORMATS_HINT = ('each line must be one JSON object: {"prompt": "...", "response": "..."}, '
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
        raise DataFormatError(f"{where}: expected a JSON object, got {_type_name(obj)}; {FORMATS_HINT}.")
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
                          f"{FORMATS_HINT}.")


def check_file(path: str | os.PathLike, argument: str = "file") -> Path:
    """The path as a `Path`, or a `DataFileNotFoundError` that names it and says what to pass instead.

    Example:
        >>> check_file("nope.jsonl", "train_file")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lightning_lora.errors.DataFileNotFoundError: train_file='nope.jsonl' does not exist (looked for .../nope.jsonl). ...
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DataFileNotFoundError(
            f"{argument}={str(path)!r} {what} (looked for {p.resolve()}). Pass the path of a JSON-lines file "
            f"({FORMATS_HINT}), or leave train_file and val_file unset to use the bundled demo data.")
    return p


def read_examples(path: str | os.PathLike, argument: str = "file") -> list[Example]:
    """Read and validate a JSON-lines file (blank lines are skipped).

    Args:
        path: the file.
        argument: the name of the option the path came from, for the not-found message.

    Raises:
        DataFormatError: the file does not exist (the message names it and gives a hint), a bad line (``file:line: reason``) or a file without any example.

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
                                      f"{FORMATS_HINT}.") from None
            examples.append(parse_example(obj, where))
    if not examples:
        raise DataFormatError(f"{path}: the file has no examples; {FORMATS_HINT}.")
    return examples


def split_indices(n: int, val_fraction: float, seed: int, source: str | os.PathLike | None = None,
                  alternative: str = "pass val_file") -> tuple[list[int], list[int]]:
    """The deterministic train/validation split of ``n`` examples as index lists (both in order).

    ``round(n * val_fraction)`` indices (at least one when ``val_fraction > 0``) go to validation, chosen by
    ``random.Random(seed)``; :func:`split_examples` and the Hugging Face datasets path share it, so the same
    rows give the same split from either source.

    Raises:
        DataFormatError: nothing would be left to train on (``source`` prefixes the message, ``alternative``
            ends it).

    Example:
        >>> split_indices(5, 0.4, seed=0)
        ([0, 3, 4], [1, 2])
    """
    if val_fraction <= 0:
        return list(range(n)), []
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        where = "" if source is None else f"{source}: "
        raise DataFormatError(f"{where}Cannot split {n} example(s) with val_fraction={val_fraction}: nothing would be "
                              f"left to train on. Add examples, lower val_fraction (0 = no validation), or "
                              f"{alternative}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [i for i in range(n) if i not in val_idx], sorted(val_idx)


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int,
                   source: str | os.PathLike | None = None) -> tuple[list[Example], list[Example]]:
    """A deterministic train/validation split: the same seed gives the same split (:func:`split_indices`).

    ``round(len(examples) * val_fraction)`` examples (at least one when ``val_fraction > 0``) go to
    validation; both parts keep the file order. ``source`` (the file) prefixes the error message.

    Raises:
        DataFormatError: nothing would be left to train on (too few examples for ``val_fraction``).

    Example:
        >>> train, val = split_examples(read_examples(BUNDLED_TRAIN_FILE), val_fraction=0.1, seed=42)
        >>> len(train), len(val)
        (194, 22)
    """
    train_idx, val_idx = split_indices(len(examples), val_fraction, seed, source)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx]


__all__ = ["BUNDLED_TRAIN_FILE", "BUNDLED_VAL_FILE", "DATA_DIR", "FORMATS_HINT", "Example", "check_file", "parse_example",
           "read_examples", "split_examples", "split_indices"]
