"""The package's module files, and the imports written inside functions.

The rooms (``runtime/``, ``trainer/``, ...) live beside ``pocketseg/`` and reach
the ``pocketseg`` namespace through setup.py's ``package_dir`` once installed.
In the source tree each room is also linked into ``pocketseg/`` (``pocketseg/runtime``
-> ``../runtime``), so the tree reads as the installed namespace: plain
``lint-imports`` in the repository root (import-linter walks one folder per package)
sees every room. setup.py skips those links; the wheel holds each file once.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Third-party packages that are optional (an extra, or NVIDIA's): the only imports a function may hold.
OPTIONAL = {"torch", "safetensors", "onnx", "onnx_graphsurgeon", "onnxruntime", "tensorrt", "cuda", "cupy", "cupyx",
            "cucim", "cc3d", "pydicom", "matplotlib", "batchgeneratorsv2", "nnunetv2", "pynvml", "psutil",
            "openvino", "ray", "highdicom", "rt_utils", "skimage", "cryptography", "hypothesis"}


def rooms() -> dict[str, Path]:
    """``{subpackage: folder}``: every folder beside ``pocketseg/`` that is a package (a room)."""
    return {f.name: f for f in sorted(ROOT.iterdir())
            if (f / "__init__.py").is_file() and not f.is_symlink() and f.name not in ("pocketseg", "tests")}


def module_files() -> dict[str, Path]:
    """Every module of the package (core and rooms): ``{dotted name: file}``."""
    out = {}
    places = {"pocketseg": ROOT / "pocketseg", **{f"pocketseg.{n}": f for n, f in rooms().items()}}
    for prefix, folder in places.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((prefix, *rel))
            out[name] = path
    return out


def function_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the function) of every import statement inside a function of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def walk(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inside = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if function is not None and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, function) for alias in child.names)
            elif function is not None and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, child.module or "", function))
            walk(child, inside)

    walk(tree, None)
    return found
