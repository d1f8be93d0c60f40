"""The package's import layering: no cycles, and the import-linter contract in pyproject.toml
(`parallel` imports nothing else of vbatch, `engine` no `io`/`jobs`, `io` no `engine`/`jobs`,
no cycles between sibling modules) holds and would catch a violation."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (= import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def import_edges(package: str) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions."""
    graph = grimp.build_graph(package, cache_dir=None)
    return {module: graph.find_modules_directly_imported_by(module) - {module}
            for module in graph.modules}


def test_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_vbatch():
    assert strongly_connected(import_edges("vbatch")) == []


def run_lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    command = [str(lint_imports)] if lint_imports.exists() else ["lint-imports"]
    return subprocess.run([*command, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": str(Path(sys.executable).parent),
                                            "PYTHONPATH": str(cwd)})


def test_layering_contract_is_kept():
    result = run_lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def copy_of_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "vbatch", tmp_path / "vbatch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_layering_contract_fails_on_an_upward_import(tmp_path):
    tree = copy_of_package(tmp_path)
    comm = tree / "vbatch" / "parallel" / "comm.py"
    comm.write_text(comm.read_text() + "\n\ndef _leak():\n    import vbatch.jobs.config\n")
    result = run_lint_imports(tree)
    assert result.returncode != 0
    assert "parallel/ knows ranks and shards, nothing else of vbatch BROKEN" in result.stdout


def test_layering_contract_fails_on_a_cycle(tmp_path):
    tree = copy_of_package(tmp_path)
    plan = tree / "vbatch" / "jobs" / "plan.py"       # the runner imports the plan ...
    plan.write_text(plan.read_text() + "\n\ndef _back():\n    import vbatch.jobs.runner\n")
    result = run_lint_imports(tree)
    assert result.returncode != 0
    assert "no import cycles between the modules of any package BROKEN" in result.stdout
    assert strongly_connected(import_edges_of(tree)) != []


def import_edges_of(tree: Path) -> dict[str, set[str]]:
    """`import_edges` of the copy of vbatch under `tree` (in a fresh interpreter)."""
    code = ("import grimp, json; g = grimp.build_graph('vbatch', cache_dir=None); "
            "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m) - {m}) "
            "for m in g.modules}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(tree)}, check=True)
    return {module: set(imported) for module, imported in json.loads(result.stdout).items()}
