"""The import graph: first-party code is imported as `tandem.*` only, and the packages'
dependencies point one way (kernels <- model <- train, serve; proto <- serve)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the tandem modules / packages it may import besides itself. The top-level
# modules: tandem.config is the leaf every package uses, tandem.cli imports the
# subcommands by name (lazily); a package's __main__.py may also import the CLI.
LAYERS: dict[str, set[str]] = {
    "tandem.kernels": {"tandem.config"},
    "tandem.model": {"tandem.config", "tandem.kernels"},
    "tandem.train": {"tandem.config", "tandem.kernels", "tandem.model"},
    "tandem.serve": {"tandem.config", "tandem.kernels", "tandem.model", "tandem.proto"},
    "tandem.proto": set(),
}
TOP_LEVEL = ("__init__.py", "__main__.py", "cli.py", "config.py")
OLD_TOP_LEVEL = {"model", "kernels", "train", "serve", "proto", "benchmarks", "tandem_cli"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "tandem":  # `from tandem import kernels`
                found += [(node.lineno, f"tandem.{alias.name}") for alias in node.names]
    return found


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def _tandem_imports(path: Path) -> list[tuple[int, str]]:
    """(line, tandem.<module or package>) for each first-party import of `path`."""
    out = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] == "tandem" and len(parts) >= 2:
            out.append((line, ".".join(parts[:2])))
    return out


def test_first_party_code_is_imported_through_the_tandem_namespace() -> None:
    files = _python_files("tandem", "benchmarks", "tests")
    assert len(files) > 50
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if name.split(".")[0] in OLD_TOP_LEVEL
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_dependencies_point_one_way(package: str) -> None:
    allowed = LAYERS[package]
    bad = []
    for path in _python_files(package.replace(".", "/")):
        entry_point = {"tandem.cli"} if path.name == "__main__.py" else set()
        for line, name in _tandem_imports(path):
            if name != package and name not in allowed | entry_point:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, f"{package} may import only {sorted(allowed)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", TOP_LEVEL)
def test_the_top_level_modules_import_no_package(module: str) -> None:
    allowed = {"tandem.cli"} if module == "__main__.py" else set()
    path = REPO / "tandem" / module
    bad = [f"{line}: {name}" for line, name in _tandem_imports(path) if name not in allowed]
    assert not bad, f"tandem/{module} imports {bad}"
