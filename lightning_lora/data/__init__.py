"""Ready-made DataModules and the bundled demo data.

Example:
    >>> from lightning_lora.data import InstructionDataModule
    >>> dm = InstructionDataModule()                       # bundled "Brindlewhisk Robotics" facts
    >>> dm.eval_examples()[0]["answer"]
    'Odalys Penhallow'
"""

from lightning_lora.data.instruction import (
    BUNDLED_TRAIN_FILE,
    BUNDLED_VAL_FILE,
    IGNORE_INDEX,
    DataFormatError,
    Example,
    ExampleEncoder,
    InstructionDataModule,
    PadCollator,
    TokenizedDataset,
    parse_example,
    read_examples,
    split_examples,
)

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
    "parse_example",
    "read_examples",
    "split_examples",
]
