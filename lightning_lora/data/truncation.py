"""What happens to examples that do not fit `max_length`: truncated, dropped when nothing is left to learn.

An example longer than ``max_length`` tokens is truncated; a row is kept only if it still has at least one
token to learn after the causal shift (``labels[1:]`` not all -100), so no batch can give a NaN loss.
`SplitStats` counts what that did to one split, for one warning over all splits (`warn_dropped`) and for the
`DataFormatError` of a split left with no example (`SplitStats.empty_error`); `tokenize_examples` applies
it to parsed JSON-lines examples (a Hugging Face dataset gets the same columns from `data.hf.RowEncoder`).

Example:
    >>> stats = SplitStats("train.jsonl")
    >>> stats.add(whole=300, need=280, kept=False, max_length=256)   # its response starts after token 256
    >>> stats.add(whole=40, need=12, kept=True, max_length=256)
    >>> stats.total, stats.truncated, stats.dropped_truncated
    (2, 1, 1)
    >>> print(stats.empty_error("train", max_length=256))  # doctest: +ELLIPSIS
    train.jsonl: no training example is left: 1 of 2 were longer than max_length=256 tokens ...
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lightning.pytorch.utilities import rank_zero_warn

from lightning_lora.data.collate import TokenizedDataset
from lightning_lora.data.encoding import ExampleEncoder, count_targets, min_length_for_target
from lightning_lora.data.formats import Example
from lightning_lora.errors import DataFormatError


@dataclass
class SplitStats:
    """What tokenization did to one split: counts for the warning and the empty-split error.

    Example:
        >>> stats = SplitStats("val.jsonl")
        >>> stats.add(whole=1, need=None, kept=False, max_length=256)   # a one-token text: nothing to learn
        >>> stats.dropped_empty, stats.dropped_truncated
        (1, 0)
    """

    source: str
    total: int = 0
    truncated: int = 0
    dropped_truncated: int = 0  # truncation left no token to learn
    dropped_empty: int = 0  # no token to learn even whole (a one-token text without eos, ...)
    keep_one: list[int] = field(default_factory=list)  # per truncated-and-dropped example: max_length that keeps one
    lengths: list[int] = field(default_factory=list)  # per truncated-and-dropped example: its whole length

    def add(self, whole: int, need: int | None, kept: bool, max_length: int) -> None:
        """Count one example: its untruncated length `whole`, the shortest length that keeps a token to
        learn (`need`, None: it has none) and whether it was kept after truncation to `max_length`."""
        self.total += 1
        if whole > max_length:
            self.truncated += 1
        if kept:
            return
        if need is None:
            self.dropped_empty += 1
        else:
            self.dropped_truncated += 1
            self.keep_one.append(need)
            self.lengths.append(whole)

    def empty_error(self, split: str, max_length: int) -> DataFormatError:
        """The error for a split left with no example: how many were too long, and the `max_length` that
        keeps them (see the module's example)."""
        what = "training" if split == "train" else "validation"
        reasons = []
        if self.dropped_truncated:
            reasons.append(f"{self.dropped_truncated} of {self.total} were longer than max_length={max_length} "
                           f"tokens and truncation left them no token to learn (they need max_length >= "
                           f"{min(self.keep_one)} to keep one, {max(self.lengths)} to stay whole)")
        if self.dropped_empty:
            reasons.append(f"{self.dropped_empty} of {self.total} have no token to learn at all")
        fix = ("Raise max_length (data.init_args.max_length) or shorten the prompts" if self.dropped_truncated
               else "Give every example a response or a longer text")
        return DataFormatError(f"{self.source}: no {what} example is left: {'; '.join(reasons)}. {fix}.")


def tokenize_examples(examples: Iterable[Example], encoder: ExampleEncoder, max_length: int,
                      source: str) -> tuple[TokenizedDataset, SplitStats]:
    """Encode, truncate and filter parsed examples: a row is kept only if it has a token to learn.

    Example:
        >>> from lightning_lora.data import InstructionDataModule
        >>> dm = InstructionDataModule(max_length=16)
        >>> dataset, stats = tokenize_examples(dm.examples("val"), dm.encoder, 16, "val.jsonl")  # doctest: +SKIP
        >>> len(dataset) + stats.dropped_truncated + stats.dropped_empty == stats.total           # doctest: +SKIP
        True
    """
    stats = SplitStats(source)
    items = []
    for ex in examples:
        ids, labels = encoder.encode(ex)
        whole = len(ids)
        need = min_length_for_target(labels)
        if whole > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        kept = need is not None and count_targets(labels) > 0
        stats.add(whole, need, kept, max_length)
        if kept:
            items.append({"input_ids": ids, "labels": labels})
    return TokenizedDataset(items), stats


def warn_dropped(stats: Sequence[SplitStats], splits: Sequence[str], max_length: int) -> None:
    """One warning for truncated (and dropped) examples, one for examples with nothing to learn.

    Example:
        >>> warn_dropped([SplitStats("train.jsonl", total=3)], ["train"], 256)   # nothing to say: no warning
    """
    total = sum(s.total for s in stats)
    truncated = sum(s.truncated for s in stats)
    if truncated:
        per_split = ", ".join(f"{split}: {s.truncated}" for split, s in zip(splits, stats))
        message = (f"{truncated} of {total} examples ({per_split}) were longer than max_length={max_length} "
                   f"tokens and were truncated")
        dropped = sum(s.dropped_truncated for s in stats)
        if dropped:
            message += f"; {dropped} of them had no token left to learn and were dropped"
        rank_zero_warn(message + ". Raise max_length to keep whole examples.")
    empty = sum(s.dropped_empty for s in stats)
    if empty:
        per_split = ", ".join(f"{split}: {s.dropped_empty}" for split, s in zip(splits, stats) if s.dropped_empty)
        rank_zero_warn(f"{empty} of {total} examples ({per_split}) have no token to learn (a causal LM learns "
                       "from the second token on) and were dropped.")


__all__ = ["SplitStats", "tokenize_examples", "warn_dropped"]
