"""The architecture: the layers contract (import-linter), imports inside functions, the CLI's dispatch and reference."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from import_graph import OPTIONAL, ROOT, function_imports, module_files, rooms
from pocketseg.cli import HANDLERS
from pocketseg.commands import build_parser, cli_reference


def _lint_imports() -> Path | None:
    exe = Path(sys.executable).with_name("lint-imports")
    return exe if exe.is_file() else (Path(found) if (found := shutil.which("lint-imports")) else None)


def test_every_room_is_linked_into_the_package_folder():
    # The links make the source tree read as the installed namespace (plain `lint-imports` in the root).
    found = rooms()
    assert {"runtime", "trainer", "engine_build", "evaluation", "deploy", "benchmarks"} <= set(found)
    for name, folder in found.items():
        link = ROOT / "pocketseg" / name
        assert link.is_symlink(), f"pocketseg/{name} should be a link to ../{name}"
        assert link.resolve() == folder.resolve()


def test_layers_contract_holds():
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (extra 'test')")
    # Run as a user would: plain `lint-imports` in the repository root.
    done = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "3 kept" in done.stdout


def test_a_broken_layer_is_caught(tmp_path):
    # The contract must be able to fail: a copy of the tree whose runtime imports the trainer.
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (extra 'test')")
    package = tmp_path / "pocketseg"
    package.mkdir()
    for entry in (ROOT / "pocketseg").iterdir():
        if entry.name not in ("__pycache__", "runtime"):
            (package / entry.name).symlink_to(entry.resolve())
    runtime = package / "runtime"
    shutil.copytree(ROOT / "runtime", runtime, ignore=shutil.ignore_patterns("__pycache__"))
    with open(runtime / "intensity.py", "a", encoding="utf-8") as handle:
        handle.write("\nfrom pocketseg.trainer import presets  # noqa: E402\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    done = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pocketseg.runtime is not allowed to import pocketseg.trainer" in done.stdout


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _needs_optional(module: str, files: dict[str, Path], seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` imports an optional dependency at some module's top level."""
    seen = set() if seen is None else seen
    if module in seen or module not in files:
        return False
    seen.add(module)
    for name in _top_level_imports(files[module]):
        if name.split(".")[0] in OPTIONAL:
            return True
        if name.startswith("pocketseg") and _needs_optional(name, files, seen):
            return True
    return False


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A comment on the import line, or above the block of imports it belongs to (its ``try:`` included)."""
    i = lineno - 1
    while i >= 0:
        if "#" in lines[i]:
            return True
        text = lines[i].strip()
        if i < lineno - 1 and not (text == "" or text.startswith(("import ", "from ", "try:")) or text.endswith(")")):
            return False
        i -= 1
    return False


def test_imports_inside_functions_are_optional_dependencies_with_a_reason():
    files = module_files()
    problems, count = [], 0
    for name, path in files.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, module, function in function_imports(path):
            count += 1
            where = f"{path.relative_to(ROOT)}:{lineno} ({function})"
            optional = module.split(".")[0] in OPTIONAL
            if not optional and module.startswith("pocketseg"):
                optional = _needs_optional(module, files)
            if not optional:
                problems.append(f"{where}: {module} is not an optional dependency; import it at the top")
            elif not _has_reason(lines, lineno):
                problems.append(f"{where}: lazy import of {module} without a one-line reason")
    assert not problems, "\n".join(problems)
    # Down from about 200 (before the rooms were reorganised) to the optional dependencies; 64 since Ray,
    # cryptography, highdicom and hypothesis joined them.
    assert count < 70, count


def test_every_subcommand_has_a_handler_and_every_handler_a_subcommand():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == set(HANDLERS)


def test_the_engine_choices_of_the_cli_are_the_runtimes():
    from pocketseg import commands
    from pocketseg.runtime import engines

    assert commands.BACKEND_CHOICES == ("auto",) + engines.BACKENDS
    assert commands.DEVICE_CHOICES == ("auto",) + engines.DEVICES
    assert commands.PRECISION_CHOICES == ("auto",) + engines.PRECISIONS



def test_the_output_types_of_the_cli_are_the_runtimes():
    from pocketseg import commands
    from pocketseg.runtime import dicom_output

    assert commands.OUTPUT_TYPE_CHOICES == tuple(dicom_output.OUTPUT_TYPES)


def test_the_cli_reference_is_up_to_date():
    page = ROOT / "docs" / "cli.md"
    assert page.is_file(), "docs/cli.md is missing: run make docs"
    assert page.read_text(encoding="utf-8") == cli_reference(), "docs/cli.md is stale: run make docs"
    for command in HANDLERS:
        assert f"## pocketseg {command}" in cli_reference()
