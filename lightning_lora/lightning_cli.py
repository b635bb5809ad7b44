"""`lightning-lora fit|validate|test|predict`: a LightningCLI with TensorBoard and the LoRA callback.

Example:
    $ lightning-lora fit --config configs/quickstart.yaml
    $ lightning-lora fit --config configs/quickstart.yaml --trainer.max_steps 10 --print_config
    $ lightning-lora fit --config my.yaml --optimizer AdamW --optimizer.lr 2e-4 --lr_scheduler StepLR ...

The model and data are given by class path in the YAML (`model.class_path`, `data.class_path`),
the `LoRA` callback under `trainer.callbacks`. User errors (a typo in a YAML key, a missing file, a
bad data line, a model that is neither local nor downloadable, a LoRA target that matches nothing) print one
line and exit with code 2, through the shared runner of `lightning_lora.command_line`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
from types import MethodType
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerTypeTuple,
    _global_add_class_path,
    instantiate_class,
)
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.rank_zero import _warn
from torch.optim import Optimizer

from lightning_lora.command_line import LIGHTNING_SUBCOMMANDS, one_line, run_guarded, user_error
from lightning_lora.errors import CommandError
from lightning_lora.replacements import replace_attribute

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_OPTION = re.compile(r"^Option '([^']+)' is not accepted")
_SUBCOMMAND_OPTION = re.compile(r"^Subcommand '([^']+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"^[Uu]nrecognized arguments: (--[^\s=]+)")
_NOISE = ("Does not validate against any of the Union subtypes",)


class LoRALightningCLI(LightningCLI):
    """LightningCLI whose default logger is TensorBoard (`runs/<name>`), for LoRA runs.

    Built with `parser_kwargs={"exit_on_error": False}` (as `lightning-lora` does), a bad argument
    or YAML key raises a `CommandError` whose one-line message names the key (and the closest valid
    one) instead of printing the usage.

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

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """LightningCLI's `--optimizer` / `--lr_scheduler`, built when the Trainer calls
        `configure_optimizers` rather than when the CLI starts: a network built in `configure_model`
        (as `CausalLM` builds it) has no parameters before, and LightningCLI's own eager build fails
        with "optimizer got an empty parameter list". The optimizer then also sees the adapters the
        `LoRA` callback injected. The classes are read from the parsed config (`automatic_optimizer_inits`)
        and built with LightningCLI's `instantiate_class`, as LightningCLI would."""
        inits = self.automatic_optimizer_inits(subcommand)
        if inits is None:  # no --optimizer given: the module's own configure_optimizers stays
            return
        optimizer_init, scheduler_init = inits
        if is_overridden("configure_optimizers", self.model):
            _warn(f"`{self.model.__class__.__name__}.configure_optimizers` will be overridden by "
                  f"`{self.__class__.__name__}.configure_optimizers`.")
        configure = self.configure_optimizers

        def configure_optimizers(module: LightningModule) -> Any:
            optimizer = instantiate_class(module.parameters(), optimizer_init)
            scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
            return configure(module, optimizer, scheduler)

        # as LightningCLI itself does (an instance attribute), recorded with its undo
        replace_attribute(self.model, "configure_optimizers", MethodType(configure_optimizers, self.model),
                          owner=__name__, missing_hook=("LightningCLI builds --optimizer over the module's parameters "
                                                        "at start-up, before configure_model, with no lazy form"))

    def automatic_optimizer_inits(self, subcommand: str | None) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """The `{"class_path", "init_args"}` of the optimizer and lr scheduler given on the command line or in
        the config (`--optimizer`, `--lr_scheduler`: LightningCLI's 'AUTOMATIC' groups), or None when no
        optimizer was given (or `auto_configure_optimizers=False`).

        Raises:
            MisconfigurationException: more than one optimizer or scheduler group is 'AUTOMATIC' (as LightningCLI).

        Example:
            >>> cli.automatic_optimizer_inits("fit")   # doctest: +SKIP
            ({'class_path': 'torch.optim.AdamW', 'init_args': {'lr': 0.01, ...}}, None)
        """
        if not self.auto_configure_optimizers:
            return None
        parser = self._parser(subcommand)

        def automatic(register: dict[str, tuple[Any, str]], base: Any) -> list[str]:
            return [key for key, (classes, link_to) in register.items() if link_to == "AUTOMATIC" and any(
                issubclass(c, base) for c in (classes if isinstance(classes, tuple) else (classes,)))]

        optimizers = automatic(parser._optimizers, Optimizer)
        schedulers = automatic(parser._lr_schedulers, LRSchedulerTypeTuple)
        if not optimizers:
            return None
        if len(optimizers) > 1 or len(schedulers) > 1:
            raise MisconfigurationException(
                f"`{self.__class__.__name__}.add_configure_optimizers_method_to_model` expects at most one optimizer "
                f"and one lr_scheduler to be 'AUTOMATIC', but found {optimizers + schedulers}.")

        def init_of(register: dict[str, tuple[Any, str]], key: str) -> dict[str, Any] | None:
            init = self._get(self.config_init, key)
            classes = register[key][0]
            return init if isinstance(classes, tuple) else _global_add_class_path(classes, init)

        optimizer_init = init_of(parser._optimizers, optimizers[0])
        if not optimizer_init:  # registered automatically but not given
            return None
        return optimizer_init, (init_of(parser._lr_schedulers, schedulers[0]) if schedulers else None)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does; a parse error becomes a one-line `CommandError`."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
            subcommand = next((a for a in argv if a in LIGHTNING_SUBCOMMANDS), None)
            raise CommandError(argument_error_line(err, parser, subcommand)) from None


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        out.append(cause)
        cause = cause.__cause__ or cause.__context__
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else ""


def _class_options(class_path: str) -> list[str]:
    """The `__init__` argument names of a class given by dotted path (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except Exception:  # noqa: BLE001 - a short class name, a class that does not import: no suggestion
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _subcommand_options(parser: argparse.ArgumentParser | None, subcommand: str | None) -> list[str]:
    """The option names (`trainer.max_steps`, `data`, ...) of a LightningCLI subcommand's parser."""
    try:
        sub = parser._subcommands_action._name_parser_map[subcommand]  # type: ignore[union-attr]
        return [a.dest for a in sub._actions if a.dest and a.dest not in ("help", "config")]
    except Exception:  # noqa: BLE001 - jsonargparse internals changed: no suggestion
        return []


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def argument_error_line(err: BaseException, parser: argparse.ArgumentParser | None = None,
                        subcommand: str | None = None) -> str:
    """One line for a LightningCLI (jsonargparse) parse error: the key it is about, what was wrong,
    the closest valid key for a typo, and where to see the options.

    jsonargparse reports an unknown key of a class as a nest of messages (`Parser key "data": Does
    not validate against any of the Union subtypes ... Problem with given class_path ...: Option
    'max_lenght' is not accepted ...`), chained with `raise ... from`; this walks the chain.

    Example:
        >>> err = argparse.ArgumentError(None, "Subcommand 'fit' does not accept option 'trainr'")
        >>> argument_error_line(err, subcommand="fit")
        'trainr is not an option of lightning-lora fit (see lightning-lora fit --help)'
    """
    path: list[str] = []
    class_path: str | None = None
    seen_lines: set[str] = set()
    leaf = ""
    for cause in _chain(err):
        line = _first_line(cause)
        if not line or line in seen_lines:
            continue
        seen_lines.add(line)
        key, cls = _PARSER_KEY.match(line), _CLASS_PATH.match(line)
        if key:
            path.append(key.group(1))
        elif cls:
            class_path = cls.group(1)
            path.append("init_args")
        elif line not in _NOISE:
            leaf = line
    help_hint = f" (see lightning-lora {subcommand} --help)" if subcommand else " (see lightning-lora --help)"
    option, sub_option, flag = _OPTION.match(leaf), _SUBCOMMAND_OPTION.match(leaf), _UNRECOGNIZED.match(leaf)
    if flag and subcommand:
        name = flag.group(1)
        flags = ["--" + dest for dest in _subcommand_options(parser, subcommand)]
        return f"{name} is not an option of lightning-lora {subcommand}{_did_you_mean(name, flags)}{help_hint}"
    if sub_option:
        name = sub_option.group(2)
        return (f"{name} is not an option of lightning-lora {sub_option.group(1)}"
                f"{_did_you_mean(name, _subcommand_options(parser, sub_option.group(1)))}{help_hint}")
    if option and class_path:
        name = option.group(1)
        where = ".".join([*path, name])
        return (f"{where} is not an option of {class_path}{_did_you_mean(name, _class_options(class_path))}"
                f"{help_hint}")
    while path and path[-1] == "init_args":
        path.pop()
    where = ".".join(path)
    if class_path:
        where += f" ({class_path})"
    message = leaf or _first_line(err) or type(err).__name__
    return f"{where}: {message}{help_hint}" if where else f"{message}{help_hint}"


def run_lightning_cli(argv: list[str] | None = None) -> int:
    """Run a LightningCLI subcommand; returns the exit code (2 for user errors, shown in one line).

    Args:
        argv: the arguments after `lightning-lora` (`["fit", "--config", ...]`); None reads the
            command line (LightningCLI then parses `sys.argv` itself).

    Example:
        >>> run_lightning_cli(["fit", "--config", "configs/quickstart.yaml"])   # doctest: +SKIP
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    prog = f"lightning-lora {args[0]}" if args and args[0] in LIGHTNING_SUBCOMMANDS else "lightning-lora"

    def body() -> None:
        try:
            LoRALightningCLI(args=argv, parser_kwargs={"exit_on_error": False})
        except MisconfigurationException as err:
            if user_error(err) is not None:  # ours, chained behind Lightning's: shown as it is
                raise
            raise CommandError(lightning_error_line(err)) from None

    return run_guarded(prog, body)


#: Lightning configuration errors whose message does not say what to change: (words in it, the fix)
LIGHTNING_FIXES = (
    ("has no logger", ("give the Trainer a logger (remove --trainer.logger false / `logger: false` from the config) "
                       "or remove the callback that logs")),
)


def lightning_error_line(err: MisconfigurationException) -> str:
    """One line for a configuration error that Lightning raised during the run (a callback that needs a
    logger, a bad Trainer option, ...): Lightning's message and what to change.

    Example:
        >>> lightning_error_line(MisconfigurationException(
        ...     "Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger."))   # doctest: +ELLIPSIS
        'Lightning: Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger. Fix: give the ...'
    """
    message = one_line(err)
    fix = next((fix for words, fix in LIGHTNING_FIXES if words in message),
               "change the Trainer, callback, model or data option it names in the config or on the command line "
               "(--print_config shows the resolved config)")
    return f"Lightning: {message}{'' if message.endswith('.') else '.'} Fix: {fix}."


__all__ = ["LIGHTNING_FIXES", "LoRALightningCLI", "TensorBoardLogger", "argument_error_line", "lightning_error_line",
           "run_lightning_cli"]
