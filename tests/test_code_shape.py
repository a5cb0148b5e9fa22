"""The package's shape: no import cycle, and no function too long to read on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harness"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def harness_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The harness modules `name` imports anywhere in its body, functions included."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in imported if m in known and m != name and m != "harness"}


def test_no_import_cycle():
    trees = modules()
    graph = {name: harness_imports(name, tree, set(trees)) for name, tree in trees.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", "import cycle: " + " -> ".join([*path, name, other])
            if other not in state:
                visit(other, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def function_lengths() -> list[tuple[int, str]]:
    lengths = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(lengths, reverse=True)


def test_no_function_longer_than_a_screen():
    too_long = [(n, f) for n, f in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


if __name__ == "__main__":  # `python tests/test_code_shape.py`: the longest functions
    for lines, function in function_lengths()[:5]:
        print(f"{lines:4d}  {function}")
