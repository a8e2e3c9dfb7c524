"""The layering of docs/architecture.md, checked on the source: imports only point down the flow.

config → plan → data + model → engine → loop → state / metrics → tools; ``cluster`` sits on top of ``trainer``;
``models`` and ``data_pipeline`` know nothing above them. The walk parses every module's imports (including
the lazy ones inside functions), so a violation anywhere fails here with the file and line named.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("models", "data_pipeline", "trainer", "cluster")
# Top-level packages each may import (besides itself).
ALLOWED = {
    "models": set(),
    "data_pipeline": set(),
    "trainer": {"models", "data_pipeline"},
    "cluster": {"trainer", "models", "data_pipeline"},
}
# trainer's layers, bottom first: a module may import its own layer and those below it.
TRAINER_LAYERS = ["rundir", "config", "engine", "state", "monitor", "loop", "tools", "main"]
LAYER_OF = {name: i for i, name in enumerate(TRAINER_LAYERS)}
CLI_SHIMS = {"status", "report", "sample", "export", "evaluate", "convert"}  # `python -m trainer.<tool>` entry points
MAX_LINES = 420


def _modules():
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, REPO)


def _imports(rel: str):
    """(line, dotted module) for every import in the file, with relative imports resolved."""
    with open(os.path.join(REPO, rel)) as f:
        tree = ast.parse(f.read(), rel)
    parts = rel[:-3].split(os.sep)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # "from trainer import rundir" imports trainer.rundir
                yield node.lineno, f"{module}.{alias.name}"


def _trainer_layer(parts: list[str]):
    """Layer index of trainer.<x>... (None for the package itself); CLI shims count as tools."""
    if len(parts) < 2:
        return None
    head = parts[1]
    if head in CLI_SHIMS:
        head = "tools"
    return LAYER_OF.get(head)


def test_packages_import_only_downwards():
    problems = []
    for rel in _modules():
        own = rel.split(os.sep)[0]
        for line, module in _imports(rel):
            top = module.split(".")[0]
            if top in PACKAGES and top != own and top not in ALLOWED[own]:
                problems.append(f"{rel}:{line} imports {module} ({own} must not import {top})")
    assert not problems, "\n".join(problems)


def test_trainer_subpackages_import_only_lower_layers():
    problems = []
    for rel in _modules():
        parts = rel[:-3].split(os.sep)
        if parts[0] != "trainer" or parts[-1] == "__init__" and len(parts) == 2:
            continue
        mine = _trainer_layer(parts)
        if mine is None:
            continue
        for line, module in _imports(rel):
            target = module.split(".")
            if target[0] != "trainer":
                continue
            theirs = _trainer_layer(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{rel}:{line} imports {module}: {TRAINER_LAYERS[mine]} must not import "
                                f"{TRAINER_LAYERS[theirs]}")
    assert not problems, "\n".join(problems)


def test_nothing_imports_tools():
    problems = []
    for rel in _modules():
        parts = rel[:-3].split(os.sep)
        if parts[:2] == ["trainer", "tools"] or parts[0] == "trainer" and len(parts) == 2 and parts[1] in CLI_SHIMS:
            continue
        for line, module in _imports(rel):
            if module.startswith("trainer.tools"):
                problems.append(f"{rel}:{line} imports {module}")
    assert not problems, "\n".join(problems)


def test_models_use_torch_distributed_only_in_models_parallel():
    problems = []
    for rel in _modules():
        if not rel.startswith("models" + os.sep) or rel.startswith(os.path.join("models", "parallel")):
            continue
        for line, module in _imports(rel):
            if module.startswith("torch.distributed") or module.startswith("deepspeed"):
                problems.append(f"{rel}:{line} imports {module}")
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules():
    """Module-level (eager) imports form no cycle: any module can be imported first."""
    graph = {}
    for rel in _modules():
        name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        with open(os.path.join(REPO, rel)) as f:
            tree = ast.parse(f.read(), rel)
        eager = set()
        for node in tree.body:  # top-level statements only: lazy imports inside functions cannot cycle at import
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # only type checkers follow these
            stmts = [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [])
            for stmt in stmts:
                if isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
                    eager.add(stmt.module)
                    eager.update(f"{stmt.module}.{a.name}" for a in stmt.names)
                elif isinstance(stmt, ast.ImportFrom) and stmt.level:
                    base = name.split(".")[: -stmt.level if not rel.endswith("__init__.py") else None]
                    if rel.endswith("__init__.py") and stmt.level > 1:
                        base = base[: 1 - stmt.level]
                    mod = ".".join(base + ([stmt.module] if stmt.module else []))
                    eager.add(mod)
                elif isinstance(stmt, ast.Import):
                    eager.update(a.name for a in stmt.names)
        graph[name] = eager
    known = set(graph)
    edges = {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_trainer_or_model_module_imports_cluster():
    """The issue's grep, as a test: trainer/, models/ and data_pipeline/ never reach up into cluster/."""
    hits = []
    for rel in _modules():
        if rel.startswith("cluster" + os.sep):
            continue
        with open(os.path.join(REPO, rel)) as f:
            for i, line in enumerate(f, 1):
                if "import cluster" in line or "from cluster" in line:
                    hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("package", PACKAGES + ("benchmarks",))
def test_modules_stay_small(package):
    too_long = []
    for dirpath, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    n = sum(1 for _ in f)
                if n > MAX_LINES:
                    too_long.append(f"{os.path.relpath(os.path.join(dirpath, name), REPO)}: {n} lines")
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): " + ", ".join(too_long)


def test_every_module_imports():
    """A moved module leaves no stale import behind (the static checks above cannot see a missing module)."""
    import importlib

    failures = []
    for rel in _modules():
        name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every broken module at once
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
