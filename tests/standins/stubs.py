"""NVIDIA's published type stubs of TensorRT's Python bindings (the registry's ``tensorrt-stubs``),
which the stand-in's surface and the runner's and build's types are held to.

``make setup`` installs them with ``--no-deps`` into ``<venv>/trt-stubs`` (their dependency is
the TensorRT wheel, which cannot be installed here; in site-packages their ``tensorrt/`` folder
would also make ``import tensorrt`` succeed as an empty namespace package). Five signatures in
them are not valid Python (a parameter named ``in``; a parameter without a default after ones
with defaults), which stops ``ast`` and mypy from reading the file: ``repaired`` writes a copy in
which those signatures take ``(self, *args, **kwargs)``. None of them is a method the runner, the
build or the stand-in uses (``BROKEN`` names them).
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

VERSION = "10.13.0.35.1"
BROKEN = {"add_scale_nd", "get_workspace_size", "configure_plugin", "on_shape_change"}
FIX = (
    f"make setup (pip install --no-deps --target {sys.prefix}/trt-stubs tensorrt-stubs=={VERSION})"
)


def installed() -> Path | None:
    folder = Path(sys.prefix) / "trt-stubs"
    return folder if (folder / "tensorrt_bindings" / "tensorrt.pyi").is_file() else None


def repaired(out: Path) -> Path:
    """A copy of the stubs in ``out`` that ``ast`` and mypy can read; returns ``out``."""
    source = installed()
    if source is None:
        raise FileNotFoundError(f"tensorrt-stubs are not installed; run {FIX}")
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(source / package, out / package, dirs_exist_ok=True)
    stub = out / "tensorrt_bindings" / "tensorrt.pyi"
    lines = stub.read_text().splitlines()
    for _ in range(len(BROKEN) + 4):
        try:
            ast.parse("\n".join(lines))
            break
        except SyntaxError as exc:
            line = lines[exc.lineno - 1]
            name = re.search(r"def (\w+)\(", line)
            if name is None or name.group(1) not in BROKEN:
                raise
            lines[exc.lineno - 1] = re.sub(
                r"\(.*\)( ->|:)", r"(self, *args, **kwargs)\1", line, count=1
            )
    stub.write_text("\n".join(lines) + "\n")
    (out / "tensorrt" / "py.typed").write_text("partial\n")
    return out


def stub_classes(stubs: Path) -> dict[str, ast.ClassDef]:
    """Every class of the bindings' stub by name, nested ones as ``Outer.Inner``."""
    tree = ast.parse((stubs / "tensorrt_bindings" / "tensorrt.pyi").read_text())
    found: dict[str, ast.ClassDef] = {}

    def walk(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                found[prefix + node.name] = node
                walk(node.body, f"{prefix}{node.name}.")

    walk(tree.body, "")
    return found


def members(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> dict[str, list[str] | None]:
    """A stub class's members (with its stub bases'): methods -> parameter names, attributes and
    enum values -> None."""
    out: dict[str, list[str] | None] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            out |= members(classes[base.id], classes)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            params = [a.arg for a in [*node.args.args, *node.args.kwonlyargs]]
            if node.args.vararg or node.args.kwarg:
                params.append("*")
            previous = out.get(node.name) or []
            out[node.name] = list(dict.fromkeys([*previous, *params]))  # overloads: all names
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
        elif isinstance(node, ast.ClassDef):
            out[node.name] = None
    return out
