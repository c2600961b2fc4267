"""One CPU pipeline of :mod:`pocketseg.benchmarks.predict_cpu` end to end, in the process that runs this module.

    python -m pocketseg.benchmarks.cpu_pipeline PIPELINE --model PKG --case CT.nii.gz --labels-out L --report-out R

Apart from the benchmark's driver because a user's ``pocketseg predict`` imports neither torch nor the
trainer: this module imports what the runtime imports, so the child's wall time and peak RSS are a
user's (the nnU-Net peer imports torch, as nnU-Net does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pocketseg.benchmarks.memory import own_peak_rss_mb
from pocketseg.benchmarks.report import write_json
from pocketseg.imageio import load_volume
from pocketseg.nifti import write_labels
from pocketseg.runtime.cascade import CascadePredictor

#: pocketseg's pipelines: {name: (backend, precision)}; ``nnunet`` is the peer.
OURS = {"openvino": ("openvino", "fp32"), "openvino-bf16": ("openvino", "bf16"), "onnxruntime": ("onnxruntime", "fp32")}
PIPELINES = (*OURS, "nnunet")
#: The profile's network parts; everything else in read + predict + write is outside the networks.
NETWORK_PARTS = ("roi.net", "detail.net")


def _child(which: str, model: Path, case: Path, labels_out: Path, report_out: Path) -> None:
    """Run one pipeline end to end in this process and write its labels and stage times."""
    t0 = time.perf_counter()
    if which in OURS:
        backend, precision = OURS[which]
        predictor = CascadePredictor(model, device="cpu", backend=backend, precision=precision)
    else:
        from pocketseg.benchmarks.peers.nnunet import NnUNetCascade  # the peer needs nnU-Net (peers extra)

        predictor = NnUNetCascade(model, device="cpu")  # the package's sliding window, as ours
    t_load = time.perf_counter()
    volume = load_volume(case)
    t_read = time.perf_counter()
    if which in OURS:
        result = predictor.predict(volume)
        labels, stages = result.labels, result.timings_s
    else:
        labels = predictor.predict(volume)
        stages = predictor.last_timings
    t_pred = time.perf_counter()
    write_labels(labels, labels_out, reference=volume, overwrite=True)
    t_write = time.perf_counter()
    report = {"import_and_load_s": t_load - t0, "read_s": t_read - t_load, "predict_s": t_pred - t_read,
              "write_s": t_write - t_pred, "stages_s": stages, "peak_rss_mb": own_peak_rss_mb()}
    write_json(report_out, report, overwrite=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", choices=PIPELINES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--case", type=Path, required=True)
    parser.add_argument("--labels-out", type=Path, required=True)
    parser.add_argument("--report-out", type=Path, required=True)
    args = parser.parse_args(argv)
    _child(args.pipeline, args.model, args.case, args.labels_out, args.report_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
