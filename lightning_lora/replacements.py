"""Replacements of attributes of objects the package does not own, in one place, each with its undo.

Lightning's callbacks (`finetuning.py`, `pruning.py`, `weight_averaging.py`) act in hooks and replace
nothing; where Lightning or torch has no hook for what LoRA must do (a checkpoint path, the moment right
after `configure_model`, a module-wide dtype cast), the package replaces a method or the class of an object
it does not own. Every such replacement goes through this module: it is recorded with its owner (the module
of the package that made it), the missing hook that makes it necessary, and its undo.

* `replace_attribute(target, name, value, ...)`: `value` becomes the instance attribute `name` of `target`
  (a method, a function, a module global), shadowing the class's or replacing the instance's own.
* `replace_class(target, cls, ...)`: `target.__class__ = cls` (e.g. a subclass that overrides `_apply`).
* `Replacement.undo()` restores what was there; `undo_replacements(target, owner=...)` undoes every
  replacement of one object, or every replacement an owner made anywhere (`target=None`).

The records live on the target itself (one list in its `__dict__`, `RECORDS_ATTR`), so they are copied
and pickled with it (`copy.deepcopy` re-points them to the copy) and die with it; a weak index finds the
targets of an owner (a copy's records are found through the copy: `replacements(copy)`). Undo in the reverse order of replacing: undoing one under a newer replacement of the
same attribute hands its restore point to the newer one (whose function may still call it).

No Lightning import: any module of the package may use it.

Example:
    >>> class Strategy:
    ...     def save(self) -> str:
    ...         return "saved"
    >>> s = Strategy()
    >>> r = replace_attribute(s, "save", lambda: "adapters only", owner="demo",
    ...                       missing_hook="no hook sees every checkpoint dict")
    >>> s.save(), [x.name for x in replacements(s)]
    ('adapters only', ['save'])
    >>> r.undo()
    >>> s.save(), replacements(s)
    ('saved', [])
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

#: the `__dict__` key of a target that holds its list of `Replacement` records
RECORDS_ATTR = "_lightning_lora_replacements"

#: id(target) -> target, for the targets that hold records (weak: an index, never what keeps a target alive)
_TARGETS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class Replacement:
    """One replacement of an attribute of an object the package does not own.

    Attributes:
        target: the object whose attribute was replaced.
        name: the attribute (`"__class__"` for `replace_class`).
        value: what was put there.
        owner: the module of the package that made it (e.g. `"lightning_lora.callback"`).
        missing_hook: the Lightning / torch hook whose absence makes the replacement necessary (one line).
        previous: the target's own value before (its class for `"__class__"`); None when it had none.
        had_own: whether the target had its own instance attribute `name` before (else the class's showed).
        active: False once undone.

    Example:
        >>> class Box: pass
        >>> r = replace_attribute(Box(), "f", len, owner="demo", missing_hook="none: an example")
        >>> r.active, r.had_own
        (True, False)
    """

    target: Any
    name: str
    value: Any
    owner: str
    missing_hook: str
    previous: Any = None
    had_own: bool = False
    active: bool = True

    def undo(self) -> None:
        """Put back what was there before (nothing happens when already undone).

        Example:
            >>> class Box: pass
            >>> box = Box()
            >>> r = replace_attribute(box, "f", len, owner="demo", missing_hook="none: an example")
            >>> r.undo(); r.undo(); hasattr(box, "f")
            False
        """
        if not self.active:
            return
        records = _records(self.target)
        newer = [r for r in records[records.index(self) + 1:] if r.active and r.name == self.name] \
            if self in records else []
        if newer:  # replaced again since: the newer one restores what this one found
            newer[0].previous, newer[0].had_own = self.previous, self.had_own
        elif self.name == "__class__":
            self.target.__class__ = self.previous
        elif self.had_own:
            self.target.__dict__[self.name] = self.previous
        else:
            self.target.__dict__.pop(self.name, None)
        self.active = False
        if self in records:
            records.remove(self)
        if not records:
            self.target.__dict__.pop(RECORDS_ATTR, None)
            _TARGETS.pop(id(self.target), None)


def _records(target: Any) -> list[Replacement]:
    return getattr(target, "__dict__", {}).get(RECORDS_ATTR, [])


def _record(target: Any, record: Replacement) -> Replacement:
    if not hasattr(target, "__dict__"):
        raise TypeError(f"{type(target).__name__} has no __dict__; its attributes cannot be replaced")
    target.__dict__.setdefault(RECORDS_ATTR, []).append(record)
    _TARGETS[id(target)] = target
    return record


def _check_reason(owner: str, missing_hook: str) -> None:
    if not owner or not missing_hook.strip():
        raise ValueError("a replacement needs its owner and the missing hook that makes it necessary")


def replace_attribute(target: Any, name: str, value: Any, *, owner: str, missing_hook: str) -> Replacement:
    """Make `value` the instance attribute `name` of `target` (written to its `__dict__`, so no custom
    `__setattr__` runs), and record it.

    Args:
        target: an object the package does not own (a strategy, a module, a Python module for a global).
        name: the attribute; not `"__class__"` (`replace_class`).
        value: the replacement (a function called without `self`, a bound method, any value).
        owner: the module of the package that replaces it.
        missing_hook: the hook whose absence makes it necessary, in one line.

    Returns:
        The record; `record.undo()` restores the attribute.

    Example:
        >>> import types
        >>> mod = types.ModuleType("m"); mod.x = 1
        >>> r = replace_attribute(mod, "x", 2, owner="demo", missing_hook="none: an example")
        >>> mod.x, (r.undo(), mod.x)[1]
        (2, 1)
    """
    if name == "__class__":
        raise ValueError("use replace_class to replace the class of an object")
    _check_reason(owner, missing_hook)
    own = getattr(target, "__dict__", {})
    record = Replacement(target, name, value, owner, missing_hook, previous=own.get(name), had_own=name in own)
    _record(target, record)
    target.__dict__[name] = value
    return record


def replace_class(target: Any, cls: type, *, owner: str, missing_hook: str) -> Replacement:
    """Give `target` the class `cls` (usually a subclass of its own that overrides one method), and record it.

    Returns:
        The record; `record.undo()` gives `target` its class back.

    Example:
        >>> from torch import nn
        >>> class Guarded(nn.Linear): pass
        >>> layer = nn.Linear(2, 2)
        >>> r = replace_class(layer, Guarded, owner="demo", missing_hook="no hook before Module._apply casts")
        >>> type(layer).__name__, (r.undo(), type(layer).__name__)[1]
        ('Guarded', 'Linear')
    """
    _check_reason(owner, missing_hook)
    record = Replacement(target, "__class__", cls, owner, missing_hook, previous=type(target), had_own=True)
    _record(target, record)
    target.__class__ = cls
    return record


def replacements(target: Any = None, *, owner: str | None = None, name: str | None = None) -> list[Replacement]:
    """The active replacements of `target` (oldest first), or of every target with `target=None`, optionally
    only those of `owner` and of attribute `name`.

    Example:
        >>> class Box: pass
        >>> box = Box()
        >>> _ = replace_attribute(box, "f", len, owner="demo", missing_hook="none: an example")
        >>> [(r.owner, r.name) for r in replacements(box, owner="demo")]
        [('demo', 'f')]
        >>> undo_replacements(box)
        1
    """
    targets = [target] if target is not None else list(_TARGETS.values())
    return [r for t in targets for r in list(_records(t))
            if r.active and (owner is None or r.owner == owner) and (name is None or r.name == name)]


def find_replacement(target: Any, name: str, *, owner: str | None = None) -> Replacement | None:
    """The newest active replacement of `target.name` (by `owner`), or None.

    Example:
        >>> class Box: pass
        >>> find_replacement(Box(), "f") is None
        True
    """
    found = replacements(target, owner=owner, name=name)
    return found[-1] if found else None


def undo_replacements(target: Any = None, *, owner: str | None = None) -> int:
    """Undo the replacements of `target` (every target with None), newest first, only `owner`'s when given;
    returns how many were undone.

    Example:
        >>> class Box: pass
        >>> box = Box()
        >>> _ = replace_attribute(box, "f", len, owner="demo.undo", missing_hook="none: an example")
        >>> _ = replace_attribute(box, "g", abs, owner="demo.undo", missing_hook="none: an example")
        >>> undo_replacements(owner="demo.undo"), hasattr(box, "f"), hasattr(box, "g")
        (2, False, False)
    """
    found = replacements(target, owner=owner)
    for record in reversed(found):
        record.undo()
    return len(found)


__all__ = ["RECORDS_ATTR", "Replacement", "find_replacement", "replace_attribute", "replace_class", "replacements",
           "undo_replacements"]
