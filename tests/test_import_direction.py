"""The direction of imports inside palate, read from the source with ``ast`` (nothing is imported).

The layers (docs/architecture.md)::

    entry points   palate/cli.py, palate/*/cli*.py, palate/bench/
        |
    domains        rl, preferences, lm, feedback, data, and the shared modules palate/config.py,
        |          palate/runs.py, palate/errors.py, palate/demo.py
    core           palate/core/: pure math on tensors

What is checked:

* ``palate.core`` imports nothing of palate outside ``palate.core`` (not even ``palate.errors``
  or ``palate.runs``: no I/O, no configs, no domain).
* ``palate.feedback`` imports no other palate layer than ``palate.errors`` and no torch: the
  service runs without the training stack.
* No domain module imports an entry point (a CLI module or a benchmark script), not even inside
  a function. CLI modules may import each other (``palate/cli.py`` registers each group's
  ``add_parser``) and benchmark scripts may use CLI helpers (``palate.bench.rl`` reads presets
  through ``palate.rl.cli``): both are entry points, at the top.
* No import cycle among palate modules through module-level imports. Imports inside a function
  (or under ``if TYPE_CHECKING:``) are exempt from the cycle check: they run when the function is
  called, after every module has finished loading, so they cannot see a half-initialised module,
  and they are how palate keeps ``palate --help`` from loading torch. The direction rules above
  apply to them all the same.

``from palate.x import y`` counts as an import of ``palate.x.y`` when that is a module, else of
``palate.x``. Importing a submodule also runs its package's ``__init__``; that implicit edge is
not counted (the packages' ``__init__`` files import at most their own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "palate"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _resolve(name: str) -> str | None:
    """The palate module ``name`` is, or is inside (``palate.rl.PPO`` -> ``palate.rl``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], set[str], set[str]]:
    """``(module-level palate imports, deferred palate imports, top-level packages imported)``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top: set[str] = set()
    deferred: set[str] = set()
    external: set[str] = set()

    def add(name: str, is_deferred: bool) -> None:
        if name == "palate" or name.startswith("palate."):
            target = _resolve(name)
            if target is not None and target != module:
                (deferred if is_deferred else top).add(target)
        else:
            external.add(name.split(".")[0])

    def visit(node: ast.AST, is_deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = is_deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = True
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, inner)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    add(full if full in MODULES else base, inner)
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return top, deferred, external


IMPORTS = {name: _imports(name) for name in MODULES}


def _is_entry_point(module: str) -> bool:
    last = module.rpartition(".")[2]
    is_cli = last == "cli" or last.startswith("cli_")  # palate/cli.py, palate/lm/cli.py
    return is_cli or module.split(".")[:2] == ["palate", "bench"]


def _all_palate_imports(module: str) -> set[str]:
    top, deferred, _ = IMPORTS[module]
    return top | deferred


def test_the_scan_sees_the_known_edges() -> None:
    # Guards the scanner itself: a bug that found no imports would pass every rule below.
    assert "palate.core.stats" in IMPORTS["palate.rl.ppo"][0]
    assert "palate.feedback.server" in IMPORTS["palate.feedback.cli"][1]
    assert _is_entry_point("palate.lm.cli") and _is_entry_point("palate.bench.rl")
    assert not _is_entry_point("palate.feedback.client")


def test_core_imports_only_core() -> None:
    bad = {
        module: sorted(t for t in _all_palate_imports(module) if not t.startswith("palate.core"))
        for module in MODULES
        if module.startswith("palate.core")
    }
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"palate.core must stay pure math; these imports leave it: {bad}"


def test_feedback_needs_no_other_layer_and_no_torch() -> None:
    bad = {}
    for module in MODULES:
        if not module.startswith("palate.feedback"):
            continue
        outside = {
            t for t in _all_palate_imports(module) if not t.startswith("palate.feedback") and t != "palate.errors"
        }
        if "torch" in IMPORTS[module][2]:
            outside.add("torch")
        if outside:
            bad[module] = sorted(outside)
    assert not bad, f"the feedback service must run without the training stack: {bad}"


def test_no_domain_module_imports_an_entry_point() -> None:
    bad = {
        module: sorted(t for t in _all_palate_imports(module) if _is_entry_point(t))
        for module in MODULES
        if not _is_entry_point(module)
    }
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, (
        f"domain modules import CLI or benchmark modules: {bad}; move what they need into the domain "
        "and let the CLI import it"
    )


def test_no_import_cycles_at_module_level() -> None:
    graph = {module: IMPORTS[module][0] for module in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
