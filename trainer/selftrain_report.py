"""The report of a self-training work folder: report.json, report.md and the histogram uncertainty.png.

Everything is read back from the work folder (plan, derived data sets, run histories,
validation files, uncertainty and selection), so the report can be rebuilt at any time
from a finished folder. Validation numbers are FLARE 2023 DSC/NSD of the held-out, fully
labelled cases through each round's cascade (original voxel grid), means over cases.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes, write_json
from pocketseg.errors import MissingDependencyError
from pocketseg.evaluation.metrics import organ_column
from pocketseg.plotting import png_bytes, pyplot
from pocketseg.trainer.workfolder import PLAN_NAME, SELECTION_NAME, SETTINGS_NAME, STEPS_DIR, UNCERTAINTY_NAME

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, HISTOGRAM_PNG = "report.json", "report.md", "uncertainty.png"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _validation(work: Path, head: str) -> dict[str, Any] | None:
    data = _load(work / head / "validation.json")
    if not data or not data.get("summary"):
        return None
    mean = data["summary"]["mean"]
    per_class = {lab.name: {"DSC": mean[f"{organ_column(lab.id)}_DSC"], "NSD": mean[f"{organ_column(lab.id)}_NSD"]}
                 for lab in L.LABELS[1:]}
    s = data["summary"]
    return {"cases": sorted(data["cases"]), "per_class": per_class, "organ_mean_DSC": s["organ_mean_DSC"],
            "organ_mean_NSD": s["organ_mean_NSD"], "tumor_DSC": s["tumor_DSC"], "tumor_NSD": s["tumor_NSD"]}


def _stage(work: Path, head: str, seconds: dict[str, float]) -> dict[str, Any]:
    record = (_load(work / head / "data" / "dataset.json") or {}).get("pocketseg", {})
    sources = record.get("sources", {})
    by_source = {kind: sorted(n for n, k in sources.items() if k == kind)
                 for kind in ("ground truth", "merged", "pseudo")}
    history = _load(work / head / "detail" / "history.json") or []
    validated = [h for h in history if h.get("val_dice")]
    pseudo = work / head / "pseudo"
    return {
        "name": head,
        "training_cases": by_source,
        "counts": {kind: len(names) for kind, names in by_source.items()},
        "pseudo_labels_from": record.get("pseudo_labels"),
        "epochs": len(history),
        "train_loss_last": history[-1]["train_loss"] if history else None,
        "train_split_dice": validated[-1]["val_dice"] if validated else None,
        "validation": _validation(work, head),
        "pseudo_labels_written": len(list(pseudo.glob("*.nii.gz"))) if pseudo.is_dir() else 0,
        "seconds": {step.split("/", 1)[1]: t for step, t in seconds.items() if step.startswith(head + "/")},
    }


def build_report(work: Path) -> dict[str, Any]:
    settings = _load(work / SETTINGS_NAME)
    plan = _load(work / PLAN_NAME)
    seconds = {}
    for marker in sorted((work / STEPS_DIR).glob("*.done")):
        entry = json.loads(marker.read_text())
        seconds[entry["step"]] = entry["seconds"]
    selection = _load(work / SELECTION_NAME) or {}
    scores = _load(work / UNCERTAINTY_NAME) or {}
    kinds = {n: plan["cases"][n]["kind"] for n in plan["pseudo"]}
    rounds = [_stage(work, f"round{r}", seconds) for r in range(1, settings["rounds"] + 1)]
    roi_run = Path(settings["roi_run"]) if settings["roi_run"] else work / "roi"
    roi_config = _load(roi_run / "config.json") or {}
    return {
        "settings": settings,
        "cases": {"fully_labelled_training": plan["train_full"], "held_out": plan["holdout"],
                  "partially_labelled": plan["partial"], "unlabelled": plan["unlabeled"],
                  "annotated_classes_from": plan["annotated_from"]},
        "roi_run": str(roi_run),
        "roi_preset": roi_config.get("preset", {}).get("name", settings["roi_preset"]),
        "rounds": rounds,
        "uncertainty": {"scores": scores, "kind": kinds, "threshold": selection.get("threshold"),
                        "threshold_rule": selection.get("threshold_rule"), "selected": selection.get("selected", []),
                        "rejected": selection.get("rejected", []), "histogram": HISTOGRAM_PNG},
        "final": {**_stage(work, "final", seconds), "model": str(work / "final" / "model")},
        "step_seconds": seconds,
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_markdown(report: dict[str, Any]) -> str:
    s, c, u = report["settings"], report["cases"], report["uncertainty"]
    stages = report["rounds"] + [report["final"]]
    lines = [
        "# Self-training report", "",
        f"Data set `{s['dataset']}`: {len(c['fully_labelled_training'])} fully labelled training cases, "
        f"{len(c['held_out'])} held out for validation, {len(c['partially_labelled'])} partially labelled, "
        f"{len(c['unlabelled'])} unlabelled (annotated classes from {c['annotated_classes_from']}).",
        f"Detail preset `{s['preset']}`, ROI preset `{report['roi_preset']}` ("
        + (f"given ROI run `{report['roi_run']}`" if s["roi_run"] else
           f"ROI run `{report['roi_run']}`, trained once on the fully labelled training cases in "
           f"{report['step_seconds'].get('roi', 0.0) / 60:.1f} min")
        + f"); every training {s['epochs']} epochs × {s['iterations']} iterations, batch "
        f"{s['batch_size']}, seed {s['seed']}; {s['rounds']} rounds; tumor pseudo labels "
        f"{'used' if s['tumor_pseudo'] else 'kept out (--no-tumor-pseudo)'}.", "",
        "## Rounds", "",
        "| stage | ground truth | merged partial | pseudo unlabelled | final train loss | val organ DSC % "
        "| val tumor DSC % | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for st in stages:
        v = st["validation"] or {}
        minutes = sum(st["seconds"].values()) / 60
        loss = "–" if st["train_loss_last"] is None else f"{st['train_loss_last']:.3f}"
        lines.append(f"| {st['name']} | {st['counts']['ground truth']} | {st['counts']['merged']} | "
                     f"{st['counts']['pseudo']} | {loss} | {_pct(v.get('organ_mean_DSC'))} | "
                     f"{_pct(v.get('tumor_DSC'))} | "
                     f"{minutes:.1f} |")
    lines += ["", "Rounds 2.. train on the pseudo labels of the round before; the final stage on the fully labelled "
                  "and the selected cases, with the last round's pseudo labels.", ""]
    lines += ["## Validation DSC (NSD) per class, %", ""]
    if not c["held_out"]:
        lines += ["No held-out cases (holdout 0, or too few fully labelled cases). Instead, the DSC of each training's "
                  "own validation split (`pocketseg train`, preprocessed grid); from round 2 on, that split can hold "
                  "pseudo-labelled cases, so it is no independent measure.", "",
                  "| class | " + " | ".join(st["name"] for st in stages) + " |",
                  "|---|" + "---:|" * len(stages)]
        for lab in L.LABELS[1:]:
            cells = [_pct((st["train_split_dice"] or {}).get(lab.name)) for st in stages]
            lines.append(f"| {lab.display} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += [f"Held-out cases: {', '.join(c['held_out'])}; through each stage's cascade, FLARE 2023 metrics.", "",
                  "| class | " + " | ".join(st["name"] for st in stages) + " |",
                  "|---|" + "---:|" * len(stages)]
        for lab in L.LABELS[1:]:
            cells = []
            for st in stages:
                v = (st["validation"] or {}).get("per_class", {}).get(lab.name)
                cells.append("–" if v is None else f"{_pct(v['DSC'])} ({_pct(v['NSD'])})")
            lines.append(f"| {lab.display} | " + " | ".join(cells) + " |")
        lines.append("")
    finite = [v for v in u["scores"].values() if v is not None]
    lines += ["## Uncertainty (paper Eq. 1) and selection", "",
              f"Score: mean over consecutive rounds of (voxels whose label changed) / (foreground voxels of the later "
              f"round); empty: undefined (never selected). Threshold "
              f"{'–' if u['threshold'] is None else format(u['threshold'], '.4g')} ({u['threshold_rule']}); "
              f"{len(u['selected'])} of {len(u['scores'])} cases selected.", ""]
    if finite:
        lines += [f"Scores: min {min(finite):.4f}, median {statistics.median(finite):.4f}, "
                  f"max {max(finite):.4f}.", ""]
    lines += [f"![uncertainty histogram]({u['histogram']})", "",
              "| case | kind | score | selected |", "|---|---|---:|---|"]
    for name, score in sorted(u["scores"].items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0, kv[0])):
        lines.append(f"| {name} | {u['kind'].get(name, '')} | {'undefined' if score is None else f'{score:.4f}'} | "
                     f"{'yes' if name in u['selected'] else 'no'} |")
    lines += ["", f"Final model package: `{report['final']['model']}`.", ""]
    return "\n".join(lines)


def histogram_png(scores: dict[str, float | None], threshold: float | None) -> bytes | None:
    """PNG of the score histogram with the threshold line; None when matplotlib (extra 'viz') is missing."""
    try:
        plt = pyplot("The uncertainty histogram")
    except MissingDependencyError:
        log.warning("selftrain: matplotlib is not installed (extra 'viz'): no uncertainty histogram")
        return None
    finite = [v for v in scores.values() if v is not None and math.isfinite(v)]
    undefined = len(scores) - len(finite)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if finite:
        ax.hist(finite, bins=max(5, min(30, len(finite))), color="tab:blue", alpha=0.8, label="cases")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("uncertainty (Eq. 1): changed voxels / foreground voxels")
    ax.set_ylabel("cases")
    ax.set_title(f"{len(scores)} cases" + (f", {undefined} undefined (empty prediction)" if undefined else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig, dpi=90)


def write_report(work: Path) -> dict[str, Any]:
    report = build_report(work)
    png = histogram_png(report["uncertainty"]["scores"], report["uncertainty"]["threshold"])
    if png is not None:
        atomic_write_bytes(work / HISTOGRAM_PNG, png, overwrite=True)
    write_json(work / REPORT_JSON, report, overwrite=True)
    atomic_write_bytes(work / REPORT_MD, format_markdown(report).encode(), overwrite=True)
    return report
