"""Stage the installed package for import-linter, and count the imports written inside functions.

The rooms (``runtime/``, ``trainer/``, ...) live beside ``pocketseg/`` and reach
the ``pocketseg`` namespace through setup.py's ``package_dir``; import-linter
(grimp) reads a package from one folder. :func:`stage` builds that folder from
links: ``STAGE/pocketseg`` holds links to the core's files and one link per
room, found where the import system finds it.

    python tests/import_graph.py STAGE_DIR     # stage, then: cd STAGE_DIR && lint-imports --config pyproject.toml
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Third-party packages that are optional (an extra, or NVIDIA's): the only imports a function may hold.
OPTIONAL = {"torch", "safetensors", "onnx", "onnx_graphsurgeon", "onnxruntime", "tensorrt", "cuda", "cupy", "cupyx",
            "cucim", "cc3d", "pydicom", "matplotlib", "batchgeneratorsv2", "nnunetv2", "pynvml", "psutil",
            "openvino", "ray", "highdicom", "rt_utils"}


def rooms() -> dict[str, Path]:
    """``{subpackage: folder}`` of the installed ``pocketseg`` whose folder is not inside ``pocketseg/``."""
    core = Path(importlib.util.find_spec("pocketseg").origin).parent
    found = {}
    for folder in sorted(ROOT.iterdir()):
        if (folder / "__init__.py").is_file() and folder.name not in ("pocketseg", "tests"):
            spec = importlib.util.find_spec(f"pocketseg.{folder.name}")
            if spec is not None and spec.submodule_search_locations:
                location = Path(list(spec.submodule_search_locations)[0])
                if core not in location.parents:
                    found[folder.name] = location
    return found


def stage(target: Path) -> Path:
    """``target/pocketseg``: links to the core's entries and to every room; returns ``target``."""
    core = Path(importlib.util.find_spec("pocketseg").origin).parent
    package = target / "pocketseg"
    if target.exists():
        shutil.rmtree(target)
    package.mkdir(parents=True)
    for entry in core.iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in rooms().items():
        (package / name).symlink_to(folder)
    return target


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
            if prefix == "pocketseg" and rel and rel[0] in rooms():
                continue
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/import_graph.py STAGE_DIR")
    print(stage(Path(sys.argv[1])))
