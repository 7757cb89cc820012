"""The core under zmx/ stays pure: no sockets, asyncio, files, clocks, randomness, and
nothing from zmx/node. Only the I/O shells (zmx/node/) and the CLI may do I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zmx"
# Modules that are not core: the command-line entry point starts processes and reads files.
NOT_CORE = {"cli.py", "__main__.py"}

FORBIDDEN_MODULES = {
    # sockets and event loops
    "socket", "selectors", "select", "ssl", "asyncio", "uvloop", "zmq", "websockets",
    # threads and processes
    "threading", "multiprocessing", "subprocess", "concurrent", "signal",
    # files
    "os", "io", "pathlib", "shutil", "tempfile", "glob", "fcntl", "mmap",
    # clocks and chance (the core is deterministic)
    "time", "datetime", "sched", "random", "secrets", "uuid",
}
FORBIDDEN_CALLS = {"open", "input", "print", "exec", "eval", "__import__"}


def core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.name not in NOT_CORE)


def imported_names(tree: ast.AST, module: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the zmx package
                base = "zmx" if node.level == 1 else ""
                name = ".".join(filter(None, [base, node.module or ""]))
                found += [(node.lineno, f"{name}.{alias.name}" if not node.module else name) for alias in node.names]
            else:
                found.append((node.lineno, node.module or ""))
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_core_modules_exist() -> None:
    names = {p.name for p in core_modules()}
    assert {"model.py", "commands.py", "events.py", "book.py", "engine.py", "depth.py", "codec.py",
            "topics.py", "topology.py", "exceptions.py"} <= names


def violations(module: Path) -> list[str]:
    tree = ast.parse(module.read_text(), filename=str(module))
    problems = []
    for line, name in imported_names(tree, module):
        top = name.split(".")[0]
        if top in FORBIDDEN_MODULES:
            problems.append(f"{module.name}:{line} imports {name} (I/O, clock or chance in the core)")
        if name == "zmx.node" or name.startswith("zmx.node."):
            problems.append(f"{module.name}:{line} imports {name} (the core must not depend on the shells)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            problems.append(f"{module.name}:{node.lineno} calls {node.func.id}()")
    return problems


@pytest.mark.parametrize("module", core_modules(), ids=lambda p: p.name)
def test_core_module_is_pure(module: Path) -> None:
    problems = violations(module)
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_violation(tmp_path: Path) -> None:
    """The rule is not vacuous: each kind of impurity is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom zmx.node import matcher\nfrom .node.gateway import x\nopen('f')\n")
    problems = "\n".join(violations(bad))
    assert "bad.py:1 imports time" in problems
    assert "bad.py:2 imports zmx.node" in problems
    assert "bad.py:3 imports zmx.node.gateway" in problems
    assert "bad.py:4 calls open()" in problems
