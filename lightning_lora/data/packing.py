"""Packed batches: whole tokenized examples packed into rows of `max_length`, in transformers' padding-free
convention.

A packed row holds several examples back to back. Its `position_ids` restart at 0 for every example, the
first label of every example is -100 (the last token of one example never learns to predict the next
example's first token), and the batch has no `attention_mask`: from `position_ids` transformers builds a
block-diagonal causal mask for SDPA and eager attention (`masking_utils.find_packed_sequence_indices`) and
the variable-length path for flash-attention, so no token attends across examples and each example's loss
is what it would be alone. The tail of a row shorter than the batch's longest row is padding that forms a
segment of its own (positions from 0, labels -100).

Example:
    >>> rows = pack_examples([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
    ...                       {"input_ids": [4, 5], "labels": [4, 5]},
    ...                       {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]}], max_length=6)
    >>> [r["input_ids"] for r in rows]
    [[6, 7, 8, 9, 4, 5], [1, 2, 3]]
    >>> batch = PackedCollator(pad_token_id=0)(rows)
    >>> batch["position_ids"].tolist()
    [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    >>> batch["labels"].tolist()
    [[-100, -100, 8, 9, -100, 5], [-100, 2, 3, -100, -100, -100]]
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from lightning_lora.data.encoding import IGNORE_INDEX
from lightning_lora.errors import DataFormatError


def pack_examples(items: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack tokenized examples into rows of at most `max_length` tokens (best fit, longest first).

    Args:
        items: ``{"input_ids": [...], "labels": [...]}`` examples, each at most `max_length` long (the data
            module truncates before packing).
        max_length: tokens per row.

    Returns:
        Rows ``{"input_ids", "labels", "position_ids"}`` (lists): the examples of a row concatenated, positions
        restarting at 0 and the first label of each example set to -100. Deterministic for a given input;
        every example is in exactly one row.

    Raises:
        DataFormatError: an example longer than `max_length`.

    Example:
        >>> rows = pack_examples([{"input_ids": [1, 2], "labels": [1, 2]}] * 3, max_length=4)
        >>> [r["position_ids"] for r in rows]
        [[0, 1, 0, 1], [0, 1]]
    """
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    rows: list[list[int]] = []                 # the example indices of each row
    free: list[tuple[int, int]] = []           # (room left, row index), sorted: best fit = first with enough room
    for i in order:
        length = len(items[i]["input_ids"])
        if length > max_length:
            raise DataFormatError(f"an example of {length} tokens is longer than max_length={max_length}; truncate "
                                  "examples to max_length before packing.")
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    packed = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            example_ids, example_labels = list(items[i]["input_ids"]), list(items[i]["labels"])
            ids += example_ids
            labels += [IGNORE_INDEX] + example_labels[1:]
            positions += list(range(len(example_ids)))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def packing_fill(rows: list[dict[str, Any]], max_length: int) -> float:
    """Share of the `len(rows) * max_length` token slots that hold a token of an example.

    Example:
        >>> packing_fill([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], max_length=4)
        0.5
    """
    return sum(len(r["input_ids"]) for r in rows) / max(len(rows) * max_length, 1)


class PackedCollator:
    """Batches packed rows: `input_ids`, `labels` and `position_ids` (long tensors), no `attention_mask`.

    Rows shorter than the batch's longest are padded at the end with `pad_token_id`, labels -100 and
    positions counting from 0 again (a segment of its own, which no real token attends to). Picklable, so it
    works with ``num_workers > 0``.

    Args:
        pad_token_id: the id written into the padded tail of `input_ids`.

    Example:
        >>> PackedCollator(0)([{"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]},
        ...                    {"input_ids": [7], "labels": [-100], "position_ids": [0]}])["position_ids"].tolist()
        [[0, 1], [0, 0]]
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max((len(r["input_ids"]) for r in rows), default=0)
        batch = {key: torch.full((len(rows), width), fill, dtype=torch.long)
                 for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("position_ids", 0))}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            for key in batch:
                batch[key][i, :n] = torch.tensor(row[key], dtype=torch.long)
            batch["position_ids"][i, n:] = torch.arange(width - n)
        return batch


__all__ = ["PackedCollator", "pack_examples", "packing_fill"]
