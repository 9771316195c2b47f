"""The layout tells the architecture: a numerical core that imports no I/O, a library on top
of it, thin commands on top of that; imports point down, never in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hydraopt_jax"
NAME = "hydraopt_jax"
MAX_LINES = 500

# The numerical core: plan, losses, solution, solvers, and their host-side helpers.
CORE = {
    "_plan", "_loss", "_solution", "_solve", "_merge", "_solvers", "_host", "_lapack",
    "_xla_flags", "_similarity", "_synthetic",
}  # fmt: skip
# The library a Python user calls; it builds on the core.
LIBRARY = {"io", "planner", "baselines", "_stream", "serve"}
# The commands: nothing imports them.
COMMANDS = {"cli"}
# What the core may import from outside the package (no I/O, no command-line libraries).
CORE_THIRD_PARTY = {"jax", "jaxlib", "numpy", "optax", "scipy"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _imports(module: str, modules: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """`(imported module, how, [names])` for every import in `module` (function-local ones
    included: a lazy import is still a dependency)."""
    tree = ast.parse(modules[module].read_text())
    base = module.split(".") if _is_package(module, modules) else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, "import", []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(
                    base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not subs:
                out.append((target, "from", rest))
            out += [(s, "from", []) for s in subs]
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _, _ in _imports(m, modules) if t in modules and t != m} for m in modules}


def _layer(module: str) -> str:
    top = module.split(".")[1] if module.count(".") else ""
    if top in CORE:
        return "core"
    if top in LIBRARY:
        return "library"
    if top in COMMANDS:
        return "commands"
    return "package"  # hydraopt_jax/__init__: re-exports


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_point_down():
    """Core imports only the core (and jax/numpy/optax/scipy); the library never imports
    the commands; nothing inside the package imports its top-level `__init__` except the
    commands (which sit on top of everything)."""
    modules = _modules()
    rank = {"core": 0, "library": 1, "commands": 2, "package": 1}
    problems = []
    for m in modules:
        layer = _layer(m)
        for target, _, _ in _imports(m, modules):
            if target.split(".")[0] != NAME:
                if layer == "core" and target.split(".")[0] not in CORE_THIRD_PARTY | {
                    "__future__", "dataclasses", "collections", "functools", "typing", "math",
                    "types", "os", "hashlib",
                }:  # fmt: skip
                    problems.append(f"{m} (core) imports {target}")
                continue
            if target not in modules:
                continue
            if target == NAME:
                if layer != "commands":
                    problems.append(f"{m} imports the package's __init__ (only commands may)")
                continue
            if rank[_layer(target)] > rank[layer]:
                problems.append(f"{m} ({layer}) imports {target} ({_layer(target)})")
    assert not problems, "\n".join(problems)


def test_no_private_name_is_imported_across_packages():
    """`from x import _name` only within one package (a package's private helpers stay in
    it); modules are imported by their public names."""
    modules = _modules()
    problems = []
    for m in modules:
        own = m if _is_package(m, modules) else m.rsplit(".", 1)[0]
        for target, how, names in _imports(m, modules):
            if not target.startswith(NAME) or how != "from":
                continue
            target_package = (
                target
                if target in modules and _is_package(target, modules)
                else (target.rsplit(".", 1)[0])
            )
            if target_package == own:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{m} imports {', '.join(private)} from {target}")
    assert not problems, "\n".join(problems)


def test_no_module_is_over_500_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert not {m: n for m, n in long.items() if n > MAX_LINES}


def test_the_checks_see_a_cycle_and_a_layer_violation():
    """The walker itself: relative imports resolve, and a planted upward import is found."""
    modules = _modules()
    resolved = {t for t, _, _ in _imports("hydraopt_jax._merge", modules)}
    assert "hydraopt_jax._solve" in resolved and "hydraopt_jax._plan" in resolved
    assert "hydraopt_jax.io.bundle" in {t for t, _, _ in _imports("hydraopt_jax.io", modules)}
    assert _layer("hydraopt_jax._solvers.exact") == "core"
    assert _layer("hydraopt_jax.io.bundle") == "library"
    assert _layer("hydraopt_jax.cli.merge") == "commands"
