"""Report writers of the benchmarks: Markdown tables, CSV, JSON and PNG plots, written atomically.

Used by ``pocketseg bench`` (the efficiency table in the layout of Table 6 of
the FLARE 2023 paper, the nnU-Net comparison, the memory-time plot), by
``pocketseg bench --backends`` (the backend x precision table) and by
``pocketseg demo-report`` (the one-page summary of ``make demo``).

Every table is described once by a list of :class:`Column` (key, header,
number format) and rendered from the same rows to Markdown and CSV, so the two
never disagree. Every file is written atomically; an existing report is
replaced only with ``overwrite`` (:func:`check_targets` runs before any work).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketseg import atomic
from pocketseg.atomic import atomic_write_bytes, check_targets, ensure_dir, write_text
from pocketseg.errors import InputError, OutputError
from pocketseg.manifest import load_package
from pocketseg.plotting import png_bytes, pyplot

__all__ = [
    "BACKEND_COLUMNS",
    "BACKEND_FILES",
    "BENCH_FILES",
    "COMPARISON_COLUMNS",
    "RUN_COLUMNS",
    "RUN_CSV_COLUMNS",
    "Column",
    "backends_markdown",
    "bench_markdown",
    "bench_table_markdown",
    "csv_text",
    "markdown_table",
    "plot_memory_curves",
    "write_backends_report",
    "write_bench_report",
    "write_demo_report",
    "write_json",
]

MISSING = "—"


@dataclass(frozen=True)
class Column:
    """One column of a table: the row key, its header and the format of numbers (e.g. ``".2f"``)."""

    key: str
    header: str
    fmt: str = ""
    align: str = "left"  # Markdown alignment: left or right

    def cell(self, row: Mapping[str, Any], *, csv: bool = False) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "" if csv else MISSING
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, (int, float)) and self.fmt:
            # CSV keeps full precision for numbers; Markdown is for reading.
            return repr(value) if csv and isinstance(value, float) else format(value, self.fmt)
        return str(value)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table of ``rows`` (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("--:" if c.align == "right" else ":--" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.cell(row).replace("|", "\\|").replace("\n", " ") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """CSV of ``rows`` with the column keys as the header line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.key for c in columns])
    for row in rows:
        writer.writerow([c.cell(row, csv=True) for c in columns])
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------------- file writing

def write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """A benchmark result as JSON: a measurement may be NaN (a ratio of a failed run), and is kept as such."""
    return atomic.write_json(path, data, overwrite=overwrite, allow_nan=True)


@dataclass(frozen=True)
class Curve:
    """One memory-time curve of a plot panel."""

    panel: str
    label: str
    times_s: Sequence[float]
    used_mb: Sequence[float]
    color_key: str = ""
    dashed: bool = False


def plot_memory_curves(curves: Sequence[Curve], *, title: str, ylabel: str) -> bytes:
    """PNG bytes: one panel per distinct ``panel`` (e.g. cold, warm), memory (MB) over time (s)."""
    plt = pyplot("Report plots")
    panels = list(dict.fromkeys(c.panel for c in curves)) or [""]
    keys = list(dict.fromkeys(c.color_key or c.label for c in curves))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for curve in (c for c in curves if c.panel == panel):
            color = colors(keys.index(curve.color_key or curve.label) % 10)
            ax.plot(list(curve.times_s), list(curve.used_mb), color=color, linewidth=1.3,
                    linestyle="--" if curve.dashed else "-", label=curve.label)
        ax.set_title(panel)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(c.panel == panel for c in curves):
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png_bytes(fig, dpi=110)


# -------------------------------------------------------------------------------------------------- bench report

#: Files of a ``pocketseg bench`` report inside OUT_DIR.
BENCH_FILES = {"markdown": "bench.md", "csv": "bench.csv", "json": "bench.json", "plot": "memory.png"}

#: The Table-6-like table: one row per case, pipeline and run (cold / warm).
RUN_COLUMNS: tuple[Column, ...] = (
    Column("case", "case"),
    Column("size", "image size"),
    Column("pipeline", "pipeline"),
    Column("mode", "run"),
    Column("time_s", "time (s)", ".2f", "right"),
    Column("max_mb", "max memory (MB)", ".0f", "right"),
    Column("auc_mb_s", "total memory (MB·s)", ".0f", "right"),
    Column("max_above_baseline_mb", "max above baseline (MB)", ".0f", "right"),
    Column("auc_above_baseline_mb_s", "total above baseline (MB·s)", ".0f", "right"),
    Column("status", "status"),
)
#: The CSV adds the breakdown and the measuring details.
RUN_CSV_COLUMNS: tuple[Column, ...] = RUN_COLUMNS[:4] + (
    Column("shape_ijk", "shape"),
) + RUN_COLUMNS[4:] + (
    Column("load_s", "load (s)", ".3f"),
    Column("read_s", "read (s)", ".3f"),
    Column("predict_s", "predict (s)", ".3f"),
    Column("write_s", "write (s)", ".3f"),
    Column("peak_rss_mb", "peak RSS (MB)", ".0f"),
    Column("baseline_mb", "baseline (MB)", ".0f"),
    Column("memory_source", "memory source"),
    Column("samples", "samples", "d"),
    Column("device", "device"),
    Column("backend", "backend"),
    Column("precision", "precision"),
    Column("roi", "ROI"),
)
COMPARISON_COLUMNS: tuple[Column, ...] = (
    Column("case", "case"),
    Column("size", "image size"),
    Column("time_ratio_cold", "time ratio, cold", ".2f", "right"),
    Column("time_ratio_warm", "time ratio, warm", ".2f", "right"),
    Column("memory_ratio_cold", "max memory ratio, cold", ".2f", "right"),
    Column("memory_ratio_warm", "max memory ratio, warm", ".2f", "right"),
    Column("voxel_agreement_pct", "voxel agreement (%)", ".3f", "right"),
    Column("mean_dice_pct", "mean Dice (%)", ".2f", "right"),
)


def run_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The flat rows of a bench result (one per run), as the tables show them."""
    cases = {c["case"]: c for c in result.get("cases", [])}
    rows = []
    for run in result.get("runs", []):
        memory = run.get("memory") or {}
        case = cases.get(run["case"], {})
        box = case.get("roi_box_zyx")
        rows.append({
            **{k: run.get(k) for k in ("case", "pipeline", "mode", "status", "time_s", "load_s", "read_s", "predict_s",
                                       "write_s", "peak_rss_mb")},
            "size": case.get("size"),
            "shape_ijk": "x".join(map(str, case.get("shape_ijk", []))) or None,
            **{k: memory.get(k) for k in ("max_mb", "auc_mb_s", "max_above_baseline_mb", "auc_above_baseline_mb_s",
                                          "baseline_mb", "samples")},
            "memory_source": memory.get("source"),
            "device": result.get("device"), "backend": run.get("backend"), "precision": run.get("precision"),
            "roi": ("labels " + " ".join(f"{a}:{b}" for a, b in box)) if box else "ROI net",
        })
    return rows


def bench_table_markdown(result: Mapping[str, Any]) -> str:
    """The main table of a bench result (Markdown)."""
    return markdown_table(run_rows(result), RUN_COLUMNS)


def _loads(result: Mapping[str, Any]) -> str:
    machine = result.get("machine", {})
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    if not start:
        return ""
    text = f"load average (1 min) {start[0]:.2f} at the start"
    return text + (f", {end[0]:.2f} at the end" if end else "")


def bench_markdown(result: Mapping[str, Any]) -> str:
    """The whole ``bench.md``: settings, the Table-6-like table, the comparison, the plot, stage times."""
    settings = result.get("settings", {})
    machine = result.get("machine", {})
    memory = result.get("memory", {})
    stages = ", ".join(f"{k}: {v}" for k, v in result.get("model_presets", {}).items())
    lines = ["# pocketseg efficiency benchmark", "",
             (f"Model package `{result.get('model')}` ({stages}); device **{result.get('device')}**, backend "
             f"**{result.get('backend')}**, precision **{result.get('precision')}** ({result.get('selection_reason', '')})."),
             "",
             f"Machine: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
             + (f"; {_loads(result)}" if _loads(result) else "") + ". Timings vary with load: rerun where you deploy.",
             "",
             ("- **cold**: a fresh process per case, as FLARE times a container: interpreter start, imports, model "
             "loading, reading the NIfTI file, both stages, post-processing and writing the label map; timed by the "
             "parent from start to exit."),
             "- **warm**: one process with the model loaded" + (" and one untimed warm-up prediction" if settings.get("warmup")
                                                              else "") + "; time = read + predict + write per case.",
             (f"- **memory**: {memory.get('description', memory.get('source', '?'))}, sampled every "
             f"{memory.get('interval_s', 0.1):g} s in a background thread; *max* and *total* = sum of samples × "
             f"{memory.get('interval_s', 0.1):g} s (MB·s), as FLARE 2023 computes them. *Above baseline* subtracts "
             f"the reading when the run began ({memory.get('baseline', 'idle')}). MB = 2^20 bytes."),
             ]
    if settings.get("roi_from_labels"):
        lines.append("- **ROI from labels**: the ROI stage was *skipped*; the detail stage ran on the box of the case's "
                     "labels (> 0) plus the package's ROI margin (" + f"{result.get('roi_margin_mm', '?')} mm). Times "
                     "and memory therefore cover the detail stage and post-processing only, for nets without trained "
                     "weights" + ("; the nnU-Net peer used the same box" if result.get("compare") else "") + ".")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Time and memory per case (FLARE 2023 paper, Table 6 layout)", "", bench_table_markdown(result)]
    comparison = result.get("comparison") or []
    if comparison:
        peer = result.get("compare")
        lines += [f"## Comparison with {result.get('peer_title', peer)}", "",
                  result.get("peer_settings", ""), "",
                  ("Time ratio = peer time / pocketseg time (> 1: pocketseg is faster); max memory ratio = pocketseg / "
                  "peer (< 1: pocketseg uses less). Agreement and Dice compare the two label maps of each case "
                  "(mean Dice over the classes present in either map)."), "",
                  markdown_table(comparison, COMPARISON_COLUMNS)]
        classes = list(dict.fromkeys(k for row in comparison for k in row.get("dice", {})))
        if classes:
            dice_cols = [Column("class", "class")] + [Column(r["case"], r["case"], ".2f", "right") for r in comparison]
            dice_rows = [{"class": name, **{r["case"]: (None if r["dice"].get(name) is None else 100 * r["dice"][name])
                                            for r in comparison}} for name in classes]
            lines += ["Dice (%) per class between the two label maps (— : the class is in neither map):", "",
                      markdown_table(dice_rows, dice_cols)]
    if result.get("files", {}).get("plot"):
        lines += ["## Memory over time", "", f"![memory-time curves]({BENCH_FILES['plot']})", ""]
    stage_rows = []
    for run in result.get("runs", []):
        if run.get("status") != "ok":
            continue
        row = {"case": run["case"], "pipeline": run["pipeline"], "mode": run["mode"], "load_s": run.get("load_s"),
               "read_s": run.get("read_s"), "write_s": run.get("write_s")}
        row.update({f"stage_{k}": v for k, v in (run.get("stages_s") or {}).items()})
        stage_rows.append(row)
    if stage_rows:
        keys = list(dict.fromkeys(k for r in stage_rows for k in r if k.startswith("stage_")))
        cols = [Column("case", "case"), Column("pipeline", "pipeline"), Column("mode", "run"),
                Column("load_s", "load", ".2f", "right"), Column("read_s", "read", ".2f", "right")]
        cols += [Column(k, k[len("stage_"):], ".2f", "right") for k in keys]
        cols += [Column("write_s", "write", ".2f", "right")]
        lines += ["## Stage times (s)", "",
                  "*load*: imports and model loading (cold: inside the fresh process; warm: once per process).", "",
                  markdown_table(stage_rows, cols)]
    return "\n".join(lines).rstrip() + "\n"


def _bench_curves(result: Mapping[str, Any]) -> list[Curve]:
    curves = []
    for run in result.get("runs", []):
        memory = run.get("memory") or {}
        if run.get("status") != "ok" or not memory.get("used_mb"):
            continue
        curves.append(Curve(panel=run["mode"], label=f"{run['case']} ({run['pipeline']})",
                            times_s=memory["times_s"], used_mb=memory["used_mb"], color_key=run["case"],
                            dashed=run["pipeline"] != "pocketseg"))
    return curves


def write_bench_report(result: dict[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Path]:
    """Write ``bench.md``, ``bench.csv``, ``bench.json`` and ``memory.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {kind: out / name for kind, name in BENCH_FILES.items()}
    curves = _bench_curves(result)
    files: dict[str, Path] = {}
    if curves:
        memory = result.get("memory", {})
        png = plot_memory_curves(curves, title=f"{result.get('device')} / {result.get('backend')}: "
                                               f"{memory.get('description', '')}",
                                 ylabel="memory (MB)")
        ensure_dir(out)
        files["plot"] = atomic_write_bytes(paths["plot"], png, overwrite=overwrite)
    result["files"] = {k: str(p) for k, p in paths.items() if k != "plot" or curves}
    files["csv"] = write_text(paths["csv"], csv_text(run_rows(result), RUN_CSV_COLUMNS), overwrite=overwrite)
    files["json"] = write_json(paths["json"], result, overwrite=overwrite)
    files["markdown"] = write_text(paths["markdown"], bench_markdown(result), overwrite=overwrite)
    return files


# -------------------------------------------------------------------------------------------------- backends

#: Files of a ``pocketseg bench --backends`` report inside OUT_DIR.
BACKEND_FILES = {"markdown": "backends.md", "csv": "backends.csv", "json": "backends.json"}

BACKEND_COLUMNS: tuple[Column, ...] = (
    Column("backend", "backend"),
    Column("precision", "precision"),
    Column("target", "export target"),
    Column("status", "status"),
    Column("model_mb", "model size (MB)", ".2f", "right"),
    Column("dsc_organ_mean_pct", "DSC organ mean (%)", ".2f", "right"),
    Column("nsd_organ_mean_pct", "NSD organ mean (%)", ".2f", "right"),
    Column("time_s_per_case", "time per case (s)", ".2f", "right"),
    Column("load_s", "load (s)", ".2f", "right"),
    Column("reason", "reason"),
)


def backends_markdown(result: Mapping[str, Any]) -> str:
    machine = result.get("machine", {})
    cases = ", ".join(f"{c['case']} ({c['size']})" for c in result.get("cases", []))
    lines = ["# pocketseg backend × precision benchmark", "",
             f"Model package `{result.get('model')}`; device **{result.get('device')}**; "
             f"{machine.get('cpus', '?')} CPUs" + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
             + (f"; {_loads(result)}" if _loads(result) else "") + ".", "",
             f"Cases: {cases}. DSC/NSD: FLARE 2023 metrics against the synthetic ground truth "
             "(organ mean over labels 1-13, averaged over cases). Time per case: prediction in a loaded process"
             + (" after one untimed warm-up" if result.get("settings", {}).get("warmup") else "")
             + "; model size: the files of both stages the row loads. A row that cannot run here is listed "
             "with the reason.", ""]
    if result.get("settings", {}).get("roi_from_labels"):
        lines += [("The ROI stage was skipped: the detail stage ran on the box of the labels plus the ROI margin "
                  "(--roi-from-labels)."), ""]
    lines.append(markdown_table(result.get("rows", []), BACKEND_COLUMNS))
    return "\n".join(lines)


def write_backends_report(result: dict[str, Any], out_dir: str | os.PathLike, *,
                          overwrite: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {kind: out / name for kind, name in BACKEND_FILES.items()}
    result["files"] = {k: str(v) for k, v in paths.items()}
    return {"csv": write_text(paths["csv"], csv_text(result.get("rows", []), BACKEND_COLUMNS), overwrite=overwrite),
            "json": write_json(paths["json"], result, overwrite=overwrite),
            "markdown": write_text(paths["markdown"], backends_markdown(result), overwrite=overwrite)}


# -------------------------------------------------------------------------------------------------- demo report

def _pngs(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _model_words(model: Path | None, base: Path) -> str:
    """How the demo report names the package that made its predictions."""
    if model is None:
        return "the exported model package"
    source = load_package(model).source or {}
    what = "; ".join(str(source[k]) for k in ("training_data", "intended_use") if source.get(k))
    return f"the model package `{_link(model, base)}`" + (f" ({what})" if what else "")


def write_demo_report(out: str | os.PathLike, *, previews: str | os.PathLike | None = None,
                      predictions: str | os.PathLike | None = None, evaluation: str | os.PathLike | None = None,
                      bench: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                      title: str = "pocketseg demo", overwrite: bool = False) -> Path:
    """One Markdown page summarising a run of the chain: data previews, prediction previews, evaluation, bench.

    Each source is optional: ``previews`` (folder of data set preview PNGs, ``pocketseg synth --preview``),
    ``predictions`` (folder of ``pocketseg predict --preview`` outputs), ``evaluation`` (``pocketseg evaluate``
    output folder: its ``table.md``), ``bench`` (``pocketseg bench`` output folder: ``bench.json`` and
    ``memory.png``), ``model`` (the package that made the predictions: named with its manifest's ``source``).
    Images are linked relative to ``out``. Returns ``out``.
    """
    target = Path(out)
    if target.suffix.lower() != ".md":
        raise OutputError(target, "the report must be a Markdown file (.md)")
    check_targets([target], overwrite=overwrite)
    folders = {name: (None if value is None else Path(value)) for name, value in
               (("previews", previews), ("predictions", predictions), ("evaluation", evaluation), ("bench", bench),
                ("model", model))}
    for name, folder in folders.items():
        if folder is not None and not folder.is_dir():
            raise InputError(folder, f"{name} folder does not exist" if not folder.exists() else "is not a folder")
    base = target.parent if str(target.parent) else Path(".")
    lines = [f"# {title}", "", f"{os.cpu_count()} CPUs" + (f", load average {os.getloadavg()[0]:.2f}"
                                                         if hasattr(os, "getloadavg") else "") + ".", ""]
    data_pngs = _pngs(folders["previews"])
    if data_pngs:
        lines += ["## Data", "", "Synthetic FLARE-like CT (axial, coronal and sagittal views with the labels):", ""]
        lines += [f"![{p.stem}]({_link(p, base)})" for p in data_pngs] + [""]
    pred_pngs = _pngs(folders["predictions"])
    if pred_pngs:
        lines += ["## Predictions", "", f"Held-out cases segmented by {_model_words(folders['model'], base)}:", ""]
        lines += [f"![{p.stem}]({_link(p, base)})" for p in pred_pngs] + [""]
    if folders["evaluation"] is not None:
        table = folders["evaluation"] / "table.md"
        if not table.is_file():
            raise InputError(table, "does not exist (run pocketseg evaluate first)")
        lines += ["## Evaluation", "", table.read_text(encoding="utf-8").rstrip(), ""]
    if folders["bench"] is not None:
        bench_json = folders["bench"] / BENCH_FILES["json"]
        if not bench_json.is_file():
            raise InputError(bench_json, "does not exist (run pocketseg bench first)")
        try:
            result = json.loads(bench_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(bench_json, f"is not valid JSON ({exc})") from None
        lines += ["## Efficiency", "",
                  (f"Device {result.get('device')}, backend {result.get('backend')} ({result.get('precision')}); "
                  f"cold = fresh process per case, warm = model loaded; memory = "
                  f"{result.get('memory', {}).get('description', '?')}, total = sum of 0.1 s samples × 0.1 s. "
                  f"Full report: [{_link(folders['bench'] / BENCH_FILES['markdown'], base)}]"
                  f"({_link(folders['bench'] / BENCH_FILES['markdown'], base)})."), "",
                  bench_table_markdown(result)]
        plot = folders["bench"] / BENCH_FILES["plot"]
        if plot.is_file():
            lines += [f"![memory-time curves]({_link(plot, base)})", ""]
    return write_text(target, "\n".join(lines).rstrip() + "\n", overwrite=overwrite)
