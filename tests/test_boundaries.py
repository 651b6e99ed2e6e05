"""Import contract (the house style): engine and ingest never import app, Qt or each other;
torch and mlx are imported only inside engine/backends/<name>/; none of the product's
packages imports the benchmarks (bench/)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def top(name: str) -> str:
    return name.split(".")[0]


def test_engine_and_ingest_stay_independent():
    for package, forbidden in (("engine", {"app", "ingest", "PySide6"}), ("ingest", {"app", "engine", "PySide6", "torch", "mlx"})):
        for path in files(package):
            bad = {m for m in imported_modules(path) if top(m) in forbidden}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_torch_and_mlx_only_inside_their_backends():
    for package in ("engine", "ingest", "app"):
        for path in files(package):
            relative = path.relative_to(ROOT).as_posix()
            for module in imported_modules(path):
                for lib in ("torch", "mlx"):
                    if top(module) == lib:
                        assert relative.startswith(f"engine/backends/{lib}/"), f"{relative} imports {module}"


def test_the_product_never_imports_the_benchmarks():
    """bench/ sits beside the product: it may import app, engine and ingest; none of
    them imports it (`quire bench` is an entry-point plugin, app/cli.py COMMAND_PLUGINS)."""
    for package in ("app", "engine", "ingest"):
        for path in files(package):
            bad = {m for m in imported_modules(path) if top(m) == "bench"}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
