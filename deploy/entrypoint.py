"""The entry point of the deployment images (``Dockerfile``, ``Dockerfile.jetson``).

``docker run ... IMAGE COMMAND [ARGS ...]`` runs ``pocketseg COMMAND [ARGS ...]``,
which replaces this process (``exec``). Only the model package argument is handled
here: a command without one gets ``$POCKETSEG_MODEL``, and before ``predict`` and
``bench`` the package gets TensorRT engines for this GPU (built once, into the
package when it is writable, else into a copy in ``$POCKETSEG_ENGINE_CACHE``). What
it does, the environment variables and examples: ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketseg.atomic import atomic_output_dir, ensure_dir
from pocketseg.commands import subcommand_parser
from pocketseg.engine_build.tensorrt_build import build_package_engines
from pocketseg.errors import InputError, OutputError, PocketsegError
from pocketseg.manifest import MANIFEST_NAME, Manifest, load_package, sha256_file
from pocketseg.runtime.tensorrt_probe import gpu_identity, import_tensorrt, parse_version, select_engine

__all__ = ["Settings", "engines_for_this_device", "main", "prepare_package", "writable_package"]

log = logging.getLogger("pocketseg.entrypoint")

PROG = "pocketseg-entrypoint"
#: Commands whose package gets engines for this device before they run.
ENGINE_COMMANDS = ("predict", "bench")
#: Commands that get $POCKETSEG_MODEL when they name no package.
MODEL_COMMANDS = ENGINE_COMMANDS + ("doctor", "build-engine")
#: Argument names (argparse dests) of a model package in the pocketseg CLI.
MODEL_DESTS = ("model", "package_dir")
ENGINE_POLICIES = ("auto", "require", "off")
#: pocketseg's global options that come before the subcommand.
GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")
#: Files of a package folder copied besides manifest.json and the files it lists.
EXTRA_PACKAGE_FILES = ("export_report.json", "signature.json")

USAGE = f"""usage: {PROG} COMMAND [ARGS ...]   (runs: pocketseg COMMAND [ARGS ...])

Container entry point of pocketseg. predict, bench, doctor and build-engine use the model package
at $POCKETSEG_MODEL unless given one; before predict and bench, TensorRT engines for this GPU are
built once (into the package when it is writable, else into a copy in $POCKETSEG_ENGINE_CACHE).

environment:
  POCKETSEG_MODEL          model package folder [/model]
  POCKETSEG_ENGINE_CACHE   writable engine cache folder [/engines]
  POCKETSEG_ENGINES        auto | require | off: build engines on first start [auto]
  POCKETSEG_WORKSPACE_GB   TensorRT builder workspace in GB [4]
"""


@dataclass(frozen=True)
class Settings:
    """What the environment says; see the module docstring."""

    model: Path = Path("/model")
    engine_cache: Path = Path("/engines")
    engines: str = "auto"
    workspace_gb: float = 4.0

    @staticmethod
    def from_environment(env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        defaults = Settings()
        policy = env.get("POCKETSEG_ENGINES", defaults.engines).strip().lower()
        if policy not in ENGINE_POLICIES:
            raise InputError(None, f"POCKETSEG_ENGINES must be one of {', '.join(ENGINE_POLICIES)}, got {policy!r}")
        raw = env.get("POCKETSEG_WORKSPACE_GB", str(defaults.workspace_gb))
        try:
            workspace = float(raw)
        except ValueError:
            workspace = -1.0
        if not workspace > 0:
            raise InputError(None, f"POCKETSEG_WORKSPACE_GB must be a positive number of GB, got {raw!r}")
        return Settings(model=Path(env.get("POCKETSEG_MODEL") or defaults.model),
                        engine_cache=Path(env.get("POCKETSEG_ENGINE_CACHE") or defaults.engine_cache),
                        engines=policy, workspace_gb=workspace)


# ------------------------------------------------------------------------------------------------- engines, cache

def _engine_target() -> tuple[str, Any]:
    """(TensorRT version, GPU identity) of this machine; :class:`PocketsegError` saying why when either is missing."""
    return str(import_tensorrt().__version__), gpu_identity(0)


def engines_for_this_device(manifest: Manifest, tensorrt_version: str, compute_capability: str) -> bool:
    """Whether every stage of ``manifest`` has an engine for this TensorRT version and GPU."""
    return all(select_engine(stage, tensorrt_version, compute_capability) is not None
               for stage in manifest.stages.values())


def _writable(folder: Path) -> bool:
    # os.access reports EROFS for a read-only bind mount as well as missing permissions.
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def cache_entry(package: Path, cache: Path) -> Path:
    """The folder in ``cache`` for a copy of ``package``: named after it and its manifest's SHA-256.

    The manifest holds every file's checksum, so a changed package gets a new entry.
    """
    digest = sha256_file(package / MANIFEST_NAME)[:16]
    name = package.resolve().name or "model"
    return cache / f"{name}-{digest}"


def _copy_package(source: Path, manifest: Manifest, target: Path) -> None:
    """Copy the package's files (manifest.json and what it lists) to ``target``, atomically (temp folder + rename)."""
    ensure_dir(target.parent, "engine cache")
    with atomic_output_dir(target, overwrite=True) as temporary:
        names = [MANIFEST_NAME, *manifest.files(), *(n for n in EXTRA_PACKAGE_FILES if (source / n).is_file())]
        for name in dict.fromkeys(names):
            shutil.copyfile(source / name, temporary / name)


def _verified_copy(folder: Path) -> Manifest | None:
    """The manifest of a cached copy whose checksums verify, else None (a damaged copy is replaced)."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        return load_package(folder)
    except PocketsegError as exc:
        log.warning("ignoring the cached copy %s: %s", folder, exc)
        return None


def _usable_copy(folder: Path, tensorrt_version: str, compute_capability: str) -> Manifest | None:
    manifest = _verified_copy(folder)
    if manifest is None or not engines_for_this_device(manifest, tensorrt_version, compute_capability):
        return None
    return manifest


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock on the engine cache, so containers starting together build once."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle = open(cache / ".lock", "a+b")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        log.debug("no lock on %s (%s)", cache, exc)
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def _timing_cache(cache: Path, gpu: Any, tensorrt_version: str) -> Path | None:
    if not _writable(cache):
        return None
    major, minor = parse_version(tensorrt_version)
    return cache / f"timing_{gpu.sm}_trt{major}.{minor}.cache"


def _build(folder: Path, settings: Settings, gpu: Any, tensorrt_version: str) -> None:
    build_package_engines(folder, workspace_gb=settings.workspace_gb,
                          timing_cache=_timing_cache(settings.engine_cache, gpu, tensorrt_version), progress=True)


def _check_cache_writable(package: Path, cache: Path) -> None:
    if not _writable(cache):
        raise OutputError(cache, f"{package} is read-only and the engine cache is not writable; mount a writable "
                                 "volume there (e.g. -v pocketseg-engines:/engines)")


def prepare_package(package: str | os.PathLike, settings: Settings, *, build: bool = True) -> Path:
    """The package folder a command should use on this device, with engines for it where possible.

    Verifies the package (checksums). ``build=False`` only looks for engines (the package or its cached
    copy), ``build=True`` builds them when missing, following ``settings.engines``. Returns ``package``
    itself or its copy in the engine cache; never writes into a read-only package.
    """
    package = Path(package)
    manifest = load_package(package)
    if settings.engines == "off":
        return package
    try:
        tensorrt_version, gpu = _engine_target()
    except PocketsegError as exc:
        if settings.engines == "require" and build:
            raise
        log.info("no TensorRT engines on this machine (%s); the runtime picks another backend", exc)
        return package
    cc = gpu.compute_capability
    if engines_for_this_device(manifest, tensorrt_version, cc):
        return package
    cached = cache_entry(package, settings.engine_cache)
    if _usable_copy(cached, tensorrt_version, cc) is not None:
        log.info("using %s, a copy of %s with TensorRT engines for %s (compute capability %s, TensorRT %s)",
                 cached, package, gpu.name, cc, tensorrt_version)
        return cached
    if not build:
        return package
    with _cache_lock(settings.engine_cache):
        if _usable_copy(cached, tensorrt_version, cc) is not None:  # another container built them meanwhile
            return cached
        try:
            if _writable(package):
                log.warning("building TensorRT engines for %s (compute capability %s, TensorRT %s) into %s: this "
                            "adds the engine files to the package and rewrites its manifest.json (mount it read-only "
                            "to build into a copy in %s instead)", gpu.name, cc, tensorrt_version, package,
                            settings.engine_cache)
                _build(package, settings, gpu, tensorrt_version)
                return package
            _check_cache_writable(package, settings.engine_cache)
            log.warning("%s is read-only: building TensorRT engines for %s (compute capability %s, TensorRT %s) "
                        "into its copy %s", package, gpu.name, cc, tensorrt_version, cached)
            # A verified copy keeps the engines it holds for other GPUs (a cache volume shared between machines).
            if _verified_copy(cached) is None:
                _copy_package(package, manifest, cached)
            _build(cached, settings, gpu, tensorrt_version)
            return cached
        except PocketsegError as exc:
            if settings.engines == "require":
                raise
            log.warning("could not build TensorRT engines (%s); running without them (the runtime picks "
                        "another backend). Set POCKETSEG_ENGINES=require to fail instead.", exc)
            return package


def writable_package(package: str | os.PathLike, settings: Settings) -> Path:
    """``package`` when its folder is writable, else its copy in the engine cache (made when missing)."""
    package = Path(package)
    if _writable(package):
        return package
    manifest = load_package(package)
    cached = cache_entry(package, settings.engine_cache)
    with _cache_lock(settings.engine_cache):
        _check_cache_writable(package, settings.engine_cache)
        if _verified_copy(cached) is None:
            _copy_package(package, manifest, cached)
    log.warning("%s is read-only: building into its copy %s", package, cached)
    return cached


# --------------------------------------------------------------------------------------------------- the arguments

@dataclass(frozen=True)
class ModelArgument:
    """Where a subcommand takes its model package and what the user gave."""

    dest: str
    option: str | None  # "-m" for an option, None for a positional (build-engine's PKG_DIR)
    value: str | None


def find_model_argument(command: str, args: Sequence[str],
                        parser: argparse.ArgumentParser | None = None) -> ModelArgument | None:
    """The model package argument of ``pocketseg COMMAND ARGS`` (None when the command takes none)."""
    parser = subcommand_parser(command) if parser is None else parser
    if parser is None:
        return None
    action = next((a for a in parser._actions if a.dest in MODEL_DESTS), None)
    if action is None:
        return None
    if action.option_strings:
        # Parse only this option, so that the command's other required arguments do not matter here.
        mini = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        mini.add_argument(*action.option_strings, dest="value", default=None)
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                known, _ = mini.parse_known_args(list(args))
            except SystemExit:  # "-m" without a value: pocketseg itself will say so
                return ModelArgument(action.dest, action.option_strings[0], None)
        return ModelArgument(action.dest, action.option_strings[0], known.value)
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            known, _ = parser.parse_known_args(list(args))
        except SystemExit:  # the positional is missing
            return ModelArgument(action.dest, None, None)
    return ModelArgument(action.dest, None, getattr(known, action.dest, None))


def with_model(args: Sequence[str], found: ModelArgument, path: Path | str) -> list[str]:
    """``args`` naming ``path`` as the package: a last ``-m PATH`` (argparse keeps the last), or the positional."""
    args = list(args)
    if found.option is not None:
        return args + [found.option, str(path)]
    if found.value is None:
        return [str(path)] + args
    index = next(i for i, a in enumerate(args) if a == found.value)
    args[index] = str(path)
    return args


def plan(argv: Sequence[str], settings: Settings) -> list[str]:
    """The ``pocketseg`` arguments to run for the container arguments ``argv`` (engines prepared on the way)."""
    argv = list(argv)
    split = next((i for i, a in enumerate(argv) if a not in GLOBAL_FLAGS), len(argv))
    head, command, rest = argv[:split], (argv[split] if split < len(argv) else None), argv[split + 1:]
    if command not in MODEL_COMMANDS or any(a in ("-h", "--help") for a in rest):
        return argv
    found = find_model_argument(command, rest)
    if found is None:
        return argv
    if found.value is None:
        if not (settings.model / MANIFEST_NAME).is_file():
            if command != "doctor":
                log.info("no model package at %s (POCKETSEG_MODEL): mount one there or name one", settings.model)
            return argv
        log.info("model package: %s (POCKETSEG_MODEL)", settings.model)
        package = settings.model
    else:
        package = Path(found.value)
        if not package.is_dir():
            return argv  # pocketseg reports the bad path itself
    if command == "build-engine":
        use = writable_package(package, settings)
    elif command == "doctor":
        try:  # the doctor reports on the package the runtime would use; a refused package is its to report
            use = prepare_package(package, settings, build=False)
        except PocketsegError:
            use = package
    else:
        use = prepare_package(package, settings, build=True)
    if found.value is not None and use == package:
        return argv
    if use != package:
        log.info("running %s with -m %s", command, use)
    return head + [command] + with_model(rest, found, use)


def _exec(args: list[str]) -> None:  # pragma: no cover - replaces the process
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pocketseg", *args])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = argv[:next((i for i, a in enumerate(argv) if a not in GLOBAL_FLAGS), len(argv))]
    quiet = any(a in ("-q", "--quiet") for a in leading)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        argv = ["--help"]
    try:
        args = plan(argv, Settings.from_environment())
    except PocketsegError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    _exec(args)
    return 0  # pragma: no cover - only reached when _exec is replaced (tests)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
