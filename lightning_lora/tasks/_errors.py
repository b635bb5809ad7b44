"""The user error of the task modules and callbacks (kept apart so every module of `tasks` can raise it)."""

from __future__ import annotations

from lightning_lora.errors import LoRAError


class TaskConfigError(LoRAError):
    """A bad argument of a task module or callback, or a model and data that do not fit together.

    A `LoRAError` (so a `ValueError`): the `lightning-lora` command shows it as one line, exit code 2.

    Example:
        >>> issubclass(TaskConfigError, ValueError)
        True
    """
