"""The library's layers hold: the pure layer never imports Ray, and no module imports another
in a circle or takes another module's private names (no Ray session, no servers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "platform" / "raylens"
# The Ray layer: these packages (and only these) may import Ray. Everything else under
# raylens/ is the pure layer (README, "Layout").
RAY_PACKAGES = ("runtime", "train", "infer", "tune")


def _module(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> list[str]:
    return sorted(_module(p) for p in LIB.rglob("*.py"))


def _is_ray_layer(module: str) -> bool:
    parts = module.split(".")
    return len(parts) > 1 and parts[1] in RAY_PACKAGES


PURE = [m for m in _modules() if not _is_ray_layer(m)]

BLOCK_RAY = """
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"the pure layer imported {name!r}")
        return None

sys.meta_path.insert(0, NoRay())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray was imported"
print("ok", len(sys.argv) - 1)
"""


def test_the_layers_are_what_the_layout_says():
    assert {"raylens.config", "raylens.rundir", "raylens.loop", "raylens.cli"} <= set(PURE)
    assert "raylens.serving.labels" in PURE and "raylens.tasks.base" in PURE
    assert not any(_is_ray_layer(m) for m in PURE)
    assert {"raylens.runtime.launch", "raylens.train.images", "raylens.infer.embed"} <= {
        m for m in _modules() if _is_ray_layer(m)
    }


def test_every_pure_module_imports_where_ray_cannot_be_imported():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, *PURE], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"ok {len(PURE)}"


def test_the_ray_blocker_catches_a_ray_import():
    """The check above can fail: a Ray-layer module is refused in the same interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, "raylens.runtime.launch"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "the pure layer imported 'ray'" in out.stderr


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` this file imports from raylens, top-level and lazy alike."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "raylens":
                out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "raylens"]
    return out


def _graph() -> dict[str, set[str]]:
    modules = set(_modules())
    graph: dict[str, set[str]] = {}
    for path in LIB.rglob("*.py"):
        me = _module(path)
        deps = set()
        for module, names in _imports(path):
            for name in names or [""]:
                target = f"{module}.{name}" if f"{module}.{name}" in modules else module
                if target in modules and target != me:
                    deps.add(target)
        graph[me] = deps
    return graph


def test_no_import_circles_between_library_modules():
    """Package faces (``__init__``) that import their own modules to register them are
    the one allowed pattern (as timm.models does); any other cycle fails, naming it."""
    graph = _graph()
    for module in graph:  # a package face's own submodules don't count as a back edge
        graph[module] = {d for d in graph[module] if not d.startswith(module + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_imports_another_modules_private_names():
    bad = [
        f"{_module(path)} imports {name} from {module}"
        for path in LIB.rglob("*.py")
        for module, names in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, bad


# Modules that Ray processes other than the train workers import to unpickle what they run:
# the Ray Data plan (split coordinators, Train's dataset manager, decode workers) and the
# placement-group cleaner actor. torch and timm would cost each process ~3 CPU-s per run.
LIGHT_FOR_RAY_PROCESSES = ("raylens.runtime.ingest", "raylens.runtime.cleaner")


def test_modules_ray_processes_unpickle_import_no_torch_or_timm():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in LIGHT_FOR_RAY_PROCESSES)
        + "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
