"""Ready-made DataModules and the bundled demo data.

| module | what lives there |
| --- | --- |
| `formats` | the JSON-lines file format: `Example`, `parse_example`, `read_examples`, `split_examples` / `split_indices` |
| `encoding` | `ExampleEncoder` (chat template, loss masks), `IGNORE_INDEX`, `count_targets` |
| `collate` | `TokenizedDataset`, `PadCollator` (dynamic padding) |
| `packing` | `pack_examples`, `PackedCollator` (padding-free packed rows) |
| `hf` | Hugging Face `datasets` (optional extra `data`): `load_split`, column shapes (`detect_shape`, `row_to_example`, `columns`), tokenizing with `datasets.map` (`RowEncoder`, `encode_dataset`), `StreamingTokens` |
| `truncation` | what `max_length` does to a split: truncation, rows with no token to learn dropped, `SplitStats` (the warning, the empty-split error), `tokenize_examples` |
| `instruction` | `InstructionDataModule` (JSON-lines files or `dataset=`) |

Example:
    >>> from lightning_lora.data import InstructionDataModule
    >>> dm = InstructionDataModule()                       # bundled "Brindlewhisk Robotics" facts
    >>> dm.eval_examples()[0]["answer"]
    'Odalys Penhallow'
"""

from lightning_lora.data.collate import PadCollator, TokenizedDataset
from lightning_lora.data.encoding import (
    IGNORE_INDEX,
    ExampleEncoder,
    count_targets,
    min_length_for_target,
)
from lightning_lora.data.formats import (
    BUNDLED_TRAIN_FILE,
    BUNDLED_VAL_FILE,
    Example,
    check_file,
    parse_example,
    read_examples,
    split_examples,
)
from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.errors import DataFormatError

__all__ = [
    "BUNDLED_TRAIN_FILE",
    "BUNDLED_VAL_FILE",
    "IGNORE_INDEX",
    "DataFormatError",
    "Example",
    "ExampleEncoder",
    "InstructionDataModule",
    "PadCollator",
    "TokenizedDataset",
    "check_file",
    "count_targets",
    "min_length_for_target",
    "parse_example",
    "read_examples",
    "split_examples",
]
