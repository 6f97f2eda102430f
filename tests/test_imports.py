"""The import graph: first-party code is imported as `tandem.*` only, and the packages'
dependencies point one way (kernels <- model <- train, serve; proto <- serve)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# repo folder -> (its import name, the tandem packages it may import besides itself).
# tandem/ holds the config leaf (imports nothing of tandem) and the CLI (imports the
# subcommands by name, lazily); a package's __main__.py may also import the CLI.
LAYERS: dict[str, tuple[str, set[str]]] = {
    "tandem": ("tandem.config", {"tandem.cli"}),
    "kernels": ("tandem.kernels", {"tandem.config"}),
    "model": ("tandem.model", {"tandem.config", "tandem.kernels"}),
    "train": ("tandem.train", {"tandem.config", "tandem.kernels", "tandem.model"}),
    "serve": (
        "tandem.serve",
        {"tandem.config", "tandem.kernels", "tandem.model", "tandem.proto"},
    ),
    "proto": ("tandem.proto", set()),
}
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


def test_first_party_code_is_imported_through_the_tandem_namespace() -> None:
    files = _python_files(*LAYERS, "benchmarks", "tests")
    assert len(files) > 50
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if name.split(".")[0] in OLD_TOP_LEVEL
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_dependencies_point_one_way(folder: str) -> None:
    own, allowed = LAYERS[folder]
    bad = []
    for path in _python_files(folder):
        entry_point = {"tandem.cli"} if path.name == "__main__.py" else set()
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "tandem" or len(parts) < 2:
                continue
            package = ".".join(parts[:2])
            if package != own and package not in allowed | entry_point:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, f"{own} may import only {sorted(allowed)}:\n" + "\n".join(bad)
