"""The shape of the tree: no import circles, a library that imports no CLI, files and functions of a
readable size. Read from the sources (every import, also those inside functions), nothing imported."""
import ast

import pytest
from conftest import ROOT

FOLDERS = ("", "mess", "models", "scripts", "bench", "examples", "tests")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def sources() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every Python file of the project."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            if folder in ("mess", "models"):
                name = folder if path.stem == "__init__" else f"{folder}.{path.stem}"
            else:
                name = path.stem  # run as scripts or from tests/: their folder is on sys.path
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    package = name if name in ("mess", "models") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            mods = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for m in mods:
            while m and m not in known:
                m = m.rpartition(".")[0]
            if m and m != name:
                found.add(m)
    return found


def graph() -> dict[str, set[str]]:
    src = sources()
    return {name: imports(name, tree, set(src)) for name, tree in src.items()}


def test_no_module_imports_one_that_imports_it_back():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan: every strongly connected component of more than one module is a circle
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == []
    assert "mess.parametrize" in g["retrain"] and "mess" in g  # the walk sees the imports it should


def test_the_library_imports_no_cli_and_nothing_of_the_suite():
    g = graph()
    lib = {m for m in g if m == "mess" or m.startswith("mess.")}
    assert len(lib) > 10
    for m in sorted(lib):
        outside = sorted(d for d in g[m] if d not in lib)
        assert outside == [], f"{m} imports {outside}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_files_and_functions_stay_readable(folder):
    long_files, long_functions = [], []
    for path in sorted((ROOT / folder).glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert long_files == [] and long_functions == []
