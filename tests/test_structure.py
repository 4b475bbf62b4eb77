"""Repository-wide checks: no import circle between the project's modules, and no function over 60
lines in the top-level modules and diffusion/."""

import ast

from conftest import ROOT


# ------------------------------------------------------------------ the import graph
def project_imports():
    """{module: the project modules it imports (and benchmarks/)} for the repository's top-level
    modules and packages, counting imports anywhere in a file (in functions too: a lazy import still ties
    two modules together)."""
    files = {p.stem: [p] for p in ROOT.glob("*.py")}
    files.update({p.parent.name: sorted(p.parent.rglob("*.py")) for p in ROOT.glob("*/__init__.py")})
    graph = {}
    for module, paths in files.items():
        imported = set()
        for node in (n for path in paths for n in ast.walk(ast.parse(path.read_text()))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        graph[module] = (imported & (set(files) | {"benchmarks"})) - {module}
    return graph


def modules_in_a_cycle(graph):
    """The modules from which some chain of imports leads back to themselves."""
    def reachable(start):
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        return seen
    return {module for module in graph if module in reachable(module)}


def test_no_module_imports_one_that_imports_it_back():
    graph = project_imports()
    assert {"checkpoint", "download", "interop", "flops", "ablate", "models", "cli"} <= set(graph)
    assert "checkpoint" not in graph["download"] and "checkpoint" not in graph["interop"]
    assert modules_in_a_cycle(graph) == set()
    assert [module for module in graph if "benchmarks" in graph[module]] == []  # ablate.py imported its flops.py


# ------------------------------------------------------------------ function length
MAX_FUNCTION_LINES = 60
ALLOWED_LONG_FUNCTIONS = set()  # none today: a function that must be longer is listed here, with the reason


def long_functions():
    """{"file:function": lines from `def` to its last line} over the limit, in the top-level modules and diffusion/."""
    paths = sorted(ROOT.glob("*.py")) + sorted((ROOT / "diffusion").glob("*.py"))
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = lines
    return found


def test_no_new_function_exceeds_60_lines():
    found = long_functions()
    assert "diffusion/gaussian_diffusion.py:__init__" not in found  # diffusion/ is searched: a short one is not listed
    assert set(found) - ALLOWED_LONG_FUNCTIONS == set(), found
