"""Self-training ablation on synthetic CT (as the FLARE 2023 paper's Table 5): with and without partial/unlabelled data.

    python -m pocketseg.benchmarks.selftrain_ablation [--full 4] [--partial 16] [--unlabeled 16] [--test 6]
        [--slices 48] [--preset detail-tiny] [--roi-preset roi-tiny] [--epochs 10] [--iterations 30]
        [--rounds 3] [--threshold X] [--device auto] [--out bench-output/selftrain_ablation]

A training set with few full labels and a separate held-out test set are synthesized
(``pocketseg synth --small``, 128x128 in-plane); ``pocketseg selftrain`` runs on the training
set twice, with tumor pseudo labels and with ``--no-tumor-pseudo``, sharing one ROI net
trained once on the fully labelled cases. Every detail training has the same budget
(epochs x iterations x batch), so the variants differ only in their training data:

* ``full-only``: round 1, the fully labelled cases alone (the supervised baseline);
* ``all-pseudo``: the last round, full + every partially labelled (merged) and unlabelled
  (pseudo-labelled) case, no selection;
* ``selftrain``: the final model, full + the cases selected by their uncertainty (Eq. 1);
* ``selftrain-no-tumor-pseudo``: the same with the tumor voxels of pseudo labels kept out.

Each model package segments the test cases through the cascade (ROI crop as at inference)
and is scored with :mod:`pocketseg.evaluation.metrics` (FLARE 2023 DSC and NSD per class).
Outputs in ``--out``: ``ablation.json``, ``ablation.md``, and the data, work folders and
per-variant scores, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg import labels as L
from pocketseg.atomic import ensure_dir, write_text
from pocketseg.benchmarks.report import write_json
from pocketseg.evaluation.metrics import organ_column
from pocketseg.nifti import read_nifti
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.trainer.dataset import open_dataset
from pocketseg.trainer.selftrain import score_package, selftrain

log = logging.getLogger(__name__)

VARIANTS = ("full-only", "all-pseudo", "selftrain", "selftrain-no-tumor-pseudo")


def _test_cases(test: Path) -> list[tuple[str, Path, Path]]:
    return [(c.name, c.image, c.label) for c in open_dataset(test).labelled(full_only=True)]


def run(out: Path, *, full: int, partial: int, unlabeled: int, test: int, slices: int, preset: str, roi_preset: str,
        epochs: int, iterations: int, rounds: int, threshold: float | None, seed: int, device: str) -> dict[str, Any]:
    ensure_dir(out)
    data, test_data, cache = out / "train-data", out / "test-data", out / "cache"
    if not (data / "dataset.json").is_file():
        synthesize_dataset(data, full=full, partial=partial, unlabeled=unlabeled, seed=seed, small=True, slices=slices,
                           workers=2, overwrite=True)
    if not (test_data / "dataset.json").is_file():
        synthesize_dataset(test_data, full=test, seed=seed + 1000, small=True, slices=slices, workers=2, overwrite=True)
    common = dict(rounds=rounds, threshold=threshold, preset=preset, roi_preset=roi_preset, epochs=epochs,
                  iterations=iterations, holdout=0.0, seed=seed, device=device, cache=cache, progress=False)
    with_tumor = selftrain(data, work=out / "work-tumor-pseudo", **common)
    no_tumor = selftrain(data, work=out / "work-no-tumor-pseudo", tumor_pseudo=False,
                         roi_run=with_tumor / "roi", **common)
    # Step times from the finished-step markers: right even when a run was interrupted and resumed.
    seconds = {name: sum(json.loads(m.read_text())["seconds"] for m in (work / "steps").glob("*.done"))
               for name, work in (("selftrain", with_tumor), ("selftrain-no-tumor-pseudo", no_tumor))}
    packages = {"full-only": with_tumor / "round1" / "model", "all-pseudo": with_tumor / f"round{rounds}" / "model",
                "selftrain": with_tumor / "final" / "model", "selftrain-no-tumor-pseudo": no_tumor / "final" / "model"}
    cases = _test_cases(test_data)
    without_tumor = sum(L.TUMOR not in np.unique(read_nifti(label).data) for _, _, label in cases)
    results: dict[str, Any] = {}
    for variant, package in packages.items():
        path = out / "scores" / f"{variant}.json"
        if not path.is_file():
            write_json(path, score_package(package, cases, device=device), overwrite=True)
        results[variant] = json.loads(path.read_text())["summary"]
    selections = {name: json.loads((work / "selection.json").read_text())
                  for name, work in (("tumor-pseudo", with_tumor), ("no-tumor-pseudo", no_tumor))}
    counts = {}
    for variant, (work, head) in {"full-only": (with_tumor, "round1"), "all-pseudo": (with_tumor, f"round{rounds}"),
                                  "selftrain": (with_tumor, "final"),
                                  "selftrain-no-tumor-pseudo": (no_tumor, "final")}.items():
        sources = json.loads((work / head / "data" / "dataset.json").read_text())["pocketseg"]["sources"]
        counts[variant] = {kind: sum(v == kind for v in sources.values())
                           for kind in ("ground truth", "merged", "pseudo")}
    return {
        "setup": {"full": full, "partial": partial, "unlabeled": unlabeled, "test": test, "slices": slices,
                  "matrix": 128, "preset": preset, "roi_preset": roi_preset, "epochs": epochs, "iterations": iterations,
                  "batch_size": 2, "rounds": rounds, "seed": seed, "device": device,
                  "test_cases_without_tumor": int(without_tumor)},
        "training_cases": counts,
        "selection": {k: {"threshold": v["threshold"], "rule": v["threshold_rule"], "selected": len(v["selected"]),
                          "rejected": len(v["rejected"])} for k, v in selections.items()},
        "uncertainty": json.loads((with_tumor / "uncertainty.json").read_text()),
        "summary": results,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def format_markdown(res: dict[str, Any]) -> str:
    s = res["setup"]
    variants = [v for v in VARIANTS if v in res["summary"]]
    lines = [f"Self-training ablation: {s['full']} full, {s['partial']} partial, {s['unlabeled']} unlabelled synthetic "
             f"training cases (128x128x{s['slices']}), {s['test']} held-out test cases; `{s['roi_preset']}` + "
             f"`{s['preset']}`, every detail training {s['epochs']} epochs x {s['iterations']} iterations x batch "
             f"{s['batch_size']}, {s['rounds']} rounds, device {s['device']}.", "",
             "Training cases (ground truth / merged partial / pseudo unlabelled): "
             + "; ".join(f"{v} {c['ground truth']}/{c['merged']}/{c['pseudo']}"
                         for v, c in res["training_cases"].items()), "",
             "DSC % (NSD %), mean over test cases:", "",
             "| class | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for lab in L.LABELS[1:]:
        cells = []
        for v in variants:
            mean = res["summary"][v]["mean"]
            col = organ_column(lab.id)
            cells.append(f"{100 * mean[col + '_DSC']:.1f} ({100 * mean[col + '_NSD']:.1f})")
        lines.append(f"| {lab.display} | " + " | ".join(cells) + " |")
    lines.append("| **organ mean** | " + " | ".join(
        f"**{100 * res['summary'][v]['organ_mean_DSC']:.1f} ({100 * res['summary'][v]['organ_mean_NSD']:.1f})**"
        for v in variants) + " |")
    n = s.get("test_cases_without_tumor")
    if n:
        lines += ["", f"Tumor: {n} of the {s['test']} test cases have no tumor; FLARE scores such a case 1 (DSC and NSD) "
                      "when nothing is predicted, 0 otherwise."]
    sel = res["selection"]
    lines += ["", "Selection (Eq. 1, default threshold = median): " + "; ".join(
        f"{k}: threshold {'undefined' if v['threshold'] is None else format(v['threshold'], '.3f')}, "
        f"{v['selected']} selected, {v['rejected']} rejected" for k, v in sel.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", type=int, default=4)
    parser.add_argument("--partial", type=int, default=16)
    parser.add_argument("--unlabeled", type=int, default=16)
    parser.add_argument("--test", type=int, default=6, help="held-out fully labelled test cases [6]")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--preset", default="detail-tiny")
    parser.add_argument("--roi-preset", default="roi-tiny")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("bench-output/selftrain_ablation"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args.out, full=args.full, partial=args.partial, unlabeled=args.unlabeled, test=args.test,
              slices=args.slices, preset=args.preset, roi_preset=args.roi_preset, epochs=args.epochs,
              iterations=args.iterations, rounds=args.rounds, threshold=args.threshold, seed=args.seed,
              device=args.device)
    write_json(args.out / "ablation.json", res, overwrite=True)
    table = format_markdown(res)
    write_text(args.out / "ablation.md", table, overwrite=True)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
