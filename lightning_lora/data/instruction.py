"""`InstructionDataModule`: JSON-lines files or a Hugging Face dataset -> tokenized, loss-masked, padded batches.

The pieces live in their own modules: the file format in :mod:`lightning_lora.data.formats`, Hugging Face
datasets in :mod:`lightning_lora.data.hf`, the tokenization and loss masks in
:mod:`lightning_lora.data.encoding`, batching in :mod:`lightning_lora.data.collate` and
:mod:`lightning_lora.data.packing`, truncation and filtering in :mod:`lightning_lora.data.truncation`; their
names are importable from here too.

What happens to examples that do not fit (see ``setup``): an example longer than ``max_length`` is
truncated (one warning counts them); a row is kept only if it still has at least one token to learn
after the causal shift, so no batch can give a NaN loss; a split left with no example is a
`DataFormatError` that names the file, how many examples were too long, and the fix.

Example:
    >>> from lightning_lora.data import InstructionDataModule
    >>> dm = InstructionDataModule(batch_size=4)        # the bundled demo data, SmolLM2's tokenizer
    >>> dm.setup("fit")                                 # doctest: +SKIP
    >>> batch = next(iter(dm.train_dataloader()))      # doctest: +SKIP
    >>> sorted(batch)                                   # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from typing_extensions import override

# IGNORE_INDEX, DATA_DIR, FORMATS_HINT and parse_example are imported for code that imported them from
# here before this module was split (import them from `lightning_lora.data`)
from lightning_lora.data.collate import PadCollator, TokenizedDataset
from lightning_lora.data.encoding import (  # noqa: F401
    IGNORE_INDEX,
    ExampleEncoder,
    count_targets,
    min_length_for_target,
)
from lightning_lora.data.formats import (  # noqa: F401
    BUNDLED_TRAIN_FILE,
    BUNDLED_VAL_FILE,
    DATA_DIR,
    FORMATS_HINT,
    Example,
    check_file,
    parse_example,
    read_examples,
    split_examples,
    split_indices,
)
from lightning_lora.data.hf import (
    RowEncoder,
    StreamingTokens,
    apply_columns,
    column_names,
    detect_shape,
    empty_split_message,
    encode_dataset,
    hf_options_fingerprint,
    load_split,
    shard_for_rank,
    tokenizer_fingerprint,
)
from lightning_lora.data.packing import PackedCollator, pack_examples
from lightning_lora.data.truncation import SplitStats, tokenize_examples, warn_dropped
from lightning_lora.errors import DataFormatError, LoRAError
from lightning_lora.hub import load_tokenizer, resolve_model

#: the tokenizer used when none is given and no model with a tokenizer is attached (the bundled model's)
DEFAULT_TOKENIZER = "smollm2-135m-instruct"
#: how many validation rows of a streamed dataset `eval_examples` reads
STREAM_EVAL_ROWS = 256
#: the shuffle buffer of a streamed training split (`datasets.IterableDataset.shuffle`)
STREAM_SHUFFLE_BUFFER = 1000


class InstructionDataModule(LightningDataModule):
    """Instruction / chat / plain-text fine-tuning data from JSON-lines files or a Hugging Face dataset.

    Files are read and validated on first use; the tokenizer is loaded in ``prepare_data``/``setup``
    (never in ``__init__``), and everything is tokenized once in ``setup`` and kept in memory. With
    ``dataset`` the rows come from Hugging Face ``datasets`` instead (`lightning_lora.data.hf`: the column
    shape is detected, each row becomes the example its JSON-lines line would, so the loss masks are the
    same), tokenized with ``datasets.map`` (cached: a second run reads the cache files) or, with
    ``streaming``, lazily.

    Args:
        train_file: JSON-lines training data; None uses the bundled demo data (facts about the made-up
            company "Brindlewhisk Robotics").
        val_file: validation data. None with the bundled train file: the bundled validation file
            (different phrasings of the same facts). None with your own train file: a deterministic
            split of ``val_fraction`` of it (by ``seed``).
        tokenizer: a model name or path resolved with :func:`lightning_lora.hub.load_tokenizer`
            (from Python, an already loaded tokenizer object is accepted too). None (the default): the
            tokenizer of the model the Trainer runs (its ``tokenizer`` attribute, as `CausalLM` has, else its
            ``model_name_or_path``), so a config names the model once; without such a model, SmolLM2's.
        max_length: longer examples are truncated (one warning counts them); an example left with no
            token to learn (its response cut off entirely) is dropped, and a split left with no example
            is a `DataFormatError` that says which max_length would keep them.
        batch_size: examples per batch (padded to the longest in the batch); rows per batch with ``packing``.
        val_fraction: share of ``train_file`` used for validation when ``val_file`` is None
            (0 = no validation).
        seed: seeds the split and the shuffling of the training data.
        num_workers: DataLoader worker processes.
        use_chat_template: render conversations with the tokenizer's chat template when it has one;
            otherwise (or when False) use ``prompt + "\\n" + response + eos``.
        system_prompt: a system message added to every conversation that has none (with the
            SmolLM2 template, None keeps the template's default system prompt).
        packing: pack whole examples into rows of ``max_length`` tokens (best fit, longest first; then
            ``batch_size`` is rows per batch), in transformers' padding-free convention: ``position_ids``
            restart at 0 for every example, the first label of each is -100, no ``attention_mask``, so
            no token attends across examples (`lightning_lora.data.packing`). Training and validation
            batches are packed; `CausalLM` passes ``position_ids`` on. On data whose lengths vary a lot
            most of a padded batch is padding: packing computes on examples instead. A streamed dataset is
            packed in windows of 512 examples.
        dataset: a Hugging Face dataset instead of ``train_file``: a hub id (``yahma/alpaca-cleaned``), a local
            parquet / CSV / JSON / JSON-lines / arrow file or folder, or a ``save_to_disk`` folder. Needs
            ``pip install 'lightning-lora[data]'``.
        dataset_config: the dataset's configuration name (``load_dataset(dataset, dataset_config)``).
        split: the training split of ``dataset``.
        val_split: the validation split; None: ``val_fraction`` of ``split`` (the same rows
            ``split_examples`` would take; a streamed dataset then has no validation).
        columns: our field -> your column, for data in no known shape, e.g.
            ``{"prompt": "question", "response": "answer"}`` (fields: prompt, response, completion, messages,
            conversations, instruction, input, output, text, answer, fact).
        streaming: read ``dataset`` lazily (``load_dataset(streaming=True)``) for data larger than memory:
            no length, shuffling by ``datasets``' buffer (1000 rows, seeded, another order every epoch),
            nothing cached. On several ranks each streams its own share, endlessly, so the run needs
            ``trainer.max_steps`` (else a `DataFormatError` says so).
        num_proc: processes for ``datasets.map``; None: ``num_workers`` (0 or 1: in this process).
        cache_dir: where ``datasets`` caches downloads and tokenizations (default ``HF_DATASETS_CACHE``).

    Example:
        >>> from lightning_lora.data import InstructionDataModule
        >>> dm = InstructionDataModule(train_file="train.jsonl", max_length=512, batch_size=16)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)                                                    # doctest: +SKIP
        >>> dm = InstructionDataModule(dataset="yahma/alpaca-cleaned", val_fraction=0.02)        # doctest: +SKIP

        or in a LightningCLI config::

            data:
              class_path: lightning_lora.data.InstructionDataModule
              init_args: {train_file: train.jsonl, max_length: 512}
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 42,
        num_workers: int = 0,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        packing: bool = False,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        columns: dict[str, str] | None = None,
        streaming: bool = False,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(max_length, int) or max_length < 2:
            raise DataFormatError(f"max_length={max_length!r}; expected a number of tokens >= 2 (a causal LM learns "
                                  "from the second token on), e.g. 256.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataFormatError(f"batch_size={batch_size!r}; expected a positive integer, e.g. 8.")
        if not 0 <= val_fraction < 1:
            raise DataFormatError(f"val_fraction={val_fraction!r}; expected a share in [0, 1), e.g. 0.1 "
                                  "(0 = no validation split).")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise DataFormatError(f"num_workers={num_workers!r}; expected 0 or more.")
        if dataset is not None and (train_file is not None or val_file is not None):
            raise DataFormatError(f"dataset={dataset!r} and train_file/val_file were both given; pass one source: "
                                  "a Hugging Face dataset (dataset, split, val_split) or JSON-lines files.")
        if dataset is None and (streaming or columns or val_split or dataset_config):
            raise DataFormatError("streaming, columns, val_split and dataset_config apply to a Hugging Face dataset; "
                                  "pass dataset (a hub id, a local file or folder) too.")
        if columns is not None and not (isinstance(columns, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
            raise DataFormatError(f"columns={columns!r}; expected a mapping of our field to your column, e.g. "
                                  '{"prompt": "question", "response": "answer"}.')
        if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
            raise DataFormatError(f"num_proc={num_proc!r}; expected a number of processes >= 1, or None.")
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
        self.packing = bool(packing)
        self.dataset = None if dataset is None else str(dataset)
        self.dataset_config = dataset_config
        self.split = split
        self.val_split = val_split
        self.columns = dict(columns) if columns else None
        self.streaming = bool(streaming)
        self.num_proc = num_proc if num_proc is not None else (num_workers or None)
        self.cache_dir = cache_dir
        self._raw: dict[str, tuple[Any, list[int] | None, str]] | None = None
        self._examples: dict[str, list[Example]] | None = None
        self._encoder: ExampleEncoder | None = None
        self.train_dataset: TokenizedDataset | StreamingTokens | None = None
        self.val_dataset: TokenizedDataset | StreamingTokens | None = None
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
        if self._tokenizer is None and self.tokenizer_name is None:
            self._tokenizer = getattr(self._model(), "tokenizer", None)
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self.resolved_tokenizer_name)
            except (OSError, ValueError) as err:  # a local directory without a usable tokenizer
                if isinstance(err, LoRAError):  # a LoRAError (ModelNotFoundError) says it all
                    raise
                reason = " ".join(str(err).split())[:160] or type(err).__name__
                raise DataFormatError(
                    f"tokenizer={self.tokenizer_name!r}: no tokenizer can be loaded from it ({reason}); pass a model "
                    "directory with tokenizer files (tokenizer.json, tokenizer_config.json), a model in the local "
                    "Hugging Face cache, or 'smollm2-135m-instruct'.") from None
        return self._tokenizer

    def _model(self) -> Any:
        """The LightningModule of the attached Trainer (None when there is none)."""
        try:
            return self.trainer.lightning_module if self.trainer is not None else None
        except (AttributeError, RuntimeError):
            return None

    @property
    def resolved_tokenizer_name(self) -> str:
        """The tokenizer name in use: ``tokenizer``, else the attached model's ``model_name_or_path``, else SmolLM2's.

        Example:
            >>> InstructionDataModule().resolved_tokenizer_name
            'smollm2-135m-instruct'
        """
        if self.tokenizer_name is not None:
            return str(self.tokenizer_name)
        name = getattr(self._model(), "model_name_or_path", None)
        return DEFAULT_TOKENIZER if name is None else str(name)

    @property
    def encoder(self) -> ExampleEncoder:
        """The :class:`ExampleEncoder` that turns examples into ``input_ids``/``labels``."""
        if self._encoder is None:
            self._encoder = ExampleEncoder(self.tokenizer, self.use_chat_template, self.system_prompt)
        return self._encoder

    def examples(self, split: str = "train") -> list[Example]:
        """The parsed (untokenized) examples of ``"train"`` or ``"val"``; needs no tokenizer. With ``dataset``
        every row of the split is parsed (a streamed dataset: its first 256 rows).

        Example:
            >>> dm = InstructionDataModule()
            >>> len(dm.examples("train")), len(dm.examples("val"))
            (216, 108)
        """
        if split not in ("train", "val"):
            raise DataFormatError(f"split={split!r}; expected 'train' or 'val'.")
        if self.dataset is not None:
            return self._hf_examples(split)
        if self._examples is None:
            train = read_examples(self.train_path, "train_file")
            val_path = self.val_path
            if val_path is None:
                train, val = split_examples(train, self.val_fraction, self.seed, source=self.train_path)
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
        """Check that the files exist (load a Hugging Face dataset once: downloads land in the cache) and
        resolve the tokenizer once (converts a bundled model on first use)."""
        if self.dataset is not None:
            self._hf_raw()
        else:
            check_file(self.train_path, "train_file")
            if self.val_path is not None:
                check_file(self.val_path, "val_file")
        if self._tokenizer is None and getattr(self._model(), "tokenizer", None) is None:
            resolve_model(self.resolved_tokenizer_name)

    def _split_source(self, split: str) -> str:
        """The file a split comes from, for messages."""
        if split == "val" and self.val_path is None:
            return f"{self.train_path} (its val_fraction={self.val_fraction} validation split)"
        return str(self.train_path if split == "train" else self.val_path)

    # ------------------------------------------------------------------ Hugging Face datasets
    def _hf_raw(self) -> dict[str, tuple[Any, list[int] | None, str]]:
        """``{"train"/"val": (rows, original row numbers or None, name for messages)}``, loaded once; checks
        that no split is empty."""
        if self._raw is not None:
            return self._raw
        assert self.dataset is not None
        d = self.dataset

        def load(split: str) -> Any:
            return load_split(d, split, self.dataset_config, self.streaming, self.cache_dir)

        train = load(self.split)
        raw: dict[str, tuple[Any, list[int] | None, str]] = {}
        if self.val_split is not None:
            raw["train"] = (train, None, f"{d}[{self.split}]")
            raw["val"] = (load(self.val_split), None, f"{d}[{self.val_split}]")
        elif self.streaming or self.val_fraction <= 0:
            raw["train"] = (train, None, f"{d}[{self.split}]")
        else:
            self._check_not_empty(train, f"{d}[{self.split}]")
            train_rows, val_rows = split_indices(len(train), self.val_fraction, self.seed, f"dataset={d!r}",
                                                 "pass val_split")
            raw["train"] = (train.select(train_rows), train_rows, f"{d}[{self.split}]")
            raw["val"] = (train.select(val_rows), val_rows, f"{d}[{self.split}] (val_fraction={self.val_fraction})")
        for rows, _, name in raw.values():
            self._check_not_empty(rows, name)
        self._raw = raw
        return raw

    @staticmethod
    def _check_not_empty(rows: Any, name: str) -> None:
        empty = len(rows) == 0 if hasattr(rows, "__len__") else next(iter(rows), None) is None
        if empty:
            raise DataFormatError(empty_split_message(name))

    def _hf_shape(self, rows: Any, name: str) -> str:
        names = column_names(rows)
        mapping = apply_columns(self.columns, names, self.dataset or name)
        renamed = [c for c in names if c not in mapping.values()] + list(mapping)
        return detect_shape(renamed, self.dataset or name)

    def _row_encoder(self, split: str, tokenize: bool = True) -> tuple[Any, RowEncoder]:
        rows, numbers, name = self._hf_raw()[split]
        return rows, RowEncoder(self.encoder if tokenize else None, self._hf_shape(rows, name), self.columns, name,
                                numbers, self.max_length)

    def _hf_examples(self, split: str) -> list[Example]:
        """The examples of a split of ``dataset`` (a streamed one: its first rows, for `eval_examples`)."""
        if split not in self._hf_raw():
            return []
        rows, fn = self._row_encoder(split, tokenize=False)
        if self.streaming:
            out = []
            for i, row in enumerate(rows):
                if i >= STREAM_EVAL_ROWS:
                    break
                out.append(fn.example(row, i))
            return out
        return [fn.example(row, i) for i, row in enumerate(rows)]

    def _hf_tokenize(self, split: str) -> tuple[TokenizedDataset | StreamingTokens, SplitStats]:
        """Tokenize a split of ``dataset`` with ``datasets.map`` (cached by fingerprint; lazily for a stream)."""
        raw = self._hf_raw()
        name = raw[split][2] if split in raw else f"{self.dataset}[{self.val_split or self.split}]"
        stats = SplitStats(name)
        if split not in raw:
            return TokenizedDataset([]), stats
        rows, fn = self._row_encoder(split)
        if self.streaming:
            tokenized = encode_dataset(rows, fn, "", None, f"Tokenizing {name}")
            if split == "train":  # after the map, so that errors name rows in the stream's own order
                tokenized = tokenized.shuffle(seed=self.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
            if self.trainer is not None and self.trainer.world_size > 1:
                if split == "train":
                    if self.trainer.max_steps is None or self.trainer.max_steps < 0:
                        raise DataFormatError(
                            f"dataset={self.dataset!r} with streaming=True on {self.trainer.world_size} ranks needs "
                            "trainer.max_steps: each rank streams its own share of the rows, and a rank whose share "
                            "ends first would leave the others waiting; set --trainer.max_steps N (the stream then "
                            "repeats until N steps) and an integer --trainer.val_check_interval.")
                    tokenized = tokenized.repeat(None)   # endless: every rank steps until max_steps
                tokenized = shard_for_rank(tokenized, self.trainer.global_rank, self.trainer.world_size)
            return StreamingTokens(tokenized, self.max_length, packing=self.packing), stats
        fingerprint = hf_options_fingerprint(rows._fingerprint, tokenizer_fingerprint(self.tokenizer), fn.shape,
                                             self.columns, self.max_length, self.encoder.chat, self.system_prompt)
        tokenized = encode_dataset(rows, fn, fingerprint, self.num_proc, f"Tokenizing {name}")
        whole, need, keep = tokenized["whole"], tokenized["need"], tokenized["keep"]
        for w, n, k in zip(whole, need, keep):
            stats.add(w, None if n < 0 else n, k, self.max_length)
        kept = tokenized.select([i for i, k in enumerate(keep) if k]).select_columns(["input_ids", "labels"])
        return TokenizedDataset(kept), stats

    def _tokenize(self, split: str) -> tuple[TokenizedDataset | StreamingTokens, SplitStats]:
        """Encode, truncate and filter one split: a row is kept only if it has a token to learn."""
        if self.dataset is not None:
            return self._hf_tokenize(split)
        return tokenize_examples(self.examples(split), self.encoder, self.max_length, self._split_source(split))

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the data the stage needs (once; later calls reuse it).

        Examples longer than ``max_length`` are truncated, rows left with no token to learn after the
        causal shift (``labels[1:]`` all -100) are dropped, and one warning counts both.

        Raises:
            DataFormatError: a bad line, a conversation the chat template cannot render, or a split
                with no example left (the message names the file, how many examples were too long
                for ``max_length``, and the ``max_length`` that keeps them).
        """
        wanted = {"fit": ["train", "val"], None: ["train", "val"], "validate": ["val"], "test": ["val"],
                  "predict": ["predict"]}.get(stage, ["train", "val"])
        done: dict[str, tuple[TokenizedDataset | StreamingTokens, SplitStats]] = {}
        for split in wanted:
            if getattr(self, f"{split}_dataset") is not None:
                continue
            if split == "predict":
                self.predict_dataset = TokenizedDataset(
                    [{"input_ids": self.encoder.encode_prompt(ex["messages"], ex["source"]), "index": i}
                     for i, ex in enumerate(self.eval_examples("val"))])
                continue
            dataset, stats = self._tokenize(split)
            if stats.total and isinstance(dataset, TokenizedDataset) and not len(dataset):
                raise stats.empty_error(split, self.max_length)
            done[split] = (dataset, stats)
        for split, (dataset, _) in done.items():
            setattr(self, f"{split}_dataset", dataset)
        warn_dropped([stats for _, stats in done.values()], list(done), self.max_length)

    def _loader(self, dataset: TokenizedDataset | StreamingTokens, shuffle: bool, padding_side: str = "right",
                packed: bool = False) -> DataLoader:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        collate: PadCollator | PackedCollator = PadCollator(pad, padding_side)
        if isinstance(dataset, StreamingTokens):  # shuffled (and packed) by the stream itself
            return DataLoader(dataset, batch_size=self.batch_size, collate_fn=PackedCollator(pad) if dataset.packing
                              else collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        if packed:
            items = dataset.items if isinstance(dataset.items, list) else dataset.items.to_list()
            dataset = TokenizedDataset(pack_examples(items, self.max_length))
            collate = PackedCollator(pad)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled (with a generator seeded by ``seed``), right-padded training batches; with ``packing``,
        batches of ``batch_size`` packed rows (`lightning_lora.data.packing`)."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, shuffle=True, packed=self.packing)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order (an empty list when there is no validation data); packed rows with
        ``packing`` (the validation loss is token-weighted either way, so it is the same number)."""
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        if isinstance(self.val_dataset, TokenizedDataset) and not len(self.val_dataset):
            return []
        return self._loader(self.val_dataset, shuffle=False, packed=self.packing)

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


__all__ = ["InstructionDataModule"]
