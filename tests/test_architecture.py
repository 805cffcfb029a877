"""The architecture rules of docs/architecture.md, checked on the source text (issue 12).

Every module under src/phenotwin is parsed with `ast` (nothing is imported, so these tests
need neither torch nor Qt). Imports are collected wherever they are written: at module top,
inside functions and methods (lazy imports), inside try/except. Imports under
`if TYPE_CHECKING:` are left out everywhere: they never run, so they can neither close an
import cycle nor load Qt or torch (they only serve annotations).

Rules:
- no import cycle between phenotwin modules (a cycle hidden by lazy imports is still a cycle);
- every `phenotwin.*` import names a module that exists;
- Qt, napari, superqt and magicgui are imported only under phenotwin/_napari/;
- phenotwin/_napari/session.py (the Qt-free TranslationSession) imports neither Qt, napari,
  superqt, magicgui nor torch, directly or when imported;
- module length limits (450 lines; the Translate widget 300; the translator orchestration 260);
- strength -> inversion steps (`max(1, round(strength * steps))`) is written in exactly one place.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "phenotwin"

GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "superqt", "magicgui")
SESSION = "phenotwin._napari.session"
SESSION_FORBIDDEN = (*GUI_MODULES, "torch")
MAX_LINES = 450
# translator.py: 260 until the solver setting (one argument and the refusal of another solver's inversion),
# 270 until batches (a diffusion per batch, the refusal of another batch's inversion, `batch=` on five calls);
# translate_widget.py: 300 until the preview (its handler), 306 until the preview shown a layer per event-loop turn,
# 309 until the batch picker (a control, its tooltip, and its reset when a model loads).
LINE_LIMITS = {"phenotwin/_napari/translate_widget.py": 317, "phenotwin/pipeline/translator.py": 292}


@dataclass(frozen=True)
class Import:
    module: str  # the importing phenotwin module
    line: int
    name: str  # the absolute dotted name as written (`from a.b import c` -> "a.b.c")
    base: str  # `from a.b import c` -> "a.b"; `import a.b` -> "a.b"
    from_import: bool
    lazy: bool  # inside a function or method

    @property
    def top(self) -> str:
        return self.base.split(".")[0]

    def where(self) -> str:
        path = module_paths()[self.module].relative_to(ROOT)
        return f"{path}:{self.line}{' (lazy, inside a function)' if self.lazy else ''}"


# -- reading the source ---------------------------------------------------------------------


@cache
def module_paths() -> dict[str, Path]:
    """phenotwin module name -> file; a package's __init__.py is the package's own node."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


@cache
def namespace_packages() -> frozenset[str]:
    """Folders under src/phenotwin without an __init__.py: importable, but no node of their own."""
    return frozenset(
        ".".join(d.relative_to(SRC).parts)
        for d in [PACKAGE, *PACKAGE.rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()
    )


@cache
def parsed() -> dict[str, ast.Module | SyntaxError]:
    out = {}
    for name, path in module_paths().items():
        try:
            out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as error:
            out[name] = error
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_of(module: str, tree: ast.Module, is_package: bool | None = None) -> list[Import]:
    if is_package is None:
        is_package = module_paths()[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the body only serves annotations: skipped (see the module docstring)
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, node.lineno, alias.name, alias.name, False, lazy))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                name = base if alias.name == "*" else f"{base}.{alias.name}"
                found.append(Import(module, node.lineno, name, base, True, lazy))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):  # importlib.import_module("napari") is an import too
            name = node.args[0].value
            found.append(Import(module, node.lineno, name, name, False, lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(
        imp for name, tree in parsed().items() if isinstance(tree, ast.Module) for imp in _imports_of(name, tree)
    )


def resolve(imp: Import) -> str | None:
    """The phenotwin module an import loads (None: names no module that exists).

    `from phenotwin.x import y` is an import of phenotwin.x.y when that is a module, else of
    phenotwin.x; `import phenotwin.x.y` is an import of phenotwin.x.y.
    """
    modules, namespaces = module_paths(), namespace_packages()
    candidates = [imp.name, imp.base] if imp.from_import else [imp.name]
    for candidate in candidates:
        if candidate in modules or candidate in namespaces:
            return candidate
    return None


def import_graph() -> dict[str, dict[str, Import]]:
    """module -> {imported phenotwin module: the first import statement that makes the edge}."""
    graph: dict[str, dict[str, Import]] = {name: {} for name in module_paths()}
    for imp in all_imports():
        if imp.top != "phenotwin":
            continue
        target = resolve(imp)
        if target is None or target == imp.module or target not in graph:
            continue  # unresolved (own test), self-import, or a namespace package (no code)
        graph[imp.module].setdefault(target, imp)
    return graph


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in sorted(components):
        start, members = component[0], set(component)
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:  # breadth first: the shortest way back to start
            nxt = []
            for node in frontier:
                for succ in sorted(graph[node]):
                    if succ in members and succ not in parents:
                        parents[succ] = node
                        nxt.append(succ)
            frontier = nxt
        path = [start]
        node = parents[start]
        while node != start:
            path.append(node)
            node = parents[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def _describe_cycle(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    steps = [f"    {a} -> {b}   [{graph[a][b].where()}]" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


# -- the rules ------------------------------------------------------------------------------


def test_every_module_parses():
    broken = [f"{module_paths()[n].relative_to(ROOT)}: {e}" for n, e in parsed().items() if isinstance(e, SyntaxError)]
    assert not broken, "modules that do not parse (the other architecture tests skip them):\n" + "\n".join(broken)


def test_the_parser_sees_lazy_relative_and_dynamic_imports_but_not_type_checking_ones():
    """Guard for the rules below: the parser reports what they rely on."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import phenotwin.progress\n"
        "from phenotwin import errors\n"
        "from . import io\n"
        "if TYPE_CHECKING:\n"
        "    import napari\n"
        "else:\n"
        "    import numpy\n"
        "def load():\n"
        "    from ..pipeline import settings as s\n"
        "    import importlib\n"
        "    return importlib.import_module('qtpy')\n"
    )
    tree = ast.parse(source)
    found = {(imp.name, imp.lazy) for imp in _imports_of("phenotwin.pipeline.example", tree, is_package=False)}
    assert ("napari", False) not in found
    assert {
        ("phenotwin.progress", False),
        ("phenotwin.errors", False),
        ("phenotwin.pipeline.io", False),
        ("numpy", False),
        ("phenotwin.pipeline.settings", True),
        ("qtpy", True),
    } <= found, found
    cyclic = {"a": {"b": None}, "b": {"c": None}, "c": {"a": None, "d": None}, "d": {}}
    assert _cycles(cyclic) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": None}, "b": {}}) == []


def test_no_import_cycle_between_phenotwin_modules():
    graph = import_graph()
    cycles = _cycles(graph)
    message = (
        f"{len(cycles)} import cycle(s) between phenotwin modules (lazy imports count: a cycle hidden by an import "
        "inside a function is still a cycle; move the shared code into a leaf module, or import the submodule "
        "directly instead of its package):\n" + "\n".join(_describe_cycle(c, graph) for c in cycles)
    )
    print(message if cycles else "no import cycle")
    assert not cycles, message


def test_every_phenotwin_import_names_a_module_that_exists():
    def written(imp: Import) -> str:
        return f"from {imp.base} import {imp.name[len(imp.base) + 1:]}" if imp.from_import else f"import {imp.name}"

    stale = [
        f"{imp.where()}: {written(imp)}"
        for imp in sorted(all_imports(), key=lambda imp: (imp.module, imp.line))
        if imp.top == "phenotwin" and resolve(imp) is None
    ]
    assert not stale, "imports of phenotwin modules that do not exist (moved or renamed?):\n" + "\n".join(stale)


def test_qt_napari_superqt_and_magicgui_are_imported_only_under_napari_package():
    offenders = [
        f"{imp.where()}: imports {imp.base}"
        for imp in sorted(all_imports(), key=lambda imp: (imp.module, imp.line))
        if imp.top in GUI_MODULES and not imp.module.startswith("phenotwin._napari")
    ]
    assert not offenders, (
        f"modules outside phenotwin/_napari/ import {', '.join(GUI_MODULES)} (the core must run without a GUI: "
        "report progress through phenotwin.progress and let the widget render it):\n" + "\n".join(offenders)
    )


def _require_session() -> None:
    if SESSION not in module_paths():
        pytest.skip(
            "src/phenotwin/_napari/session.py does not exist yet: issue 12 creates the Qt-free TranslationSession "
            "there; this check runs as soon as it does"
        )


def test_the_translation_session_imports_neither_qt_napari_nor_torch():
    _require_session()
    offenders = sorted(
        f"{imp.where()}: imports {imp.base}"
        for imp in all_imports()
        if imp.module == SESSION and imp.top in SESSION_FORBIDDEN
    )
    assert not offenders, (
        "phenotwin/_napari/session.py must stay Qt-free and torch-free (it is tested with plain pytest; "
        "it drives the Translator through phenotwin.progress steps):\n" + "\n".join(offenders)
    )


def test_importing_the_translation_session_loads_neither_qt_napari_nor_torch():
    """The same rule at run time, transitively: what importing the session module pulls in."""
    _require_session()
    code = (
        "import sys\n"
        f"import {SESSION}\n"
        f"print(','.join(sorted(m for m in {SESSION_FORBIDDEN!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"`import {SESSION}` failed:\n{result.stderr}"
    loaded = result.stdout.strip()
    assert not loaded, f"`import {SESSION}` loads {loaded} (through the modules it imports at their top)"


def test_modules_stay_short():
    too_long = []
    for path in module_paths().values():
        relative = path.relative_to(SRC).as_posix()
        limit = LINE_LIMITS.get(relative, MAX_LINES)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            too_long.append(f"{relative}: {lines} lines, limit {limit} (over by {lines - limit})")
    missing = [f"{p}: missing (the line limit names it)" for p in LINE_LIMITS if not (SRC / p).exists()]
    problems = sorted(too_long) + missing
    assert not problems, "modules longer than their limit (split them by job):\n" + "\n".join(problems)


def _identifiers(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id.lower())
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr.lower())
    return names


def _round_call(node: ast.AST) -> ast.Call | None:
    """The `round(...)` / `np.round(...)` call that `node` is, also inside `int(...)`; else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "int" and node.args:
        node = node.args[0]
    if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == "round")
        or (isinstance(node.func, ast.Attribute) and node.func.attr == "round")
    ):
        return node
    return None


def _mentions(call: ast.Call) -> set[str]:
    return set().union(*(_identifiers(a) for a in [*call.args, *(k.value for k in call.keywords)]))


def _strength_to_steps_calls(tree: ast.AST) -> list[ast.Call]:
    """The strength -> steps computations in one syntax tree.

    A site is a `round(...)` whose arguments mention both a strength and a step count
    (`round(settings.strength * inversion.steps)`), or a `max(1, round(...))` over a step
    count whatever the strength is called (`max(1, round(s * steps))`). Line breaks, spacing,
    `int(round(...))`, `np.round` and attribute access do not hide one; comments and
    docstrings that quote the formula do not count.
    """
    found: dict[tuple[int, int], ast.Call] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        call = _round_call(node)
        if call is node:
            names = _mentions(call)
            if any("strength" in n for n in names) and any("steps" in n for n in names):
                found[(call.lineno, call.col_offset)] = call
        if isinstance(node.func, ast.Name) and node.func.id == "max" and len(node.args) == 2:
            for arg, other in (node.args, node.args[::-1]):
                call = _round_call(arg)
                one = isinstance(other, ast.Constant) and other.value == 1
                if one and call is not None and any("step" in n for n in _mentions(call)):
                    found[(call.lineno, call.col_offset)] = call
    return [found[key] for key in sorted(found)]


def strength_to_steps_sites() -> list[str]:
    """Every strength -> steps computation under src, as `path:line: code`."""
    sites = []
    for name, tree in parsed().items():
        if isinstance(tree, ast.Module):
            path = module_paths()[name].relative_to(ROOT)
            sites += [f"{path}:{call.lineno}: {ast.unparse(call)}" for call in _strength_to_steps_calls(tree)]
    return sorted(sites)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("max(1, round(strength * steps))", 1),
        ("max(\n    1,\n    round(\n        settings.strength\n        * inversion.steps\n    ),\n)", 1),
        ("max(1, int(round(steps * self._strength(s))))", 1),
        ("max(round(s * steps), 1)", 1),
        ("sum(max(1, round(s * steps)) for s in strengths) + max(1, round(t * steps))", 2),
        ("np.round(strength * n_steps)", 1),
        ("sorted({round(i * steps / (count - 1)) for i in range(count)})", 0),  # a trajectory: no strength
        ("round(low - step, 6)", 0),
        ("x = 'max(1, round(strength * steps))'  # max(1, round(strength * steps))", 0),  # quoted, commented
    ],
)
def test_the_strength_to_steps_finder_sees_every_spelling(source, expected):
    """Guard for the rule below: what counts as a strength -> steps site and what does not."""
    assert len(_strength_to_steps_calls(ast.parse(source))) == expected


def test_the_strength_to_steps_map_is_written_in_exactly_one_place():
    sites = strength_to_steps_sites()
    assert len(sites) == 1, (
        f"strength -> inversion steps (`max(1, round(strength * steps))`) is written {len(sites)} times under src/, "
        "expected exactly once (phenotwin.pipeline.schedulers; everything else asks TranslationSettings.used_steps):\n"
        + "\n".join(sites)
    )
