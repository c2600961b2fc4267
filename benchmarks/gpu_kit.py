"""The GPU check's kit: the packages a bare, offline GPU machine lacks, packed to travel with the source tree.

A lent GPU machine starts bare and offline (Python 3.12, torch with CUDA 13, CuPy for CUDA 13,
ONNX Runtime for the CPU, no TensorRT, no cuCIM) and takes at most 64 MiB along with the tree.
This module makes that luggage here and unpacks it there::

    make gpu-wheels   # here, with network: python -m pocketseg.benchmarks.gpu_kit wheels --kit gpu-kit ...
    make gpu-check    # there, offline: python3 benchmarks/gpu_kit.py unpack --kit gpu-kit, then the check

``wheels`` downloads the Python 3.12 manylinux x86_64 wheels into ``KIT/wheels`` (pocketseg's
own wheel built from this tree, nibabel, isal, connected-components-3d, pydicom, onnx-graphsurgeon,
cuCIM for CUDA 13) and ``KIT/peer-wheels`` (nnU-Net v2 and what its predictor imports that the
machine lacks), pins every package installed here to the version installed here (the versions
``make test`` ran with), installs each set with pip into a staging folder for that target and
packs it as an xz tar archive into ``KIT/carry``, the folder that travels. The archives are
what makes the peer fit: SimpleITK's wheel alone is 50 MiB deflated, its installed files 26 MiB
as xz. When the peer still does not fit beside the rest, its archive goes to ``KIT/carry-peer``
with a lighter base (no cuCIM, no pydicom) for a second call. ``--ct-examples DIR`` adds a copy
of the real CT images (smallest first, as many as fit) to ``KIT/carry/ct_examples``. ``KIT/carry/kit.json`` records what
was packed, the sizes and the commit.

``unpack`` runs on the GPU machine before pocketseg can be imported there, so this module uses
the standard library alone and runs as a file (``python3 benchmarks/gpu_kit.py unpack``). It
extracts the archives into ``KIT/site`` (put on ``PYTHONPATH``; the machine's own packages
are not touched), then reinstalls pocketseg from the travelling tree with pip (offline, no
dependencies), so the check runs the tree's code even when the kit is older than the tree; the
packed wheel stays in place if that build fails. ``KIT/site/unpack.json`` records which.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["BASE_PACKAGES", "LIMIT_MIB", "PEER_PACKAGES", "build_kit", "tree_size_bytes", "unpack"]

MIB = 2**20
#: What travels to the GPU machine (tree, carried folders), at most.
LIMIT_MIB = 64.0
#: Room kept free below the limit: the tree grows between packing and the call.
MARGIN_MIB = 1.0
PYTHON_VERSION = "3.12"
#: manylinux tags pip may pick for the GPU machine (pip matches each tag exactly).
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")
#: What the check needs that the GPU machine's image lacks (its package list is in the development docs).
BASE_PACKAGES = ("nibabel", "isal", "connected-components-3d", "pydicom", "onnx-graphsurgeon", "cucim-cu13")
#: What nnU-Net v2's predictor imports that the image lacks (besides the packages above); the Makefile pins nnU-Net.
PEER_PACKAGES = ("nnunetv2", "dynamic-network-architectures", "acvl-utils", "batchgenerators", "blosc2", "ndindex",
                 "SimpleITK")
#: Left out of the base that travels beside the peer when both do not fit in one call.
HEAVY_BASE = ("cucim", "pydicom")
XZ_PRESET = 9
PIP_TIMEOUT_S = 900
CARRY, CARRY_PEER, SITE = "carry", "carry-peer", "site"
KIT_RECORD, UNPACK_RECORD = "kit.json", "unpack.json"


class KitError(RuntimeError):
    """The kit could not be made or unpacked; the message says which step and why."""


# --------------------------------------------------------------------------------------------------------- here

def _run(argv: Sequence[str], what: str, cwd: str | os.PathLike | None = None) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=PIP_TIMEOUT_S, cwd=cwd, check=False)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
        # pip ends with generic hints; the line naming the cause usually starts with "error:" further up.
        causes = [ln for ln in lines if ln.lower().startswith("error:")][:3]
        raise KitError(f"{what} failed (exit status {done.returncode}): {' | '.join(causes or lines[-6:])}")


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def _target_flags() -> list[str]:
    flags = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def pinned(requirement: str) -> str:
    """``name==version`` of the version installed here when the requirement names no version; else unchanged."""
    if re.search(r"[=<>!~ ;\[]", requirement):
        return requirement
    try:
        return f"{requirement}=={importlib.metadata.version(requirement)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement


def _wheel_name(requirement: str) -> str:
    """The start of a wheel's file name for a requirement (names normalised as wheels write them)."""
    name = re.split(r"[=<>!~ ;\[]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(folder: Path, requirement: str) -> Path | None:
    prefix = _wheel_name(requirement) + "-"
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _fits_target(wheel: Path) -> bool:
    """A wheel the GPU machine can install: pure Python, or CPython 3.12 (or abi3) on x86_64 Linux."""
    tags = wheel.name[:-4].split("-")[-3:]
    python, abi, platform = tags
    if platform == "any":
        return python.startswith("py3") or "py3" in python.split(".")
    return "x86_64" in platform and "linux" in platform and (python == "cp312" or abi == "abi3")


def download(requirements: Sequence[str], folder: Path) -> list[Path]:
    """Wheels of ``requirements`` for the GPU machine in ``folder``: binary wheels, else wheels built here.

    Packages published as source only (nnU-Net, acvl-utils, batchgenerators) are built here with
    pip; they are pure Python, which is checked.
    """
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for requirement in requirements:
        try:
            _run(_pip("download", "--quiet", "--no-deps", *_target_flags(), "--dest", str(folder), requirement),
                 f"download of {requirement}")
        except KitError:
            _run(_pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder), requirement),
                 f"wheel build of {requirement}")
        wheel = _find_wheel(folder, requirement)
        if wheel is None or not _fits_target(wheel):
            raise KitError(f"no wheel of {requirement} for CPython {PYTHON_VERSION} on x86_64 Linux "
                           f"({wheel.name if wheel else 'none found'})")
        wheels.append(wheel)
    return wheels


def build_own_wheel(root: Path, folder: Path) -> Path:
    """pocketseg's wheel from the tree at ``root`` (pure Python)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("pocketseg-*.whl"):
        old.unlink()
    _run(_pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(folder), str(root)),
         "build of the pocketseg wheel")
    wheel = _find_wheel(folder, "pocketseg")
    if wheel is None:
        raise KitError(f"pip built no pocketseg wheel into {folder}")
    return wheel


def pack(wheels: Sequence[Path], archive: Path) -> Path:
    """Install ``wheels`` for the GPU machine into a staging folder and pack it as ``archive`` (.tar.xz)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pocketseg-gpu-kit-") as tmp:
        stage = Path(tmp) / "site"
        _run(_pip("install", "--quiet", "--no-index", "--no-deps", "--no-compile", *_target_flags(),
                  "--target", str(stage), *map(str, wheels)), f"staging of {archive.name}")
        partial = archive.with_name(archive.name + ".part")
        with tarfile.open(partial, "w:xz", preset=XZ_PRESET) as tar:
            for entry in sorted(stage.iterdir()):
                if entry.name != "bin":  # console scripts with this machine's interpreter path; the check runs none
                    tar.add(entry, arcname=entry.name)
        partial.replace(archive)
    return archive


def tree_size_bytes(root: Path) -> int:
    """Bytes of the files that travel with every call: tracked and untracked files that git does not ignore."""
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, timeout=60, check=True)
    total = 0
    for name in {n for n in done.stdout.decode("utf-8", "surrogateescape").split("\0") if n}:
        path = root / name
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _commit(root: Path) -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root, capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _mib(n_bytes: float) -> float:
    return round(n_bytes / MIB, 2)


def build_kit(kit: str | os.PathLike = "gpu-kit", *, base: Sequence[str] = BASE_PACKAGES,
              peer: Sequence[str] = PEER_PACKAGES, with_peer: bool = True,
              ct_examples: str | os.PathLike | None = None, root: str | os.PathLike = ".",
              limit_mib: float = LIMIT_MIB) -> dict[str, Any]:
    """Download, pack and place the kit; returns the record written to ``KIT/carry/kit.json``.

    ``base``/``peer``: requirements (a bare name is pinned to the version installed here).
    ``with_peer``: also the nnU-Net peer. ``ct_examples``: a folder to copy into the carried
    folder when it fits. ``limit_mib``: what may travel with one call, tree included.
    """
    kit, root = Path(kit), Path(root)
    carry, carry_peer = kit / CARRY, kit / CARRY_PEER
    for folder in (carry, carry_peer):
        if folder.exists():
            shutil.rmtree(folder)
    carry.mkdir(parents=True)
    started = time.perf_counter()
    base_reqs = [pinned(r) for r in base]
    own = build_own_wheel(root, kit / "wheels")
    base_wheels = [own, *download(base_reqs, kit / "wheels")]
    record: dict[str, Any] = {
        "format": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": _commit(root),
        "python": PYTHON_VERSION, "platforms": list(PLATFORMS), "limit_mib": limit_mib,
        "base": {"requirements": base_reqs, "wheels": [w.name for w in base_wheels],
                 "wheels_mib": _mib(sum(w.stat().st_size for w in base_wheels))},
    }
    pack(base_wheels, carry / "base.tar.xz")
    record["base"]["archive_mib"] = _mib((carry / "base.tar.xz").stat().st_size)
    tree = tree_size_bytes(root)
    record["tree_mib"] = _mib(tree)
    budget = (limit_mib - MARGIN_MIB) * MIB - tree
    notes = []
    if with_peer:
        peer_reqs = [pinned(r) for r in peer]
        peer_wheels = download(peer_reqs, kit / "peer-wheels")
        pack(peer_wheels, kit / "peer.tar.xz")
        peer_bytes = (kit / "peer.tar.xz").stat().st_size
        record["peer"] = {"requirements": peer_reqs, "wheels": [w.name for w in peer_wheels],
                          "wheels_mib": _mib(sum(w.stat().st_size for w in peer_wheels)),
                          "archive_mib": _mib(peer_bytes)}
        if _folder_bytes(carry) + peer_bytes <= budget:
            (kit / "peer.tar.xz").replace(carry / "peer.tar.xz")
            record["peer"]["placement"] = CARRY
        else:
            carry_peer.mkdir()
            (kit / "peer.tar.xz").replace(carry_peer / "peer.tar.xz")
            lite = [w for w in base_wheels if not w.name.lower().startswith(HEAVY_BASE)]
            pack(lite, carry_peer / "base.tar.xz")
            record["peer"]["placement"] = CARRY_PEER
            record["peer"]["second_call_mib"] = _mib(_folder_bytes(carry_peer) + tree)
            notes.append(f"the nnU-Net peer does not fit beside the rest: a second call carries {kit / CARRY_PEER} "
                         f"(peer + base without {', '.join(HEAVY_BASE)}) and runs `make gpu-check STEPS=bench`")
    if ct_examples is not None:
        record["ct_examples"] = _carry_ct_examples(Path(ct_examples), carry / "ct_examples",
                                                   budget - _folder_bytes(carry), notes)
    record["carry_mib"] = _mib(_folder_bytes(carry))
    record["call_mib"] = _mib(_folder_bytes(carry) + tree)
    record["fits"] = record["call_mib"] <= limit_mib
    record["notes"] = notes
    record["seconds"] = round(time.perf_counter() - started, 1)
    for folder in (carry, carry_peer):
        if folder.is_dir():
            (folder / KIT_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _entry_bytes(path: Path) -> int:
    return _folder_bytes(path) if path.is_dir() else path.stat().st_size


def _carry_ct_examples(source: Path, target: Path, room: float, notes: list[str]) -> dict[str, Any]:
    """Copy the CT images of ``source`` (NIfTI files other than segmentations, DICOM series folders) and its
    notice into ``target``, smallest first, as many as fit in ``room`` bytes; the check reads only the images."""
    record: dict[str, Any] = {"source": str(source), "placement": None, "carried": [], "left_out": []}
    if not source.is_dir():
        notes.append(f"no CT examples at {source}: none carried")
        return record
    images = [p for p in source.iterdir() if p.is_dir() or (p.name.lower().endswith((".nii", ".nii.gz"))
                                                             and "seg" not in p.name.lower())]
    notices = [p for p in source.iterdir() if p.is_file() and p.suffix.lower() == ".md"]
    used = sum(p.stat().st_size for p in notices)
    for path in sorted(images, key=_entry_bytes):
        if used + _entry_bytes(path) <= room:
            used += _entry_bytes(path)
            record["carried"].append(path.name)
        else:
            record["left_out"].append(path.name)
    if record["carried"]:
        target.mkdir(parents=True)
        for path in notices + [source / name for name in record["carried"]]:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, target / path.name)
        record["placement"] = CARRY
    record["mib"] = _mib(used if record["carried"] else 0)
    if record["left_out"]:
        notes.append(f"CT examples left out for room: {', '.join(record['left_out'])} (PEER=0 leaves room for all)")
    return record


def format_kit(record: dict[str, Any], kit: Path) -> str:
    """The summary ``make gpu-wheels`` prints."""
    lines = [(f"wheels of the base: {record['base']['wheels_mib']:.2f} MiB in {kit / 'wheels'} "
              f"-> {record['base']['archive_mib']:.2f} MiB packed")]
    peer = record.get("peer")
    if peer:
        lines.append(f"wheels of the nnU-Net peer: {peer['wheels_mib']:.2f} MiB in {kit / 'peer-wheels'} -> "
                     f"{peer['archive_mib']:.2f} MiB packed, placed in {kit / peer['placement']}")
    ct = record.get("ct_examples")
    if ct:
        lines.append(f"CT examples: {len(ct['carried'])} carried ({ct.get('mib', 0):.2f} MiB) in "
                     f"{kit / CARRY / 'ct_examples'}" if ct["carried"] else "CT examples: none carried")
    lines.append(f"tree {record['tree_mib']:.2f} MiB + {kit / CARRY} {record['carry_mib']:.2f} MiB = "
                 f"{record['call_mib']:.2f} MiB per call (limit {record['limit_mib']:g} MiB): "
                 + ("fits" if record["fits"] else "DOES NOT FIT"))
    if peer and peer.get("second_call_mib"):
        lines.append(f"second call with {kit / CARRY_PEER}: {peer['second_call_mib']:.2f} MiB")
    lines += [f"note: {n}" for n in record["notes"]]
    lines.append(f"carry on the GPU call: [\"{kit / CARRY}\"]")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- there

def _extract(archive: Path, site: Path) -> None:
    with tarfile.open(archive, "r:xz") as tar:
        try:
            tar.extractall(site, filter="data")
        except TypeError:  # Python < 3.12 without extraction filters: the archive is our own
            tar.extractall(site)


def unpack(kit: str | os.PathLike = "gpu-kit", *, root: str | os.PathLike = ".",
           site: str | os.PathLike | None = None) -> dict[str, Any]:
    """Extract every carried archive into ``KIT/site``, then install pocketseg from the tree at ``root`` into it.

    Returns the record written to ``KIT/site/unpack.json``. Nothing outside ``KIT/site`` is changed.
    """
    kit, root = Path(kit), Path(root)
    site = Path(site) if site is not None else kit / SITE
    archives = sorted(p for folder in (kit / CARRY, kit / CARRY_PEER) for p in folder.glob("*.tar.xz"))
    # carry-peer's lighter base comes second: its files are a subset of the full base's.
    if not archives:
        raise KitError(f"no packed archives in {kit / CARRY} or {kit / CARRY_PEER}: run `make gpu-wheels` where "
                       f"there is network and carry {kit / CARRY}")
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    started = time.perf_counter()
    for archive in archives:
        _extract(archive, site)
    record: dict[str, Any] = {"archives": [str(a) for a in archives], "site": str(site)}
    try:
        _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "--quiet",
              "--no-index", "--no-deps", "--no-build-isolation", "--upgrade", "--target", str(site), str(root)],
             "install of pocketseg from the tree")
        record["pocketseg"] = "built from the tree"
    except (KitError, subprocess.SubprocessError, OSError) as exc:
        record["pocketseg"] = f"the packed wheel (building from the tree failed: {exc})"
    record["seconds"] = round(time.perf_counter() - started, 1)
    kit_record = next((p for p in (kit / CARRY / KIT_RECORD, kit / CARRY_PEER / KIT_RECORD) if p.is_file()), None)
    if kit_record is not None:
        record["kit"] = json.loads(kit_record.read_text(encoding="utf-8"))
    (site / UNPACK_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketseg.benchmarks.gpu_kit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="download and pack the kit here (needs network)")
    wheels.add_argument("--kit", type=Path, default=Path("gpu-kit"), help="the kit folder (git-ignored)")
    wheels.add_argument("--base", default=" ".join(BASE_PACKAGES), help="requirements of the base, space-separated")
    wheels.add_argument("--peer", default=" ".join(PEER_PACKAGES), help="requirements of the nnU-Net peer")
    wheels.add_argument("--no-peer", dest="with_peer", action="store_false", help="leave the nnU-Net peer out")
    wheels.add_argument("--ct-examples", type=Path, default=None, help="carry a copy of this folder when it fits")
    wheels.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="what one call may carry, tree included")
    unpack_cmd = sub.add_parser("unpack", help="extract the kit on the GPU machine (offline)")
    unpack_cmd.add_argument("--kit", type=Path, default=Path("gpu-kit"), help="the kit folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "wheels":
            record = build_kit(args.kit, base=args.base.split(), peer=args.peer.split(), with_peer=args.with_peer,
                               ct_examples=args.ct_examples, limit_mib=args.limit_mib)
            print(format_kit(record, args.kit))
            return 0 if record["fits"] else 1
        record = unpack(args.kit)
        print(f"unpacked {len(record['archives'])} archives into {record['site']} in {record['seconds']} s; "
              f"pocketseg: {record['pocketseg']}")
        return 0
    except KitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
