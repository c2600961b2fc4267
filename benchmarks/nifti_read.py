"""Time reading a compressed CT volume: plain nibabel versus :func:`pocketseg.nifti.read_nifti`.

Run as ``python -m pocketseg.benchmarks.nifti_read [--shape 512x512x300] [--repeat 3] [--out DIR]``.

The volume is a realistic int16 CT: the synthetic phantom
(:func:`pocketseg.synth.phantom.make_phantom`) when it is available, otherwise a
smooth body-shaped volume with mild noise (pure random noise would compress
unrealistically badly). It is written once as ``.nii.gz`` with nibabel's default
settings into a temporary folder; each reader is then timed best-of-N with
:func:`time.perf_counter`, and both must return identical arrays.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from pocketseg import nifti
from pocketseg.benchmarks.report import write_json
from pocketseg.synth.phantom import make_phantom

log = logging.getLogger("pocketseg.benchmarks.nifti_read")


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 512x512x300, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must be three positive integers, got {text!r}")
    return shape  # type: ignore[return-value]


def smooth_body_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A body-shaped int16 CT-like volume: air outside, fat rim, soft tissue, a spine, mild noise."""
    rng = np.random.default_rng(seed)
    ni, nj, nk = shape
    spacing = (400.0 / ni, 400.0 / nj, 400.0 / nk)
    x = (np.arange(ni, dtype=np.float32) - (ni - 1) / 2) * spacing[0]
    y = (np.arange(nj, dtype=np.float32) - (nj - 1) / 2) * spacing[1]
    z = np.arange(nk, dtype=np.float32) / max(nk - 1, 1)
    image = np.full(shape, -1000, dtype=np.int16)
    for k in range(nk):
        a = 160.0 + 15.0 * np.sin(np.pi * z[k])  # body half-width, mm
        b = 110.0 + 10.0 * np.sin(np.pi * z[k])
        r = (x[:, None] / a) ** 2 + (y[None, :] / b) ** 2
        sl = np.where(r < 1.0, -90.0, -1000.0)  # fat
        sl = np.where(r < 0.8, 40.0 + 15.0 * np.cos(x[:, None] / 40.0) * np.sin(y[None, :] / 35.0), sl)
        spine = (x[:, None] / 18.0) ** 2 + ((y[None, :] + 70.0) / 18.0) ** 2 < 1.0
        sl = np.where(spine, 450.0, sl)
        inside = r < 1.0
        sl = sl + inside * rng.normal(0.0, 12.0, size=sl.shape).astype(np.float32)
        image[:, :, k] = np.round(sl).astype(np.int16)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [200.0, 200.0, -200.0]
    return image, affine


def make_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """The phantom when the shape is a square in-plane matrix, else the smooth body."""
    if shape[0] == shape[1]:
        ph = make_phantom(seed, slices=shape[2], matrix=shape[0])
        if tuple(ph.image.shape) == tuple(shape):
            return np.asarray(ph.image, dtype=np.int16), np.asarray(ph.affine, dtype=np.float64), "phantom"
        log.info("phantom came out %s, not %s; using the smooth body volume", ph.image.shape, shape)
    image, affine = smooth_body_volume(shape, seed)
    return image, affine, "smooth body"


def best_of(fn, repeat: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result  # type: ignore[return-value]


def run(shape: tuple[int, int, int], repeat: int, workdir: Path, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    image, affine, source = make_volume(shape, seed)
    log.info("built %s volume %s in %.1f s", source, image.shape, time.perf_counter() - t0)
    path = workdir / "bench_ct.nii.gz"
    t0 = time.perf_counter()
    nib.save(nib.Nifti1Image(image, affine), path)  # nibabel's default settings
    write_s = time.perf_counter() - t0
    size = path.stat().st_size
    log.info("wrote %s (%.1f MB) in %.1f s", path, size / 1e6, write_s)

    t_nib, a_nib = best_of(lambda: np.asanyarray(nib.load(path).dataobj), repeat)
    t_ours, a_ours = best_of(lambda: nifti.read_nifti(path).data, repeat)
    identical = bool(a_nib.dtype == a_ours.dtype and a_nib.shape == a_ours.shape and np.array_equal(a_nib, a_ours))
    if not identical:
        raise SystemExit(f"arrays differ: nibabel {a_nib.dtype}{a_nib.shape} vs read_nifti {a_ours.dtype}{a_ours.shape}")
    if not a_ours.flags.writeable:
        raise SystemExit("read_nifti returned a read-only array")
    return {
        "shape": list(shape),
        "dtype": str(image.dtype),
        "volume_source": source,
        "file_bytes": int(size),
        "uncompressed_bytes": int(image.nbytes),
        "repeat": int(repeat),
        "nibabel_s": t_nib,
        "read_nifti_s": t_ours,
        "ratio": t_nib / t_ours,
        "identical": identical,
        "isal": nifti.have_isal(),
        "python": platform.python_version(),
        "nibabel": nib.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }


def format_table(r: dict) -> str:
    rows = [
        ("volume", f"{'x'.join(map(str, r['shape']))} {r['dtype']} ({r['volume_source']})"),
        ("file size", f"{r['file_bytes'] / 1e6:.1f} MB (.nii.gz; {r['uncompressed_bytes'] / 1e6:.1f} MB raw)"),
        ("nibabel  np.asanyarray(nib.load(p).dataobj)", f"{r['nibabel_s'] * 1000:.0f} ms"),
        ("pocketseg.nifti.read_nifti(p).data", f"{r['read_nifti_s'] * 1000:.0f} ms"),
        ("speed ratio (nibabel / read_nifti)", f"{r['ratio']:.2f}x"),
        ("arrays identical", str(r["identical"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + f"\n(best of {r['repeat']}, time.perf_counter)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketseg.benchmarks.nifti_read", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=parse_shape, default=(512, 512, 300), help="volume shape, e.g. 512x512x300")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per reader (best is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic volume")
    parser.add_argument("--out", type=Path, default=None, help="folder to write nifti_read.json into")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="pocketseg-bench-") as tmp:
        result = run(args.shape, args.repeat, Path(tmp), seed=args.seed)
    print(format_table(result))
    if args.out is not None:
        out = args.out / "nifti_read.json"
        write_json(out, result, overwrite=True)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
