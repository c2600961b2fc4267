"""The memory a scan's prediction will need, estimated before anything is allocated, and the limit it must stay under.

The resampled grids grow with the physical extent of the scan divided by the stages' spacing, not with its
voxel count: a header that claims 100 mm voxels turns a small array into a grid of billions of voxels. The
estimate is taken from the header alone (shape and spacing), for the worst case the cascade can meet (the
ROI box covering the whole scan), and a scan above the limit is refused with one line before any large
array exists, instead of ending in an allocation error (or, on a machine big enough to try, in swapping).

The default limit is :data:`DEFAULT_FRACTION` of the machine's physical memory: the estimate is of the
prediction's own arrays, and the rest is left to the model's engines, the reader and writer threads, the
operating system and other processes. Physical memory rather than the memory free now, so that the same
scan is accepted or refused the same way from run to run. On a GPU the grids live in device memory, but a
scan that does not fit there is retried on the CPU (runtime.cascade), so host memory is the bound that
matters in the end.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pocketseg.errors import InputError
from pocketseg.manifest import Inference, Manifest
from pocketseg.runtime.resample import target_shape

__all__ = ["DEFAULT_FRACTION", "MemoryEstimate", "check_memory", "default_limit_bytes", "estimate_memory",
           "format_bytes", "machine_memory_bytes", "parse_size"]

log = logging.getLogger(__name__)

#: Share of the machine's physical memory a scan's estimate may take by default (see the module docstring).
DEFAULT_FRACTION = 0.75

GIB = 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: str | int | float | None) -> int | None:
    """A memory size in bytes: a number of bytes, or a number with a unit (``8GiB``, ``512MiB``, ``16GB``;
    KiB/MiB/GiB/TiB are powers of 1024, kB/MB/GB/TB powers of 1000, a bare K/M/G/T is binary as in
    ``docker --memory``); None stays None (the default limit)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(None, f"--max-memory (max_memory= from Python) must be a size such as 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if match is None or match["unit"].lower() not in _UNITS:
            raise InputError(None, f"--max-memory (max_memory= from Python) must be a size such as 8GiB, 512MiB or "
                                   f"16GB, got {value!r}")
        number, unit = float(match["number"]), match["unit"].lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise InputError(None, f"--max-memory (max_memory= from Python) must be a positive size, got {value!r}")
    return int(size)


def format_bytes(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"


def machine_memory_bytes() -> int | None:
    """The machine's physical memory, where the platform tells (None where it does not)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def default_limit_bytes() -> int | None:
    """:data:`DEFAULT_FRACTION` of the machine's physical memory (None: unknown, no limit)."""
    total = machine_memory_bytes()
    return None if total is None else int(total * DEFAULT_FRACTION)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the prediction of one scan is expected to allocate at its peak, and the grids behind them."""

    total: int
    grids_zyx: dict[str, tuple[int, int, int]]  # "input" and each stage's resampled grid of the whole scan
    parts: dict[str, int]  # bytes: "full resolution" and each stage's own arrays


def estimate_memory(shape_zyx: Sequence[int], spacing_mm_zyx: Sequence[float], manifest: Manifest,
                    settings: Inference) -> MemoryEstimate:
    """The peak memory of predicting a scan of ``shape_zyx`` voxels at ``spacing_mm_zyx`` (the detail stage's
    view of it), from the header alone.

    Each stage's grid is the whole scan at the stage's spacing (the ROI box may be the whole scan). Per voxel
    of a stage's grid: the normalised float32 input and a float32 copy the resampling works on, the uint8
    labels, and where logits go back to the original grid the blended logits (float32, float16 with nnU-Net's
    numerics; twice where folds are summed) and their weight sum. The argmax band of the streamed sliding
    window is one patch deep. At full resolution: the float32 image on the device and three uint8 label
    maps (the crop's, the output, the copy handed back). The stages run one after the other, so the peak is
    the full-resolution arrays plus the larger stage.
    """
    shape = tuple(int(n) for n in shape_zyx)
    full = math.prod(shape)
    grids: dict[str, tuple[int, int, int]] = {"input": shape}  # type: ignore[dict-item]
    parts = {"full resolution": full * (4 + 3)}
    for name, stage in manifest.stages.items():
        grid = target_shape(shape, spacing_mm_zyx, stage.spacing_mm_zyx)
        grids[name] = grid
        n = math.prod(grid)
        need = n * (4 + 4 + 1)
        band = stage.num_classes * min(stage.patch_zyx[0], grid[0]) * grid[1] * grid[2] * 4
        if name == "detail" and settings.back_resampling == "logits":
            logit = 2 if settings.nnunet_numerics else 4
            copies = 2 if settings.nnunet_numerics and len(stage.members) > 1 else 1
            need += n * stage.num_classes * logit * copies + n * 4
        else:
            need += band
        parts[name] = need
    stages = [v for k, v in parts.items() if k != "full resolution"]
    return MemoryEstimate(parts["full resolution"] + max(stages, default=0), grids, parts)


def check_memory(estimate: MemoryEstimate, limit: int | None, source: object, spacing_mm_zyx: Sequence[float],
                 *, given: bool) -> None:
    """Refuse a scan whose estimate is above ``limit`` (None: no limit), with one line naming the file, its
    spacing, the grids, the estimate and the limit; ``given``: the limit came from ``--max-memory``."""
    if limit is None or estimate.total <= limit:
        return
    spacing = " x ".join(f"{s:g}" for s in reversed(tuple(spacing_mm_zyx)))
    grids = ", ".join(f"{name} {' x '.join(map(str, reversed(g)))}" for name, g in estimate.grids_zyx.items())
    if given:
        bound = f"the limit of {format_bytes(limit)} (--max-memory)"
    else:
        total = machine_memory_bytes() or 0
        bound = (f"the limit of {format_bytes(limit)} ({DEFAULT_FRACTION:.0%} of this machine's "
                 f"{format_bytes(total)}; --max-memory SIZE, max_memory= from Python, sets another)")
    raise InputError(source, f"voxel spacing {spacing} mm (x, y, z) gives resampled grids ({grids} voxels, x y z) "
                             f"that need about {format_bytes(estimate.total)}, above {bound}; check the header's "
                             f"voxel size")
