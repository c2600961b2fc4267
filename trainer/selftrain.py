"""Semi-supervised self-training of the detail net (FLARE 2023 paper, Sec. 2.3), resumable over a work folder.

The schedule (``rounds`` = R, default 3)::

    plan          fully labelled / partially labelled / unlabelled cases, held-out validation cases
    round1/data   fully labelled training cases
    roi           the ROI net, trained once on them (or an existing run, ``roi_run``)
    round r       data -> train (detail net) -> export (package with the ROI net)
                  -> pseudo (the cascade labels every partial and unlabelled case, ROI crop as at
                  inference) -> validate (DSC/NSD of the held-out cases through the cascade).
                  Rounds 2..R train on fully labelled + partially labelled (merged with round r-1's
                  pseudo labels, :func:`pocketseg.trainer.pseudo.merge_pseudo_label`) + unlabelled
                  (round r-1's pseudo labels) cases.
    uncertainty   paper Eq. 1 per case over rounds 1..R -> uncertainty.json; cases under the
                  threshold are selected (selection.json)
    final         train on fully labelled + selected cases (round R's pseudo labels fill what the
                  ground truth does not annotate) -> final/model, the model package of the result
    report        report.md, report.json, uncertainty.png

Work folder (``work``)::

    selftrain.json           the settings; a rerun must use the same ones
    plan.json                the cases by kind, their files and annotated classes, the held-out cases
    steps/<step>.done        one marker per finished step, written last
    journal.jsonl            start/finish of every step, appended (for people and tests)
    roi/                     ROI run folder (pocketseg train)
    round<r>/data/           derived raw data set: symlinked images, label files (ground truth symlinked,
                             merged or pseudo labels written), a dataset.json marking every case fully labelled
    round<r>/detail/         detail run folder;   round<r>/model/   model package (ROI + this detail net)
    round<r>/pseudo/CASE.nii.gz   the round's pseudo labels (raw cascade output);   round<r>/validation.json
    uncertainty.json         {case: score} (null: undefined, see pseudo.py), selection.json
    final/{data,detail,model}/, final/validation.json, report.md, report.json, uncertainty.png

Resumability: a step whose marker exists is never redone. Each step writes its outputs atomically
(folders through :func:`pocketseg.atomic.atomic_output_dir`, files by rename) and its marker last;
a training step continues its run with ``train(resume=True)``, and pseudo labelling skips cases whose
label file exists. Killing the process at any moment and running the same command again continues
from the last finished step (and, inside a step, from the last finished epoch or case).

Many scans, several processes or GPUs: ``shard="I/N"`` splits each round's pseudo labelling. The
process with shard 0/N runs the whole schedule and labels cases 0, N, 2N, ... of the sorted list;
processes 1/N .. N-1/N only label their share of each round as soon as its model package exists,
then wait for the next round, and exit after round R. Shard 0 waits until every case of the round
is labelled. Each case is read, labelled and written on its own, so memory does not grow with the
number of cases, and a killed shard resumes where it stopped. E.g. on a 4-GPU machine::

    CUDA_VISIBLE_DEVICES=0 pocketseg selftrain data --work st --shard 0/4 &
    CUDA_VISIBLE_DEVICES=1 pocketseg selftrain data --work st --shard 1/4 &
    CUDA_VISIBLE_DEVICES=2 pocketseg selftrain data --work st --shard 2/4 &
    CUDA_VISIBLE_DEVICES=3 pocketseg selftrain data --work st --shard 3/4 &

(across machines the work folder must be on a shared filesystem). Training runs in the shard-0
process on one device.

On a Ray cluster, ``ray`` (``--ray [ADDRESS]``) is the simpler way, and the recommended one: one process
runs the schedule and hands each round's pseudo labelling to the workers of
:mod:`pocketseg.runtime.distributed` (one per GPU, or per ``cpus_per_worker`` cores), the same path as
``pocketseg predict --ray``: a worker that dies is replaced and its cases are retried; each round's
results table is ``round<r>/pseudo-run.jsonl``. It does not combine with shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.atomic import atomic_output_dir, ensure_dir, json_text, read_json, write_json
from pocketseg.errors import InputError, OutputError, PocketsegError
from pocketseg.evaluation.evaluate import score_prediction, summarize
from pocketseg.imageio import load_volume
from pocketseg.layout import IMAGES_TR, LABELS_TR, image_name, label_name
from pocketseg.nifti import read_nifti, write_labels
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.runtime.distributed import run_cases
from pocketseg.runtime.predict import CaseJob, CaseOptions
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer import pseudo as P
from pocketseg.trainer.dataset import open_dataset, validate_cases
from pocketseg.trainer.package import export_package, load_run
from pocketseg.trainer.presets import get_preset
from pocketseg.trainer.selftrain_report import write_report
from pocketseg.trainer.train import train
from pocketseg.trainer.workfolder import (FINAL, JOURNAL_NAME, LOCK_NAME, PLAN_NAME, PSEUDO_ENDING, ROI_RUN,
                                          SELECTION_NAME, SETTINGS_NAME, STEPS_DIR, UNCERTAINTY_NAME)

log = logging.getLogger(__name__)

#: Seconds between looks at the work folder while waiting for other shards.
POLL_S = 5.0
#: Seed of the choice of held-out validation cases (independent of the training seed).
HOLDOUT_SEED = 2023


@dataclass(frozen=True)
class Settings:
    """What a work folder was started with; every later run on it must use the same."""

    dataset: str
    rounds: int
    threshold: float | None
    tumor_pseudo: bool
    annotated_from_labels: bool
    preset: str
    roi_preset: str
    roi_run: str | None
    epochs: int
    iterations: int
    batch_size: int
    holdout: float
    seed: int


def plan_steps(rounds: int) -> list[str]:
    """The steps of an uninterrupted run, in order."""
    steps = ["plan"]
    for r in range(1, rounds + 1):
        steps += [f"round{r}/data"] + (["roi"] if r == 1 else [])
        steps += [f"round{r}/{s}" for s in ("train", "export", "pseudo", "validate")]
    return steps + ["uncertainty"] + [f"{FINAL}/{s}" for s in ("data", "train", "export", "validate")] + ["report"]


def parse_shard(shard: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise InputError(None, f"shard must be I/N (e.g. 0/1 or 2/4), got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(None, f"shard must be I/N with 0 <= I < N, got {shard!r}")
    return index, count


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, overwrite=True)


def _read_json(path: Path) -> Any:
    return read_json(path, missing="missing from the self-training work folder")


# ------------------------------------------------------------------------------------------- pseudo labelling

@dataclass(frozen=True)
class LabelJob:
    case: str
    image: Path
    output: Path


def pseudo_label_cases(model: Path, jobs: list[LabelJob], *, device: str = "auto", progress: bool = False,
                       ray: str | None = None, cpus_per_worker: int | None = None) -> int:
    """Label each job's image with the cascade and write its label map atomically; returns how many were written.

    Cases whose output exists are skipped (a killed run resumes). One scan is read ahead while the
    current one is labelled, so at most two scans and one label map are in memory at any time.
    With ``ray`` (an address as ``predict --ray`` takes it) the cases run on the workers of a Ray cluster
    instead; the results table is ``pseudo-run.jsonl`` beside the pseudo-label folder.
    """
    todo = [job for job in jobs if not job.output.is_file()]
    if not todo:
        return 0
    ensure_dir(todo[0].output.parent, "pseudo-label folder")
    if ray is not None:
        folder = todo[0].output.parent
        summary = run_cases(model, [CaseJob(job.case, job.image, job.output) for job in todo],
                            folder.with_name(folder.name + "-run.jsonl"), ray=ray, cpus_per_worker=cpus_per_worker,
                            options=CaseOptions(resume=True), device=device, progress=progress)
        if summary.failures:
            raise PocketsegError(f"pseudo labels of {len(summary.failures)} case(s) failed: "
                                 + "; ".join(f"{case}: {why}" for case, why in summary.failures))
        return len(summary.written)
    predictor = CascadePredictor(model, device=device)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
                tqdm(total=len(todo), desc="pseudo labels", unit="case", disable=not progress) as bar:
            ahead = reader.submit(load_volume, todo[0].image)
            for i, job in enumerate(todo):
                volume = ahead.result()
                if i + 1 < len(todo):
                    ahead = reader.submit(load_volume, todo[i + 1].image)
                labels = predictor.predict(volume).labels
                # overwrite: a helper that also labelled this case wrote the same map; the rename is atomic.
                write_labels(labels, job.output, reference=volume, overwrite=True)
                del volume, labels
                bar.update(1)
    finally:
        predictor.close()
    return len(todo)


def score_package(model: str | os.PathLike, cases: list[tuple[str, Path, Path]], *, device: str = "auto",
                  progress: bool = False) -> dict[str, Any]:
    """FLARE 2023 DSC and NSD per class of (case, image, label) triples segmented by a model package's cascade.

    Returns ``{"cases": {case: scores}, "summary": evaluation.evaluate.summarize(...) or None}``.
    """
    rows: dict[str, dict[str, float]] = {}
    if cases:
        predictor = CascadePredictor(model, device=device)
        try:
            for name, image, label in tqdm(cases, desc="validate", unit="case", disable=not progress):
                volume, gt = load_volume(image), read_nifti(label)
                rows[name] = score_prediction(predictor.predict(volume).labels, gt)
        finally:
            predictor.close()
    return {"cases": rows, "summary": summarize(rows) if rows else None}


# ------------------------------------------------------------------------------------------------ the schedule

class SelfTraining:
    """The self-training schedule over one work folder (see the module docstring); ``run()`` does what is left."""

    def __init__(self, settings: Settings, work: Path, *, device: str = "auto", workers: int | None = None,
                 cache: str | os.PathLike | None = None, shard: tuple[int, int] = (0, 1), progress: bool = True,
                 ray: str | None = None, cpus_per_worker: int | None = None):
        self.settings = settings
        self.ray = ray
        self.cpus_per_worker = cpus_per_worker
        self.work = work
        self.device = device
        self.workers = workers
        self.cache = Path(cache) if cache is not None else work / "cache"
        self.shard = shard
        self.progress = progress
        self._plan: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------- markers and journal

    def marker(self, step: str) -> Path:
        return self.work / STEPS_DIR / (step.replace("/", ".") + ".done")

    def done(self, step: str) -> bool:
        return self.marker(step).is_file()

    def journal(self, event: str, step: str, **extra: Any) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "event": event, "step": step,
                 "pid": os.getpid(), "shard": f"{self.shard[0]}/{self.shard[1]}", **extra}
        with open(self.work / JOURNAL_NAME, "a", encoding="utf-8") as handle:
            handle.write(json_text(entry, indent=None))

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        out: list[tuple[str, Callable[[], None]]] = []
        for name in plan_steps(self.settings.rounds):
            head, _, tail = name.partition("/")
            if not tail:
                out.append((name, getattr(self, f"step_{name}")))
            else:
                out.append((name, (lambda h=head, t=tail: getattr(self, f"step_{t}")(h))))
        return out

    def run(self) -> None:
        ensure_dir(self.work / STEPS_DIR, "work folder")
        # Temporary folders of data sets and packages whose writer was killed (only shard 0 writes these).
        for stale in self.work.glob("*/.*.part"):
            if stale.is_dir() and stale.name.startswith((".data.", ".model.")):
                shutil.rmtree(stale, ignore_errors=True)
        for name, work in self.steps():
            if self.done(name):
                log.debug("selftrain: %s finished earlier", name)
                continue
            log.info("selftrain: %s", name)
            self.journal("start", name)
            t0 = time.perf_counter()
            work()
            seconds = round(time.perf_counter() - t0, 2)
            _write_json(self.marker(name), {"step": name, "seconds": seconds})
            self.journal("finish", name, seconds=seconds)
        log.info("selftrain: finished; final model %s, report %s", self.work / FINAL / "model", self.work / "report.md")

    # ---------------------------------------------------------------------------------------- plan and data

    @property
    def plan(self) -> dict[str, Any]:
        if self._plan is None:
            self._plan = _read_json(self.work / PLAN_NAME)
        return self._plan

    def step_plan(self) -> None:
        s = self.settings
        raw = open_dataset(s.dataset)
        labelled = raw.labelled(full_only=False)
        if labelled:  # every label file, partial ones included, before hours of training (none: refused below)
            validate_cases(labelled, dataset_root=Path(s.dataset))
        cases: dict[str, dict[str, Any]] = {}
        for c in raw.cases:
            if c.label is None:
                kind, annotated = "unlabeled", []
            elif s.annotated_from_labels:
                try:
                    ids, full = P.infer_annotated(read_nifti(c.label).data)
                except ValueError as exc:
                    raise InputError(c.label, str(exc)) from None
                kind, annotated = ("full" if full else "partial"), list(ids)
            else:
                kind, annotated = ("full" if c.is_full else "partial"), list(c.annotated)
            cases[c.name] = {"kind": kind, "image": str(c.image.resolve()),
                             "label": None if c.label is None else str(c.label.resolve()), "annotated": annotated}
        full = sorted(n for n, c in cases.items() if c["kind"] == "full")
        n_hold = 0
        if s.holdout > 0 and len(full) >= 2:
            n_hold = min(len(full) - 1, max(1, round(len(full) * s.holdout)))
        elif s.holdout > 0:
            log.warning("selftrain: only %d fully labelled case(s): none held out, no validation DSC", len(full))
        order = np.random.default_rng(HOLDOUT_SEED).permutation(len(full))
        holdout = sorted(full[i] for i in order[:n_hold])
        pseudo = sorted(n for n, c in cases.items() if c["kind"] != "full")
        if not full:
            raise InputError(s.dataset, "has no fully labelled case to start self-training from")
        if not pseudo:
            raise InputError(s.dataset, "has no partially labelled or unlabelled case to pseudo-label")
        _write_json(self.work / PLAN_NAME, {
            "dataset": s.dataset, "file_ending": raw.file_ending, "cases": cases,
            "train_full": sorted(set(full) - set(holdout)), "holdout": holdout, "pseudo": pseudo,
            "partial": sorted(n for n in pseudo if cases[n]["kind"] == "partial"),
            "unlabeled": sorted(n for n in pseudo if cases[n]["kind"] == "unlabeled"),
            "annotated_from": "labels" if s.annotated_from_labels else "dataset.json"})
        self._plan = None

    def members(self, head: str) -> dict[str, str]:
        """Case -> label source ('ground truth', 'merged', 'pseudo') of the training data of round ``head``."""
        plan = self.plan
        out = {name: "ground truth" for name in plan["train_full"]}
        if head == "round1":
            return out
        if head == FINAL:
            extra = _read_json(self.work / SELECTION_NAME)["selected"]
        else:
            extra = plan["pseudo"]
        for name in extra:
            out[name] = "merged" if plan["cases"][name]["kind"] == "partial" else "pseudo"
        return out

    def pseudo_source(self, head: str) -> Path | None:
        """The pseudo-label folder the training data of round ``head`` is built from."""
        if head == "round1":
            return None
        previous = self.settings.rounds if head == FINAL else int(head[len("round"):]) - 1
        return self.work / f"round{previous}" / "pseudo"

    def step_data(self, head: str) -> None:
        plan, members, source = self.plan, self.members(head), self.pseudo_source(head)
        ending = plan["file_ending"]
        with atomic_output_dir(self.work / head / "data", overwrite=True) as tmp:
            (tmp / IMAGES_TR).mkdir()
            (tmp / LABELS_TR).mkdir()
            for name, kind in sorted(members.items()):
                case = plan["cases"][name]
                os.symlink(case["image"], tmp / IMAGES_TR / image_name(name, ending))
                target = tmp / LABELS_TR / label_name(name, ending)
                if kind == "ground truth":
                    os.symlink(case["label"], target)
                    continue
                pseudo_path = source / label_name(name, PSEUDO_ENDING)
                if kind == "pseudo" and self.settings.tumor_pseudo and ending == PSEUDO_ENDING:
                    os.symlink(pseudo_path.resolve(), target)  # the pseudo label as it is
                    continue
                pseudo = read_nifti(pseudo_path)
                gt = read_nifti(case["label"]) if kind == "merged" else None
                try:
                    merged = P.merge_pseudo_label(pseudo.data, None if gt is None else gt.data,
                                                  case["annotated"] if gt is not None else (),
                                                  tumor_pseudo=self.settings.tumor_pseudo)
                except ValueError as exc:
                    raise InputError(case["label"] or pseudo_path, f"case {name}: {exc}") from None
                write_labels(merged, target, reference=gt if gt is not None else pseudo)
            record = {"derived_from": plan["dataset"], "round": head, "sources": dict(sorted(members.items())),
                      "pseudo_labels": None if source is None else str(source),
                      "tumor_pseudo": self.settings.tumor_pseudo,
                      "annotated_classes": {}}
            dataset = {"name": f"selftrain-{head}", "description": f"pocketseg selftrain training data of {head}",
                       "channel_names": {"0": "CT"}, "labels": L.dataset_json_labels(), "numTraining": len(members),
                       "file_ending": ending, "pocketseg": record}
            write_json(tmp / "dataset.json", dataset)

    # ------------------------------------------------------------------------------------- training, export

    def _train(self, data: Path, stage: str, preset: str, out: Path) -> None:
        s = self.settings
        resume = (out / ckpt.LATEST).is_file()
        if not resume and out.exists():
            shutil.rmtree(out)  # killed before its first epoch ended: nothing worth keeping
        # Validate once, after the last epoch: the round's model is its last epoch (the split of a
        # derived data set may hold pseudo-labelled cases, no ground for picking a "best" epoch);
        # the round's own validation is on the held-out, fully labelled cases.
        train(data, stage=stage, preset=preset, epochs=s.epochs, out=out, resume=resume, device=self.device,
              iterations=s.iterations, batch_size=s.batch_size, val_every=s.epochs, workers=self.workers, seed=s.seed,
              cache=self.cache, progress=self.progress)

    @property
    def roi_dir(self) -> Path:
        return Path(self.settings.roi_run) if self.settings.roi_run else self.work / ROI_RUN

    def step_roi(self) -> None:
        if self.settings.roi_run:
            load_run(self.settings.roi_run, "roi")  # a clear error now rather than at the first export
            return
        self._train(self.work / "round1" / "data", "roi", self.settings.roi_preset, self.roi_dir)

    def step_train(self, head: str) -> None:
        self._train(self.work / head / "data", "detail", self.settings.preset, self.work / head / "detail")

    def step_export(self, head: str) -> None:
        # Round packages only feed pseudo labelling: fp32 ONNX, no parity checks. The final package
        # is the deliverable and gets what ``pocketseg export`` gives by default.
        final = head == FINAL
        export_package(self.roi_dir, self.work / head / "detail", self.work / head / "model", overwrite=True,
                       fp16=final, check=final)

    # ------------------------------------------------------------------------------- pseudo labels, shards

    def label_jobs(self, round_: int) -> list[LabelJob]:
        folder = self.work / f"round{round_}" / "pseudo"
        return [LabelJob(name, Path(self.plan["cases"][name]["image"]), folder / label_name(name, PSEUDO_ENDING))
                for name in self.plan["pseudo"]]

    def my_share(self, jobs: list[LabelJob]) -> list[LabelJob]:
        index, count = self.shard
        return jobs[index::count]

    def label_share(self, round_: int) -> int:
        jobs = self.my_share(self.label_jobs(round_))
        on_ray = {} if self.ray is None else {"ray": self.ray, "cpus_per_worker": self.cpus_per_worker}
        return pseudo_label_cases(self.work / f"round{round_}" / "model", jobs, device=self.device,
                                  progress=self.progress, **on_ray)

    def step_pseudo(self, head: str) -> None:
        round_ = int(head[len("round"):])
        ensure_dir(self.work / head / "pseudo", "pseudo-label folder")
        self.label_share(round_)
        jobs = self.label_jobs(round_)
        if self.shard[1] > 1:
            _wait_until(lambda: all(j.output.is_file() for j in jobs),
                        lambda: f"{sum(not j.output.is_file() for j in jobs)} pseudo label(s) of {head} from the other "
                                f"shards (start them with --shard I/{self.shard[1]})")
        missing = [j.case for j in jobs if not j.output.is_file()]
        if missing:
            raise PocketsegError(f"{head}: pseudo labels missing for {', '.join(missing[:8])}")

    def run_helper(self) -> None:
        """A shard > 0: label this shard's cases of every round once its model package exists."""
        _wait_until(lambda: self.done("plan"), lambda: f"the plan of {self.work} (start --shard 0/{self.shard[1]})")
        for r in range(1, self.settings.rounds + 1):
            if self.done(f"round{r}/pseudo"):
                continue
            _wait_until(lambda r=r: self.done(f"round{r}/export"), lambda r=r: f"the model package of round {r}")
            self.journal("start", f"round{r}/pseudo-share")
            n = self.label_share(r)
            self.journal("finish", f"round{r}/pseudo-share", cases=n)
        log.info("selftrain: shard %d/%d finished its pseudo labels", *self.shard)

    # -------------------------------------------------------------------------------- validation, selection

    def step_validate(self, head: str) -> None:
        plan = self.plan
        cases = [(n, Path(plan["cases"][n]["image"]), Path(plan["cases"][n]["label"])) for n in plan["holdout"]]
        result = score_package(self.work / head / "model", cases, device=self.device, progress=self.progress)
        _write_json(self.work / head / "validation.json", {"model": str(self.work / head / "model"), **result})

    def step_uncertainty(self) -> None:
        rounds = self.settings.rounds
        scores: dict[str, float] = {}
        changes: dict[str, list[dict[str, int]]] = {}
        for name in tqdm(self.plan["pseudo"], desc="uncertainty", unit="case", disable=not self.progress):
            previous, pairs = None, []
            for r in range(1, rounds + 1):  # one label map of a case in memory besides the previous one
                current = np.asarray(read_nifti(self.work / f"round{r}" / "pseudo" / label_name(name, PSEUDO_ENDING)).data)
                if previous is not None:
                    try:
                        pairs.append(P.label_change(previous, current))
                    except ValueError as exc:
                        raise InputError(self.work / f"round{r}" / "pseudo", f"case {name}: {exc}") from None
                previous = current
            scores[name] = P.uncertainty_from_changes(pairs)
            changes[name] = [{"rounds": f"{r}->{r + 1}", "changed": c, "foreground": f}
                             for r, (c, f) in enumerate(pairs, start=1)]
        given = self.settings.threshold
        threshold = given if given is not None else P.default_threshold(scores)
        selected, rejected = P.select_cases(scores, threshold) if math.isfinite(threshold) else ([], sorted(scores))
        _write_json(self.work / UNCERTAINTY_NAME, {n: _finite_or_none(v) for n, v in sorted(scores.items())})
        _write_json(self.work / SELECTION_NAME, {
            "threshold": _finite_or_none(threshold),
            "threshold_rule": "given (--threshold)" if given is not None else "median of the finite scores (default)",
            "selected": selected, "rejected": rejected, "changes": changes})

    def step_report(self) -> None:
        write_report(self.work)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _wait_until(ready: Callable[[], bool], what: Callable[[], str]) -> None:
    """Poll the work folder until ``ready()``; says what it waits for about once a minute."""
    last = 0.0
    while not ready():
        now = time.monotonic()
        if now - last >= 60:
            log.info("selftrain: waiting for %s", what())
            last = now
        time.sleep(POLL_S)


@contextlib.contextmanager
def _work_lock(work: Path) -> Iterator[None]:
    """One schedule (shard 0) per work folder at a time; the lock dies with its process (kill -9 included)."""
    handle = open(work / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(work, "another selftrain (shard 0) is running on this work folder") from None
        yield
    finally:
        handle.close()


def _check_settings(work: Path, settings: Settings, *, create: bool) -> None:
    path = work / SETTINGS_NAME
    if not path.is_file():
        if create:
            _write_json(path, asdict(settings))
        return
    recorded = _read_json(path)
    names = [f.name for f in fields(Settings)]
    if set(recorded) != set(names):
        raise InputError(path, "is not a settings file of this pocketseg selftrain")
    diff = [f"{n} {getattr(settings, n)!r} (started with {recorded[n]!r})" for n in names
            if recorded[n] != json.loads(json.dumps(getattr(settings, n)))]
    if diff:
        raise InputError(work, "was started with other settings: " + "; ".join(diff)
                         + ". Rerun with the same settings to continue, or choose a new --work folder")


def selftrain(
    dataset: str | os.PathLike,
    *,
    work: str | os.PathLike,
    rounds: int = 3,
    threshold: float | None = None,
    tumor_pseudo: bool = True,
    annotated_from_labels: bool = False,
    preset: str = "detail",
    roi_preset: str = "roi",
    roi_run: str | os.PathLike | None = None,
    epochs: int = 1000,
    iterations: int = 250,
    batch_size: int = 2,
    holdout: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    shard: str = "0/1",
    ray: str | None = None,
    cpus_per_worker: int | None = None,
    progress: bool = True,
) -> Path:
    """Run (or continue) semi-supervised self-training in ``work``; returns the work folder.

    ``rounds`` >= 2 (Eq. 1 needs consecutive rounds). ``threshold``: cases whose uncertainty is under
    it are used in the final training (default: the median score). ``tumor_pseudo=False`` keeps tumor
    voxels of pseudo labels out of training (see :data:`pocketseg.trainer.pseudo.TUMOR_PSEUDO_FILL`).
    ``annotated_from_labels``: take each labelled case's annotated classes to be those present in its
    label file, instead of ``dataset.json["pocketseg"]["annotated_classes"]``. ``holdout``: fraction of
    the fully labelled cases kept out of every training and scored after every round. ``epochs``,
    ``iterations``, ``batch_size`` and ``seed`` apply to every training (ROI net and each round).
    ``cache``: preprocessing cache (default ``work/cache``). ``shard``: see the module docstring.
    ``ray``: pseudo-label on a Ray cluster (``local``, ``auto`` or an address, as ``predict --ray``) with workers
    of ``cpus_per_worker`` cores where there is no GPU; replaces ``shard``.
    """
    for name, value, low in (("rounds", rounds, 2), ("epochs", epochs, 1), ("iterations", iterations, 1),
                             ("batch_size", batch_size, 1)):
        if int(value) != value or value < low:
            raise InputError(None, f"{name} must be an integer >= {low}, got {value!r}")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise InputError(None, f"threshold must be a positive number, got {threshold!r}")
    if not 0 <= holdout < 1:
        raise InputError(None, f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(None, f"device must be auto, cpu or cuda, got {device!r}")
    get_preset(preset, "detail")
    get_preset(roi_preset, "roi")
    shard_ix = parse_shard(shard)
    if ray is not None and shard_ix != (0, 1):
        raise InputError(None, f"--ray and --shard {shard}: Ray spreads the pseudo labelling itself; give one of them")
    if cpus_per_worker is not None and ray is None:
        raise InputError(None, "--cpus-per-worker: only with --ray")
    data_root = Path(dataset)
    if not (data_root / "dataset.json").is_file():
        raise InputError(data_root / "dataset.json", "not found (expected an nnU-Net v2 raw data set folder)")
    if roi_run is not None and not Path(roi_run).is_dir():
        raise InputError(roi_run, "ROI run folder does not exist")
    settings = Settings(dataset=str(data_root.resolve()), rounds=int(rounds),
                        threshold=None if threshold is None else float(threshold), tumor_pseudo=bool(tumor_pseudo),
                        annotated_from_labels=bool(annotated_from_labels), preset=preset, roi_preset=roi_preset,
                        roi_run=None if roi_run is None else str(Path(roi_run).resolve()), epochs=int(epochs),
                        iterations=int(iterations), batch_size=int(batch_size), holdout=float(holdout), seed=int(seed))
    work_dir = Path(work)
    if work_dir.exists() and not work_dir.is_dir():
        raise OutputError(work_dir, "exists and is not a folder")
    st = SelfTraining(settings, work_dir, device=device, workers=workers, cache=cache, shard=shard_ix,
                      progress=progress, ray=ray, cpus_per_worker=cpus_per_worker)
    if shard_ix[0] > 0:
        _wait_until(lambda: (work_dir / SETTINGS_NAME).is_file(),
                    lambda: f"{work_dir / SETTINGS_NAME} (start --shard 0/{shard_ix[1]} first)")
        _check_settings(work_dir, settings, create=False)
        st.run_helper()
        return work_dir
    ensure_dir(work_dir, "work folder")
    with _work_lock(work_dir):
        _check_settings(work_dir, settings, create=True)
        st.run()
    return work_dir
