"""The package's structure: no import cycle between modules, no two sub-packages importing each other, modules of
readable size, and a command line that checks its flags without importing torch."""
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffptq"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (lazy imports inside functions count)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    """The sub-package a module belongs to (diffptq.algo.driver.plan -> diffptq.algo); top-level modules are their
    own."""
    return ".".join(module.split(".")[:2])


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    graph = _graph()
    assert sum(len(v) for v in graph.values()) > 100  # the walk sees the package's imports
    assert _cycle(graph) is None


def test_no_two_packages_import_each_other():
    deps = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if _package(module) != _package(target) and _package(target) != "diffptq":
                deps[_package(module)].add(_package(target))
    pairs = sorted((a, b) for a in deps for b in deps[a] if a < b and a in deps.get(b, ()))
    assert pairs == []


def test_every_module_is_readable_at_once():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("module", ["diffptq.cli", "diffptq.config", "diffptq.models.names", "diffptq.run.tdq_flags",
                                    "diffptq.peers"])
def test_command_line_layer_imports_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("script", ["qronos_diffusion/quantize_qronos_4blocks.py",
                                    "qronos_diffusion/benchmark_final.py", "LogSnr-DiT/calibrate_snr.py",
                                    "LogSnr-Unet/evaluate_compare.py"])
def test_a_flag_typo_is_one_line_before_torch_is_imported(script):
    code = ("import runpy, sys; sys.argv = ['x', '--wbitz', '3']\n"
            f"try:\n    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "exit 2 False"
    assert out.stderr.strip().splitlines() == ["error: unrecognized arguments: --wbitz 3 (see --help)"]
