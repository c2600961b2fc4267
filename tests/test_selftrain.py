"""Self-training: the merge rule, paper Eq. 1, selection, shards, and a crashed-and-resumed run on tiny data."""

from __future__ import annotations

import inspect
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pocketseg import labels as L
from pocketseg.errors import InputError
from pocketseg.manifest import load_package
from pocketseg.trainer import pseudo as P

LIVER, RKID, SPLEEN, TUMOR = 1, 2, 3, L.TUMOR


def vol(values) -> np.ndarray:
    """A 1 x 1 x n label volume from a list."""
    return np.asarray(values, dtype=np.uint8).reshape(1, 1, -1)


# ------------------------------------------------------------------------------------------------ merge rule

def test_merge_keeps_the_annotated_ground_truth_exactly():
    gt = vol([0, 1, 1, 0, 0, 0, 14, 0, 1])
    pseudo = vol([1, 1, 0, 2, 3, 1, 1, 14, 3])
    merged = P.merge_pseudo_label(pseudo, gt, annotated=[LIVER, TUMOR])
    # 0: pseudo liver, GT not liver -> not liver (background); 1, 2: GT liver; 3, 4: unannotated classes from the
    # pseudo label; 5: pseudo liver outside GT -> background; 6: GT tumor wins over pseudo liver; 7: pseudo tumor
    # where the GT (which annotates tumor) has none -> background; 8: GT liver wins over pseudo spleen.
    assert merged.ravel().tolist() == [0, 1, 1, 2, 3, 0, 14, 0, 1]
    assert merged.dtype == np.uint8
    for c in (LIVER, TUMOR):  # annotated classes are exactly the ground truth's
        assert np.array_equal(merged == c, gt == c)


def test_merge_takes_unannotated_classes_from_the_pseudo_label():
    gt = vol([0, 0, 3, 3, 0])
    pseudo = vol([1, 2, 2, 3, 13])
    merged = P.merge_pseudo_label(pseudo, gt, annotated=[SPLEEN])
    assert merged.ravel().tolist() == [1, 2, 3, 3, 13]
    assert not np.shares_memory(merged, pseudo)


def test_unlabelled_case_is_its_pseudo_label():
    pseudo = vol([0, 1, 5, 14])
    assert P.merge_pseudo_label(pseudo).ravel().tolist() == [0, 1, 5, 14]


@pytest.mark.parametrize("fill", [0, P.IGNORE_INDEX])
def test_tumor_pseudo_labels_kept_out(fill):
    pseudo = vol([0, 1, 14, 14, 2])
    out = P.merge_pseudo_label(pseudo, tumor_pseudo=False, tumor_fill=fill)
    assert out.ravel().tolist() == [0, 1, fill, fill, 2]
    # A partial case that does not annotate tumors: its pseudo tumor goes too.
    gt = vol([0, 1, 0, 0, 0])
    out = P.merge_pseudo_label(pseudo, gt, [LIVER], tumor_pseudo=False, tumor_fill=fill)
    assert out.ravel().tolist() == [0, 1, fill, fill, 2]
    # A case that annotates tumors keeps its ground-truth tumor; the pseudo tumor outside it is ruled out.
    gt = vol([0, 1, 14, 0, 0])
    out = P.merge_pseudo_label(pseudo, gt, [LIVER, TUMOR], tumor_pseudo=False, tumor_fill=fill)
    assert out.ravel().tolist() == [0, 1, 14, 0, 2]


def test_default_tumor_fill_is_what_train_accepts():
    # trainer.dataset.validate_cases refuses label values above 14; see TUMOR_PSEUDO_FILL.
    assert P.TUMOR_PSEUDO_FILL == L.BACKGROUND


@pytest.mark.parametrize("kwargs, match", [
    (dict(pseudo=vol([0, 1]), ground_truth=vol([0, 2]), annotated=[1]), "not among the annotated"),
    (dict(pseudo=vol([0, 1]), ground_truth=vol([0, 1, 1]), annotated=[1]), "shape"),
    (dict(pseudo=vol([0, 1]), annotated=[1]), "without a ground truth"),
    (dict(pseudo=vol([0, 15])), "0-14"),
    (dict(pseudo=vol([0, 1]), ground_truth=vol([0, 1]), annotated=[1, 20]), "foreground"),
    (dict(pseudo=vol([0, 1]), tumor_fill=7), "tumor_fill"),
    (dict(pseudo=np.zeros((1, 1, 2), dtype=np.float32)), "integer"),
])
def test_merge_rejects_inconsistent_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.merge_pseudo_label(**kwargs)


def test_infer_annotated_from_the_label_file():
    partial = vol([0, 1, 1, 14])
    assert P.infer_annotated(partial) == ((LIVER, TUMOR), False)
    organs = vol([0, *L.ORGAN_IDS])  # every organ, no tumor: a full annotation of a tumor-free scan
    assert P.infer_annotated(organs) == (L.FOREGROUND_IDS, True)
    with pytest.raises(ValueError, match="outside"):
        P.infer_annotated(vol([0, 255]))


# ------------------------------------------------------------------------------------------ Eq. 1, selection

R1 = vol([0, 1, 1, 1, 2, 2, 0, 0, 0, 0])
R2 = vol([0, 1, 1, 2, 2, 2, 3, 0, 0, 0])  # 2 voxels changed; 6 foreground
R3 = vol([0, 1, 1, 2, 2, 0, 3, 0, 0, 0])  # 1 voxel changed; 5 foreground


def test_label_change_counts():
    assert P.label_change(R1, R2) == (2, 6)
    assert P.label_change(R2, R3) == (1, 5)
    with pytest.raises(ValueError, match="shape"):
        P.label_change(R1, vol([0]))


def test_uncertainty_is_the_mean_over_consecutive_rounds():
    assert P.uncertainty_score([R1, R2, R3]) == pytest.approx((2 / 6 + 1 / 5) / 2)
    assert P.uncertainty_score([R1, R2]) == pytest.approx(2 / 6)
    assert P.uncertainty_score([R2, R2, R2]) == 0.0
    assert P.uncertainty_from_changes([(2, 6), (1, 5)]) == pytest.approx((2 / 6 + 1 / 5) / 2)


def test_uncertainty_with_empty_foreground():
    empty = vol([0] * 10)
    assert P.uncertainty_score([R1, empty]) == math.inf  # the later round lost everything
    assert P.uncertainty_score([empty, empty]) == math.inf  # stably empty: a failed prediction, never selected
    assert P.uncertainty_score([R1, empty, R1]) == math.inf  # one undefined pair makes the mean undefined
    assert P.uncertainty_score([empty, R2]) == pytest.approx(1.0)  # all 6 later foreground voxels changed
    with pytest.raises(ValueError, match="two rounds"):
        P.uncertainty_score([R1])
    with pytest.raises(ValueError, match="two rounds"):
        P.uncertainty_from_changes([])
    with pytest.raises(ValueError, match=">= 0"):
        P.uncertainty_from_changes([(-1, 3)])


def test_selection_keeps_cases_under_the_threshold():
    scores = {"a": 0.1, "b": 0.2, "c": 0.3, "d": math.inf, "e": 0.2}
    assert P.select_cases(scores, 0.2) == (["a"], ["b", "c", "d", "e"])
    assert P.select_cases(scores, 0.25) == (["a", "b", "e"], ["c", "d"])
    assert P.select_cases(scores, 1e9)[1] == ["d"]
    assert P.default_threshold(scores) == pytest.approx(0.2)  # median of the finite scores
    assert P.default_threshold({"x": math.inf}) == math.inf
    with pytest.raises(ValueError, match="positive"):
        P.select_cases(scores, 0)


# ------------------------------------------------------------------------------------- plan, shards, CLI

def test_plan_steps_and_shards():
    from pocketseg.trainer.selftrain import parse_shard, plan_steps

    steps = plan_steps(3)
    assert steps[:3] == ["plan", "round1/data", "roi"]
    assert steps[-6:] == ["uncertainty", "final/data", "final/train", "final/export", "final/validate", "report"]
    assert [s for s in steps if s.endswith("/pseudo")] == ["round1/pseudo", "round2/pseudo", "round3/pseudo"]
    assert len(steps) == len(set(steps))
    assert parse_shard("0/1") == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(InputError, match="shard"):
            parse_shard(bad)


def test_cli_flags_are_keywords_of_selftrain():
    from pocketseg.cli import _kwargs, build_parser
    from pocketseg.trainer.selftrain import selftrain

    args = build_parser().parse_args(["selftrain", "data", "--work", "w", "--rounds", "2", "--threshold", "0.1",
                                      "--no-tumor-pseudo", "--annotated-from-labels", "--shard", "1/4"])
    kwargs = _kwargs(args)
    assert set(kwargs) <= set(inspect.signature(selftrain).parameters)
    assert kwargs["tumor_pseudo"] is False and kwargs["annotated_from_labels"] is True
    assert kwargs["work"] == "w" and kwargs["shard"] == "1/4" and kwargs["threshold"] == 0.1


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=1), "rounds"), (dict(threshold=0.0), "threshold"), (dict(holdout=1.0), "holdout"),
    (dict(shard="2/2"), "shard"), (dict(preset="roi-tiny"), "detail"), (dict(epochs=0), "epochs"),
    (dict(device="tpu"), "device"), (dict(ray="local", shard="0/2"), "--ray and --shard"),
    (dict(cpus_per_worker=2), "only with --ray"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, kwargs, match):
    from pocketseg.trainer.selftrain import selftrain

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match=match):
        selftrain(tmp_path / "data", work=tmp_path / "work", **kwargs)
    assert not (tmp_path / "work").exists()


def _fake_schedule(tmp_path: Path, cases: list[str], shard=(0, 1)):
    from pocketseg.trainer.selftrain import STEPS_DIR, SelfTraining, Settings

    work = tmp_path / "work"
    (work / STEPS_DIR).mkdir(parents=True, exist_ok=True)
    plan = {"cases": {n: {"kind": "unlabeled", "image": str(tmp_path / f"{n}_0000.nii.gz"), "label": None,
                          "annotated": []} for n in cases}, "pseudo": cases}
    (work / "plan.json").write_text(json.dumps(plan))
    settings = Settings(dataset=str(tmp_path), rounds=2, threshold=None, tumor_pseudo=True,
                        annotated_from_labels=False, preset="detail-tiny", roi_preset="roi-tiny", roi_run=None,
                        epochs=1, iterations=1, batch_size=2, holdout=0.0, seed=0)
    return SelfTraining(settings, work, shard=shard, progress=False)


def _fake_labeller(calls: list):
    def label(model, jobs, *, device="auto", progress=False):
        calls.append((Path(model).parent.name, [j.case for j in jobs]))
        for job in jobs:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            job.output.write_bytes(b"x")
        return len(jobs)
    return label


def test_shards_split_the_cases_and_shard_0_waits_for_the_others(tmp_path, monkeypatch):
    from pocketseg.trainer import selftrain as S

    monkeypatch.setattr(S, "POLL_S", 0.01)
    calls: list = []
    monkeypatch.setattr(S, "pseudo_label_cases", _fake_labeller(calls))
    cases = [f"C{i:02d}" for i in range(7)]
    shares = [_fake_schedule(tmp_path, cases, (i, 3)).my_share(_fake_schedule(tmp_path, cases, (i, 3)).label_jobs(1))
              for i in range(3)]
    assert sorted(j.case for share in shares for j in share) == cases  # disjoint and complete
    assert [j.case for j in shares[1]] == ["C01", "C04"]

    main = _fake_schedule(tmp_path, cases, (0, 2))
    helper = _fake_schedule(tmp_path, cases, (1, 2))
    (main.work / "round1" / "model").mkdir(parents=True)
    timer = threading.Timer(0.3, lambda: helper.label_share(1))
    t0 = time.monotonic()
    timer.start()
    main.step_pseudo("round1")  # returns only once the helper's share is there
    timer.join()
    assert time.monotonic() - t0 >= 0.3
    assert sorted(calls) == [("round1", ["C00", "C02", "C04", "C06"]), ("round1", ["C01", "C03", "C05"])]


def test_helper_labels_each_round_once_its_model_exists(tmp_path, monkeypatch):
    from pocketseg.trainer import selftrain as S

    monkeypatch.setattr(S, "POLL_S", 0.01)
    calls: list = []
    monkeypatch.setattr(S, "pseudo_label_cases", _fake_labeller(calls))
    helper = _fake_schedule(tmp_path, ["A", "B", "C"], (1, 2))
    for step in ("plan", "round1/pseudo", "round2/export"):  # round 1 already finished by everyone
        helper.marker(step).write_text("{}")
    helper.run_helper()
    assert calls == [("round2", ["B"])]


def test_pseudo_labels_on_a_local_ray_cluster_equal_one_process(tiny_package, tmp_path):
    """The Ray path of a round's pseudo labelling: a local cluster started and stopped for the call, the same
    label maps as one process with the workers' engine settings (one thread), and a results table."""
    pytest.importorskip("ray", reason="ray (extra 'ray') is not installed")
    from pocketseg.nifti import read_nifti, write_nifti
    from pocketseg.runtime.predict import predict
    from pocketseg.synth.phantom import make_phantom
    from pocketseg.trainer.selftrain import LabelJob, pseudo_label_cases

    images = tmp_path / "images"
    images.mkdir()
    jobs = []
    for seed, case in enumerate(("U1", "U2", "U3")):
        ph = make_phantom(seed, small=True, slices=16)
        write_nifti(ph.image, images / f"{case}_0000.nii.gz", affine=ph.affine)
        jobs.append(LabelJob(case, images / f"{case}_0000.nii.gz", tmp_path / "round1" / "pseudo" / f"{case}.nii.gz"))
    jobs[2].output.parent.mkdir(parents=True)
    jobs[2].output.write_bytes(b"labelled earlier")  # skipped, as a resumed round skips it
    assert pseudo_label_cases(tiny_package, jobs, device="cpu", ray="local", cpus_per_worker=1) == 2
    assert jobs[2].output.read_bytes() == b"labelled earlier"
    predict(images, tmp_path / "one", tiny_package, device="cpu", threads=1, progress=False)
    for job in jobs[:2]:
        np.testing.assert_array_equal(np.asarray(read_nifti(job.output).data),
                                      np.asarray(read_nifti(tmp_path / "one" / f"{job.case}.nii.gz").data))
    rows = [json.loads(line) for line in (tmp_path / "round1" / "pseudo-run.jsonl").read_text().splitlines()]
    assert sorted((r["case"], r["status"]) for r in rows) == [("U1", "written"), ("U2", "written")]
    assert sorted(p.name for p in (tmp_path / "round1" / "pseudo").iterdir()) == ["U1.nii.gz", "U2.nii.gz", "U3.nii.gz"]


# ------------------------------------------------------------------------------ end to end on tiny data

KW = dict(rounds=2, preset="detail-tiny", roi_preset="roi-tiny", epochs=1, iterations=2, batch_size=2, holdout=0.2,
          device="cpu", workers=0, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pocketseg.synth.dataset import synthesize_dataset

    root = tmp_path_factory.mktemp("st") / "data"
    return synthesize_dataset(root, full=3, partial=2, unlabeled=2, seed=3, small=True, slices=24, progress=False)


def test_plan_with_annotated_classes_inferred_from_the_labels(tmp_path):
    from pocketseg.nifti import read_nifti
    from pocketseg.synth.dataset import synthesize_dataset
    from pocketseg.trainer.selftrain import SelfTraining, Settings

    # 40 slices: the full cases show all 13 organs (24 slices would cut some off, and look partial).
    dataset = synthesize_dataset(tmp_path / "data", full=3, partial=2, unlabeled=1, seed=3, small=True, slices=40,
                                 progress=False)

    settings = Settings(dataset=str(dataset), rounds=2, threshold=None, tumor_pseudo=True, annotated_from_labels=True,
                        preset="detail-tiny", roi_preset="roi-tiny", roi_run=None, epochs=1, iterations=1,
                        batch_size=2, holdout=0.2, seed=0)
    st = SelfTraining(settings, tmp_path / "work", progress=False)
    (tmp_path / "work").mkdir()
    st.step_plan()
    plan = st.plan
    record = json.loads((dataset / "dataset.json").read_text())["pocketseg"]
    for name in record["subsets"]["partial"]:
        present = sorted(set(np.unique(read_nifti(plan["cases"][name]["label"]).data).tolist()) - {0})
        assert plan["cases"][name] == {**plan["cases"][name], "kind": "partial", "annotated": present}
        assert set(present) <= set(record["annotated_classes"][name])
    assert set(plan["unlabeled"]) == set(record["subsets"]["unlabeled"])
    assert sorted(plan["train_full"] + plan["holdout"]) == record["subsets"]["full"] and len(plan["holdout"]) == 1
    assert all(plan["cases"][n]["annotated"] == list(L.FOREGROUND_IDS) for n in record["subsets"]["full"])


def _journal(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "journal.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def crashed_and_resumed(dataset, tmp_path_factory):
    """Crash once inside round 1's pseudo labelling (after its first case), once at round 2's training; then finish."""
    import torch

    work = tmp_path_factory.mktemp("st") / "work"
    mp = pytest.MonkeyPatch()
    # Tiny nets: one thread is faster than two that contend with other processes on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _crash_twice_then_finish(dataset, work, mp)
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def _crash_twice_then_finish(dataset: Path, work: Path, mp: pytest.MonkeyPatch):
    import pocketseg.nifti
    from pocketseg.trainer import selftrain as S

    real_write = pocketseg.nifti.write_labels
    written: list[Path] = []

    def write_then_crash(labels, path, **kwargs):
        if written:
            raise RuntimeError("simulated crash while pseudo-labelling")
        written.append(Path(path))
        return real_write(labels, path, **kwargs)

    mp.setattr(S, "write_labels", write_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash while pseudo"):
        S.selftrain(dataset, work=work, **KW)
    mp.undo()
    first_case = written[0]
    first_mtime = first_case.stat().st_mtime_ns
    real_train = S.SelfTraining.step_train

    def crash_round2(self, head):
        if head == "round2":
            raise RuntimeError("simulated crash at round 2")
        return real_train(self, head)

    mp.setattr(S.SelfTraining, "step_train", crash_round2)
    with pytest.raises(RuntimeError, match="simulated crash at round 2"):
        S.selftrain(dataset, work=work, **KW)
    mp.undo()
    S.selftrain(dataset, work=work, **KW)
    return work, first_case, first_mtime


@pytest.mark.slow
def test_resumed_run_redoes_no_step(crashed_and_resumed, dataset):
    from pocketseg.trainer.selftrain import plan_steps

    work, first_case, first_mtime = crashed_and_resumed
    events = _journal(work)
    finished = [e["step"] for e in events if e["event"] == "finish"]
    assert finished == plan_steps(2)  # the step list of an uninterrupted run, each step finished once
    started = [e["step"] for e in events if e["event"] == "start"]
    assert sorted(s for s in set(started) if started.count(s) > 1) == ["round1/pseudo", "round2/train"]
    assert len({e["pid"] for e in events}) == 1  # all in this test process, three calls
    markers = sorted(p.name for p in (work / "steps").glob("*.done"))
    assert markers == sorted(s.replace("/", ".") + ".done" for s in plan_steps(2))
    # The pseudo label written before the crash was kept, not redone.
    assert first_case.stat().st_mtime_ns == first_mtime
    # No leftovers of atomic writes.
    assert not list(work.rglob("*.part"))

    from pocketseg.trainer.selftrain import selftrain

    stale = work / "round2" / ".data.killed.part"  # what a kill -9 inside atomic_output_dir leaves
    (stale / "labelsTr").mkdir(parents=True)
    selftrain(dataset, work=work, **KW)  # a finished folder: nothing to do, nothing started
    assert _journal(work) == events
    assert not stale.exists()


@pytest.mark.slow
def test_rounds_pseudo_labels_merge_and_uncertainty(crashed_and_resumed):
    from pocketseg.nifti import read_nifti

    work, _, _ = crashed_and_resumed
    plan = json.loads((work / "plan.json").read_text())
    assert plan["pseudo"] == sorted(plan["partial"] + plan["unlabeled"]) and len(plan["pseudo"]) == 4
    for r in (1, 2):
        names = sorted(p.name for p in (work / f"round{r}" / "pseudo").iterdir())
        assert names == [f"{n}.nii.gz" for n in plan["pseudo"]]
    # Round 1 trains on fully labelled cases only; round 2 on all, partial cases merged with round 1's pseudo labels.
    r1 = json.loads((work / "round1" / "data" / "dataset.json").read_text())["pocketseg"]["sources"]
    assert r1 == {n: "ground truth" for n in plan["train_full"]}
    r2 = json.loads((work / "round2" / "data" / "dataset.json").read_text())["pocketseg"]["sources"]
    assert set(r2) == set(plan["train_full"]) | set(plan["pseudo"]) and not set(r2) & set(plan["holdout"])
    for name in plan["partial"]:
        case = plan["cases"][name]
        gt = np.asarray(read_nifti(case["label"]).data)
        pseudo = np.asarray(read_nifti(work / "round1" / "pseudo" / f"{name}.nii.gz").data)
        merged = np.asarray(read_nifti(work / "round2" / "data" / "labelsTr" / f"{name}.nii.gz").data)
        assert np.array_equal(merged, P.merge_pseudo_label(pseudo, gt, case["annotated"]))
        for c in case["annotated"]:
            assert np.array_equal(merged == c, gt == c)
    # uncertainty.json is Eq. 1 of the saved pseudo labels.
    scores = json.loads((work / "uncertainty.json").read_text())
    assert set(scores) == set(plan["pseudo"])
    for name, score in scores.items():
        maps = [np.asarray(read_nifti(work / f"round{r}" / "pseudo" / f"{name}.nii.gz").data) for r in (1, 2)]
        expected = P.uncertainty_score(maps)
        assert (score is None and not math.isfinite(expected)) or score == pytest.approx(expected)
    selection = json.loads((work / "selection.json").read_text())
    final = json.loads((work / "final" / "data" / "dataset.json").read_text())["pocketseg"]["sources"]
    assert set(final) == set(plan["train_full"]) | set(selection["selected"])
    assert all(scores[n] is not None and scores[n] < selection["threshold"] for n in selection["selected"])
    final_model = load_package(work / "final" / "model")  # complete, every checksum verified
    assert {s.preset for s in final_model.stages.values()} == {KW["preset"], KW["roi_preset"]}


@pytest.mark.slow
def test_report_files(crashed_and_resumed):
    work, _, _ = crashed_and_resumed
    report = json.loads((work / "report.json").read_text())
    assert [r["name"] for r in report["rounds"]] == ["round1", "round2"] and report["final"]["name"] == "final"
    assert report["rounds"][0]["counts"] == {"ground truth": 2, "merged": 0, "pseudo": 0}
    assert report["rounds"][1]["counts"] == {"ground truth": 2, "merged": 2, "pseudo": 2}
    for stage in report["rounds"] + [report["final"]]:
        v = stage["validation"]
        assert v["cases"] == report["cases"]["held_out"]
        assert set(v["per_class"]) == {lab.name for lab in L.LABELS[1:]}
        assert all(0 <= x["DSC"] <= 1 and 0 <= x["NSD"] <= 1 for x in v["per_class"].values())
    u = report["uncertainty"]
    assert set(u["selected"]) | set(u["rejected"]) == set(u["scores"])
    text = (work / "report.md").read_text()
    for heading in ("## Rounds", "## Validation DSC", "## Uncertainty", "uncertainty.png", "Tumor"):
        assert heading in text
    assert (work / "uncertainty.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_other_settings_on_the_same_work_folder_are_refused(crashed_and_resumed, dataset):
    from pocketseg.trainer.selftrain import selftrain

    work, _, _ = crashed_and_resumed
    with pytest.raises(InputError, match="threshold 0.5"):
        selftrain(dataset, work=work, **{**KW, "threshold": 0.5})


def test_a_bad_partial_label_is_refused_when_planning_before_any_training(tmp_path):
    from pocketseg.nifti import read_nifti, write_nifti
    from pocketseg.synth.dataset import synthesize_dataset
    from pocketseg.trainer.selftrain import SelfTraining, Settings

    dataset = synthesize_dataset(tmp_path / "data", full=2, partial=1, seed=4, small=True, slices=24,
                                 progress=False)
    partial = json.loads((dataset / "dataset.json").read_text())["pocketseg"]["subsets"]["partial"][0]
    path = dataset / "labelsTr" / f"{partial}.nii.gz"
    label = read_nifti(path)
    data = np.asarray(label.data).copy()
    data[0, 0, 0] = 99
    write_nifti(data, path, affine=label.affine, overwrite=True)
    settings = Settings(dataset=str(dataset), rounds=2, threshold=None, tumor_pseudo=True, annotated_from_labels=False,
                        preset="detail-tiny", roi_preset="roi-tiny", roi_run=None, epochs=1, iterations=1,
                        batch_size=2, holdout=0.0, seed=0)
    (tmp_path / "work").mkdir()
    with pytest.raises(InputError, match=f"{partial}: label values outside 0-14: \\[99\\]"):
        SelfTraining(settings, tmp_path / "work", progress=False).step_plan()
