"""Batching: a dataset of tokenized examples and the dynamic-padding collate function.

Example:
    >>> from lightning_lora.data.collate import PadCollator, TokenizedDataset
    >>> ds = TokenizedDataset([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    >>> PadCollator(pad_token_id=0)([ds[0], ds[1]])["labels"].tolist()
    [[-100, 6, 7], [8, 9, -100]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_lora.data.encoding import IGNORE_INDEX
from lightning_lora.errors import DataFormatError


class TokenizedDataset(Dataset):
    """A list of ``{"input_ids": [...], "labels": [...]}`` dicts (any extra int keys are batched too), or any
    sequence of them such as a tokenized ``datasets.Dataset``.

    Example:
        >>> ds = TokenizedDataset([{"input_ids": [5, 6], "labels": [-100, 6]}])
        >>> len(ds), ds[0]["labels"]
        (1, [-100, 6])
    """

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
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
            raise DataFormatError(f"padding_side={padding_side!r}; expected 'right' or 'left'.")
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


__all__ = ["PadCollator", "TokenizedDataset"]
