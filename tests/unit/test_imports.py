"""DESIGN.md's import rules, enforced by reading every module's imports (ast, also the lazy
ones inside functions):

- `server` imports `specdec`, never the other way (exception: the `specdec` console script
  `specdec/cli.py`, which dispatches `specdec serve` to `server.__main__`);
- everything under `specdec/core/` imports the standard library and `specdec.core` only, so
  bookkeeping tests run without torch;
- nothing in `specdec` or `server` imports `tests` or `bench`.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = ROOT / "specdec" / "core"
BOOKKEEPING = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
ENTRY_POINTS = {"specdec/cli.py"}


def _modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """Absolute dotted names imported by a file; relative imports resolved to the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                module = f"{prefix}.{node.module}" if node.module else prefix
                names += [module] if node.module else [f"{prefix}.{a.name}" for a in node.names]
            elif node.module == "specdec":
                names += [f"specdec.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
    return names


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_packages_exist():
    assert (ROOT / "specdec" / "core" / "config.py").is_file()
    assert (ROOT / "server" / "__init__.py").is_file()


def test_specdec_never_imports_server():
    bad = [(_rel(p), name) for p in _modules("specdec") if _rel(p) not in ENTRY_POINTS
           for name in _imports(p) if name.split(".")[0] == "server"]
    assert bad == []


@pytest.mark.parametrize("package", ["specdec", "server"])
def test_nothing_imports_tests_or_bench(package):
    bad = [(_rel(p), name) for p in _modules(package)
           for name in _imports(p) if name.split(".")[0] in ("tests", "bench")]
    assert bad == []


@pytest.mark.parametrize("module", BOOKKEEPING)
def test_bookkeeping_imports_only_the_standard_library(module):
    path = CORE / f"{module}.py"
    bad = []
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "__future__" or top in sys.stdlib_module_names:
            continue
        if name == "specdec.core" or name.startswith("specdec.core."):
            continue
        bad.append(name)
    assert bad == [], f"specdec/core/{module}.py imports {bad}"


def test_the_core_folder_holds_the_bookkeeping():
    assert {"config", "request", "block_pool", "scheduler", "detokenizer"} <= set(BOOKKEEPING)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    probe = tmp_path / "specdec" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from .. import server_thing\n"
                     "from ..config import Config\n"
                     "def f():\n    import torch\n    from specdec import engine\n")
    assert _imports(probe, tmp_path) == ["specdec.server_thing", "specdec.config", "torch",
                                         "specdec.engine"]
