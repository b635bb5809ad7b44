"""`lightning-lora fit|validate|test|predict`: a LightningCLI with TensorBoard and the LoRA callback.

Example:
    $ lightning-lora fit --config configs/quickstart.yaml
    $ lightning-lora fit --config configs/quickstart.yaml --trainer.max_steps 10 --print_config
    $ lightning-lora fit --config my.yaml --optimizer AdamW --optimizer.lr 2e-4 --lr_scheduler StepLR ...

The model and data are given by class path in the YAML (`model.class_path`, `data.class_path`),
the `LoRA` callback under `trainer.callbacks`. User errors (a missing file, a bad data line, a
model that is not available offline, a LoRA target that matches nothing) print one line and exit
with code 2.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

class LoRALightningCLI(LightningCLI):
    """LightningCLI whose default logger is TensorBoard (`runs/<name>`), for LoRA runs.

    Example:
        >>> LoRALightningCLI(args=["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs", "name": "lora"}}})


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: shown as one line, no traceback."""
    from lightning_lora.hub import ModelNotFoundError
    from lightning_lora.surgery import LoRAError

    from lightning_lora.config import LoRAConfigError

    types: list[type[BaseException]] = [LoRAError, LoRAConfigError, ModelNotFoundError, FileNotFoundError]
    try:
        from lightning_lora.data import DataFormatError

        types.append(DataFormatError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _user_error(err: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """`err` if it is the user's to fix, else the user error behind it: jsonargparse re-raises an
    exception from a class's `__init__` (e.g. the model's) as a ValueError "Does not validate against
    any of the Union subtypes" chained to the original with `from`."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, types):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


def run_lightning_cli(argv: list[str]) -> int:
    """Run a LightningCLI subcommand; returns the exit code (2 for user errors, shown in one line)."""
    types = _user_error_types()
    try:
        LoRALightningCLI(args=argv)
    except (ValueError, *types) as err:
        cause = _user_error(err, types)
        if cause is None:
            raise
        print(f"lightning-lora {argv[0]}: error: {cause}", file=sys.stderr)
        return 2
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    return 0


__all__ = ["LoRALightningCLI", "TensorBoardLogger", "run_lightning_cli"]
