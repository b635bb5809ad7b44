"""Every rule that maps module names to options, in one place: ours and PEFT's.

Ours (`LoRAConfig`'s `target_modules`, `exclude_modules`, `modules_to_save`): a list entry matches a
module path when it equals the path or is a suffix of it on a `.` boundary; one string is a regular
expression that must match the whole path. `rank_pattern` / `alpha_pattern` keys are regexes matched
against the end of the path on a `.` boundary (PEFT's rule, the same in both).

PEFT's rules (peft 0.21, `check_target_module_exists` and `ModulesToSaveWrapper` matching) differ in
two places, and are needed to translate adapter files exactly: `modules_to_save` entries match any
suffix (no `.` boundary), and `layers_to_transform` / `layers_pattern` restrict targets by layer
index.

Nothing here imports torch: the functions take names (strings).

Example:
    >>> name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    True
    >>> name_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    False
    >>> peft_selects("model.layers.1.self_attn.q_proj", ["q_proj"], layers_to_transform=[0])
    False
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal


def name_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """Whether a module path matches `patterns` (our rule).

    A list/tuple matches when one entry equals the path or is a suffix of it on a `.` boundary
    (`"q_proj"` matches `model.layers.0.self_attn.q_proj`, not `model.xq_proj`). A single string is
    a regular expression that must match the whole path. None matches nothing.

    Example:
        >>> name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
        True
        >>> name_matches("model.layers.0.self_attn.q_proj", r".*\\.0\\..*proj")
        True
    """
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_key(name: str, patterns: Iterable[str]) -> str | None:
    """The first key of `rank_pattern`/`alpha_pattern` that matches `name` (PEFT's rule: the key is a
    regex matched against the end of the path on a `.` boundary), or None.

    Example:
        >>> pattern_key("model.layers.0.mlp.down_proj", ["q_proj", "down_proj"])
        'down_proj'
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def outermost(names: Iterable[str]) -> list[str]:
    """The names that are not inside another name of the list (`a.b` is inside `a`), in order.

    Example:
        >>> outermost(["score", "score.dense", "model.norm"])
        ['score', 'model.norm']
    """
    names = list(names)
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def is_inside(name: str, roots: Iterable[str]) -> bool:
    """Whether `name` is one of `roots` or lies inside one of them.

    Example:
        >>> is_inside("score.weight", ["score"]), is_inside("scores", ["score"])
        (True, False)
    """
    return any(name == r or name.startswith(r + ".") for r in roots)


def modules_to_save_matches(names: Iterable[str], patterns: Sequence[str] | None,
                            rule: Literal["ours", "peft"] = "ours") -> list[str]:
    """The outermost modules of `names` that `modules_to_save=patterns` selects.

    `rule="ours"`: `name_matches` (a `.` boundary); `rule="peft"`: PEFT's, where an entry matches any
    name that ends with it (`"score"` also matches `"xscore"`).

    Example:
        >>> names = ["model", "model.xscore", "score", "score.dense"]
        >>> modules_to_save_matches(names, ["score"]), modules_to_save_matches(names, ["score"], rule="peft")
        (['score'], ['model.xscore', 'score'])
    """
    if not patterns:
        return []
    if rule == "ours":
        hits = [n for n in names if name_matches(n, patterns)]
    else:
        hits = [n for n in names if any(n.endswith(m) for m in patterns)]
    return outermost(hits)


def peft_selects(name: str, targets: str | Sequence[str], exclude: str | Sequence[str] | None = None,
                 modules_to_save: Sequence[str] | None = None, layers_to_transform: Any = None,
                 layers_pattern: Any = None) -> bool:
    """PEFT's `check_target_module_exists` (peft 0.21): whether PEFT would put LoRA on module `name`.

    Example:
        >>> peft_selects("model.layers.0.self_attn.q_proj", ["q_proj"], exclude=["layers.0.self_attn.q_proj"])
        False
    """
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    found = any(name.endswith(f".{t}") for t in targets)
    using_indexes = layers_to_transform is not None and (
        len(layers_to_transform) != 0 if isinstance(layers_to_transform, list) else True)
    if using_indexes and found:
        match = None
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers_to_transform if isinstance(layers_to_transform, int) else idx in layers_to_transform
    return found


def peft_targets(names: Iterable[str], targets: str | Sequence[str], exclude: str | Sequence[str] | None = None,
                 modules_to_save: Sequence[str] | None = None, layers_to_transform: Any = None,
                 layers_pattern: Any = None) -> list[str]:
    """The names PEFT would adapt (`peft_selects` over a list), in order.

    Example:
        >>> peft_targets(["a.q_proj", "a.k_proj", "b.q_proj"], ["q_proj"])
        ['a.q_proj', 'b.q_proj']
    """
    return [n for n in names if peft_selects(n, targets, exclude, modules_to_save, layers_to_transform,
                                             layers_pattern)]


def suffix_summary(names: Iterable[str], limit: int = 30) -> str:
    """Module names deduplicated by their last component, in first-seen order (for error messages).

    Example:
        >>> suffix_summary(["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.v_proj"])
        'q_proj, v_proj'
    """
    seen: list[str] = []
    for n in names:
        last = n.rsplit(".", 1)[-1] if n else n
        if last not in seen:
            seen.append(last)
    more = f", ... ({len(seen) - limit} more)" if len(seen) > limit else ""
    return ", ".join(seen[:limit]) + more


__all__ = ["is_inside", "modules_to_save_matches", "name_matches", "outermost", "pattern_key", "peft_selects",
           "peft_targets", "suffix_summary"]
