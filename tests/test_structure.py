"""The house rules of issue 12, kept: no import circles in seg_core, and no function over 80 lines without
its reason written in a comment right above it ("Over 80 lines ...")."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "app.py", *sorted((ROOT / "seg_core").rglob("*.py"))]
MAX_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The seg_core modules ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import circle of ``graph`` (module -> modules it imports), or None. A package importing its own
    submodules is no circle."""
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target.startswith(module + "."):
                continue
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_circles():
    known = {module_name(p) for p in SOURCES}
    graph = {module_name(p): imported_modules(p, known) for p in SOURCES}
    assert "seg_core.options" in graph["seg_core.pipeline"]  # the graph is read (local imports too)
    assert circle(graph) is None


def test_the_circle_check_sees_a_circle():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None


def long_functions_without_a_reason(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            above = "\n".join(lines[max(0, first - 4): first - 1])
            if "Over 80 lines" not in above:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_no_function_over_80_lines_without_its_reason():
    assert [f for path in SOURCES for f in long_functions_without_a_reason(path)] == []


def test_the_length_check_sees_a_long_function(tmp_path):
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
        (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
        assert len(long_functions_without_a_reason(tmp_path / "long.py")) == 1
        (tmp_path / "long.py").write_text(f"# Over 80 lines: a table.\ndef long():\n{body}\n")
        assert long_functions_without_a_reason(tmp_path / "long.py") == []
    finally:
        ROOT = saved
