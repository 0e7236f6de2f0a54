"""The layout's rules, checked on the source: small modules and functions, and ``runtime/``
(what a board installs) importing nothing from the torch side, calibration or the benchmarks."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGES = ("fila_export", "runtime", "calibration", "benchmarks")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def sources(*packages: str):
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, path.read_text()


def test_modules_and_functions_fit_on_a_screen():
    too_long = []
    for path, text in sources(*PACKAGES):
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "\n".join(too_long)


def imported_packages(text: str) -> set[str]:
    """Top-level packages a module imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_imports_nothing_from_the_other_packages():
    forbidden = {"fila_export", "calibration", "benchmarks", "torch", "transformers", "timm"}
    found = {
        str(path.relative_to(ROOT)): sorted(imported_packages(text) & forbidden)
        for path, text in sources("runtime")
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_the_formatter_formats():
    marked = [
        str(path.relative_to(ROOT))
        for path, text in sources(*PACKAGES, "tests", "scripts")
        if "fmt: " + "skip" in text
    ]
    assert marked == []
