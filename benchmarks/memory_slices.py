"""Peak memory of a CPU prediction against the slice count: the same body, 512x512xN, N = 120, 300, 600.

    python -m pocketseg.benchmarks.memory_slices [--slices 120,300,600] [--pipeline openvino] [--model PKG]
        [--out DIR]

Each scan runs end to end in a fresh process (:func:`pocketseg.benchmarks.predict_cpu.run_pipeline`: read,
cascade, write), with the ``roi-cpu``/``detail-cpu`` nets of the demo (untrained here: memory does not depend
on the weights). The peak resident memory beyond the input (int16) and the label map (uint8) is what the
runtime itself needs; it should not grow with the slice count, since everything volume-sized apart from
those two is made on the stages' grids or chunk by chunk (target: flat within 15 %, <= 600 MB).
The phantoms share one seed, hence one body; the slice spacing follows from the count (0.8 mm at 600).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from pocketseg.atomic import ensure_dir
from pocketseg.benchmarks.cpu_pipeline import PIPELINES
from pocketseg.benchmarks.predict_cpu import run_pipeline
from pocketseg.benchmarks.report import write_json
from pocketseg.layout import image_name
from pocketseg.nifti import write_nifti
from pocketseg.synth.phantom import make_phantom
from pocketseg.trainer.package import untrained_package

log = logging.getLogger(__name__)
MB = 1e6
LIMIT_MB = 600.0
FLAT = 0.15


def run(out: Path, slices=(120, 300, 600), pipeline: str = "openvino", model: Path | None = None,
        seed: int = 0) -> dict:
    ensure_dir(out)
    if model is None:
        model = out / "model_untrained_cpu"
        if not (model / "manifest.json").is_file():
            untrained_package(model, roi="roi-cpu", detail="detail-cpu", seed=seed, fp16=False, overwrite=True)
    rows = []
    for n in slices:
        case = out / image_name(f"slices_{n}")
        ph = make_phantom(seed, slices=n, orientation="LPS")
        if not case.is_file():
            write_nifti(ph.image, case, affine=ph.affine)
        report = run_pipeline(pipeline, model, case, out)
        input_mb, labels_mb = ph.image.size * 2 / MB, ph.image.size / MB
        rows.append({"slices": n, "shape": list(ph.image.shape), "slice_mm": float(np.linalg.norm(ph.affine[:3, 2])),
                     "peak_rss_mb": report["peak_rss_mb"] * 1.048576, "input_mb": input_mb, "labels_mb": labels_mb,
                     "wall_s": report["wall_s"]})
        rows[-1]["beyond_mb"] = rows[-1]["peak_rss_mb"] - input_mb - labels_mb
    beyond = [r["beyond_mb"] for r in rows]
    return {"pipeline": pipeline, "model": str(model), "rows": rows,
            "spread": (max(beyond) - min(beyond)) / min(beyond), "worst_beyond_mb": max(beyond)}


def _print(summary: dict) -> None:
    print(f"pipeline {summary['pipeline']}, model {summary['model']}")
    print(f"{'scan':<16} {'slice mm':>8} {'peak RSS MB':>11} {'input MB':>8} {'labels MB':>9} {'beyond MB':>9} "
          f"{'wall s':>7}")
    for r in summary["rows"]:
        shape = "x".join(str(v) for v in r["shape"])
        print(f"{shape:<16} {r['slice_mm']:8.2f} {r['peak_rss_mb']:11.0f} {r['input_mb']:8.0f} {r['labels_mb']:9.0f} "
              f"{r['beyond_mb']:9.0f} {r['wall_s']:7.1f}")
    print(f"beyond input + labels: spread {100 * summary['spread']:.1f} % (target <= {100 * FLAT:.0f} %), "
          f"largest {summary['worst_beyond_mb']:.0f} MB (target <= {LIMIT_MB:.0f} MB)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-output/memory_slices"))
    parser.add_argument("--slices", default="120,300,600", help="comma-separated slice counts")
    parser.add_argument("--pipeline", choices=[p for p in PIPELINES if p != "nnunet"], default="openvino")
    parser.add_argument("--model", type=Path, default=None, help="model package (default: untrained CPU presets)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(args.out, tuple(int(v) for v in args.slices.split(",")), args.pipeline, args.model, args.seed)
    write_json(args.out / "memory_slices.json", summary, overwrite=True)
    _print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
