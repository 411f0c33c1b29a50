"""The layers, checked on the source: every import statement (at the top of a module or inside a
function: a lazy import is still a dependency) is read with ``ast``.

- core (``superlinear``) never imports the plugins or the CLI;
- the kernels import only the standard library, torch, triton, numpy and each other;
- no import cycle between the modules of core, nor between those of the plugins and the CLI,
  counting ``from superlinear.pkg import name`` as a use of the package (its ``__init__`` runs),
  so a package and its own submodules cannot import each other round;
- plugins are leaves: no plugin imports another one (they meet in core: the API, the bus, hooks);
- no module reaches into another one's privates: ``obj._name`` on anything but ``self`` / ``cls``
  is refused when ``_name`` is a private that another of our modules defines and this one does not.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "superlinear", "plugins": "superlinear.plugins", "cli": "superlinear.cli"}
KERNEL_DEPENDENCIES = {"torch", "triton", "numpy"}


def source_modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = source_modules()


# The top packages hold nothing but light entry points (``superlinear.connect``); every module
# reads ``superlinear.errors`` & co through them, so they are no edge of their own.
ROOTS = {"superlinear", "superlinear.plugins", "superlinear.cli"}


def imported_names(module: str, path: Path, *, packages: bool = False) -> set[str]:
    """Dotted names ``module`` imports; ``from pkg import sub`` names the submodule ``pkg.sub``
    (and, with ``packages``, the package ``pkg`` too when it is named in full: a module that
    reaches its own package by name goes through the package's ``__init__``; ``from . import``
    is how a package's modules reach each other)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
            if packages and not node.level and base in MODULES and base not in ROOTS:
                names.add(base)  # read by its name, as an outsider would: its __init__ runs first
    return names


def ours(name: str) -> str | None:
    """The source module ``name`` is (or is inside), None for other packages."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def internal_graph(*, packages: bool = False) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        targets = {ours(n) for n in imported_names(module, path, packages=packages)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def is_core(module: str) -> bool:
    return not any(module == top or module.startswith(top + ".") for top in ("superlinear.plugins", "superlinear.cli"))


def plugin_of(module: str) -> str | None:
    """``chat`` for ``superlinear.plugins.chat.repl``; None outside the plugins."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["superlinear", "plugins"] else None


def test_core_never_imports_plugins_or_the_cli():
    bad = sorted((m, t) for m, targets in internal_graph().items() if is_core(m)
                 for t in targets if not is_core(t))
    assert bad == []


def test_kernels_import_nothing_above_them():
    bad = []
    for module, path in MODULES.items():
        if not module.startswith("superlinear.kernels"):
            continue
        for name in imported_names(module, path):
            top = name.split(".")[0]
            if name.startswith("superlinear.kernels") or top in KERNEL_DEPENDENCIES or top in sys.stdlib_module_names:
                continue
            if name == "__future__":
                continue
            bad.append((module, name))
    assert bad == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_core():
    graph = {m: {t for t in targets if is_core(t)} for m, targets in internal_graph().items() if is_core(m)}
    assert cycles(graph) == []


def test_no_import_cycles_anywhere():
    """The plugins and the CLI too (a cycle there is as hard to follow as one in core), and
    between a package and its own submodules (``from pkg import x`` inside ``pkg``'s modules
    while ``pkg/__init__`` imports them)."""
    assert cycles(internal_graph(packages=True)) == []


def test_plugins_are_leaves():
    """A plugin imports core and itself, never another plugin."""
    bad = sorted((m, t) for m, targets in internal_graph().items() if plugin_of(m)
                 for t in targets if plugin_of(t) and plugin_of(t) != plugin_of(m))
    assert bad == []


def private_names(tree: ast.AST) -> set[str]:
    """The private names a module defines: functions, classes, module names, and attributes it
    sets on ``self`` / ``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _on_self(node):
            names.add(node.attr)
    return {n for n in names if _private(n)}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def private_reach_ins(sources: dict[str, str]) -> list[tuple[str, int, str]]:
    """``(module, line, expression)`` of every ``obj._name`` where ``_name`` is another module's."""
    trees = {m: ast.parse(text) for m, text in sources.items()}
    owned = {m: private_names(tree) for m, tree in trees.items()}
    everyone = set().union(*owned.values())
    found = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and not _on_self(node) \
                    and node.attr in everyone and node.attr not in owned[module]:
                found.append((module, node.lineno, ast.unparse(node)))
    return found


def test_no_module_reaches_into_another_ones_privates():
    assert private_reach_ins({m: p.read_text() for m, p in MODULES.items()}) == []


def test_the_checks_see_a_cycle_and_a_layer_break(tmp_path):
    """The checks can fail: a made-up graph with a cycle is found, and core -> plugins is seen."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert "superlinear.plugins.serve.runtime" in {ours(n) for n in imported_names(
        "superlinear.plugins.serve.routes_chat", MODULES["superlinear.plugins.serve.routes_chat"])}
    assert not is_core("superlinear.plugins.serve") and is_core("superlinear.service")
    assert is_core("superlinear.client") and not is_core("superlinear.cli.main")
    assert plugin_of("superlinear.plugins.chat.repl") == "chat" and plugin_of("superlinear.client") is None
    # a submodule that reaches its own package by name while the package imports it: a cycle
    source = tmp_path / "api.py"
    source.write_text("from superlinear.plugins.chat import repl\nfrom . import render\n")
    names = imported_names("superlinear.plugins.chat.api", source, packages=True)
    assert {"superlinear.plugins.chat", "superlinear.plugins.chat.repl", "superlinear.plugins.chat.render"} <= names
    assert "superlinear.plugins.chat" not in imported_names("superlinear.plugins.chat.api", source)
    sources = {"a": "class Cache:\n    def _begin(self):\n        self._graph = None\n",
               "b": "def forward(cache):\n    cache._begin()\n    return cache._graph, cache.position\n"}
    assert private_reach_ins(sources) == [("b", 2, "cache._begin"), ("b", 3, "cache._graph")]
