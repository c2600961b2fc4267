"""Exceptions raised at the package's edges.

Every problem with user input is reported as one :class:`InputError` that
names the file and the problem; the CLI prints it as a single line.
"""

from __future__ import annotations

import importlib.util
import os


class PocketsegError(Exception):
    """Base class of the errors the CLI reports without a traceback."""


class InputError(PocketsegError, ValueError):
    """A user-supplied file, folder or value is unusable."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


class OutputError(PocketsegError, OSError):
    """An output cannot be written (exists and overwriting was not asked for, unwritable, ...)."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingDependencyError(PocketsegError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""

    def __init__(self, package: str, feature: str, extra: str):
        super().__init__(
            f"{feature} needs the optional package '{package}'; "
            f"install it with: pip install 'pocketseg[{extra}]'"
        )


def require(module: str, feature: str, extra: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` is importable (without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(module, feature, extra)
