"""`pocketseg predict --ray`: a local Ray cluster of 2 CPU workers against single-process folder mode, a worker
killed in the middle of a case, a bad case, an interrupted run finished with --continue, and the input plans."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pocketseg.atomic import atomic_open
from pocketseg.cli import main
from pocketseg.errors import InputError
from pocketseg.nifti import read_nifti, write_nifti
from pocketseg.runtime import distributed as D
from pocketseg.runtime.predict import CaseJob, CaseOptions, PredictFailures, predict
from pocketseg.synth.phantom import make_phantom

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")

CASES = ("A", "B", "C", "D")


def _write_case(path: Path, seed: int) -> Path:
    ph = make_phantom(seed, small=True, slices=16)
    write_nifti(ph.image, path, affine=ph.affine)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases")
    for seed, case in enumerate(CASES):
        _write_case(folder / f"{case}_0000.nii.gz", seed)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_package, cases, tmp_path_factory) -> Path:
    """Single-process folder mode with the engine settings of a 1-core worker: what every Ray run must reproduce.

    One thread, as the workers (--cpus-per-worker 1) have: OpenVINO's CPU kernels sum in another order with
    another thread count, which moves near-tie voxels of these random-weight nets.
    """
    out = tmp_path_factory.mktemp("reference")
    predict(cases, out, tiny_package, device="cpu", threads=1, statistics=True, progress=False)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module; predict --ray uses this connection instead of starting one."""
    ray = pytest.importorskip("ray", reason="ray (extra 'ray') is not installed")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def _ray(*args) -> int:
    return main(["-q", "predict", *map(str, args), "--ray", "--device", "cpu"])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / D.RUN_TABLE).read_text().splitlines()]


def _assert_equal_to(reference: Path, out: Path, cases=CASES) -> None:
    for case in cases:
        ours, theirs = read_nifti(out / f"{case}.nii.gz"), read_nifti(reference / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(ours.data), np.asarray(theirs.data), err_msg=case)
        np.testing.assert_array_equal(ours.affine, theirs.affine)


def _leftovers(out: Path) -> list[str]:
    """Temporary files of atomic writes (``.NAME.*.part``) and anything else hidden."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.slow  # a local Ray cluster: several seconds on 2 cores
def test_two_workers_equal_folder_mode_voxel_for_voxel(cluster, tiny_package, cases, reference, tmp_path):
    out = tmp_path / "out"
    assert _ray("-i", cases, "-o", out, "-m", tiny_package, "--statistics") == 0
    _assert_equal_to(reference, out)
    assert sorted(p.name for p in out.glob("*.statistics.json")) == [f"{c}.statistics.json" for c in CASES]
    rows = _rows(out)
    assert sorted(r["case"] for r in rows) == list(CASES) and {r["status"] for r in rows} == {"written"}
    assert len({r["pid"] for r in rows}) == 2  # both workers took cases
    assert all(r["device"] == "cpu" and r["times_s"]["detail"] > 0 and "read" in r["times_s"] for r in rows)
    assert not _leftovers(out)


@pytest.mark.slow
def test_a_worker_killed_mid_case_is_replaced_and_every_case_written_once(cluster, tiny_package, cases, reference,
                                                                          tmp_path, monkeypatch):
    out, marker = tmp_path / "out", tmp_path / "fault-fired"
    # The worker that holds B ends its process (as kill -9 would) after B's prediction, before B is written.
    monkeypatch.setenv(D.FAULT_ENV, f"B:write:{marker}")
    assert _ray("-i", cases, "-o", out, "-m", tiny_package, "--statistics") == 0
    assert marker.is_file()
    _assert_equal_to(reference, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c}.nii.gz" for c in CASES] + [f"{c}.statistics.json" for c in CASES] + [D.RUN_TABLE])
    rows = _rows(out)
    lost = [r for r in rows if r["status"] == "lost"]
    assert "B" in {r["case"] for r in lost}
    finals = [r for r in rows if r["status"] != "lost"]
    assert sorted(r["case"] for r in finals) == list(CASES) and {r["status"] for r in finals} == {"written"}
    retried_b = next(r for r in finals if r["case"] == "B")
    assert retried_b["attempt"] == 2 and retried_b["pid"] != lost[0]["pid"]  # retried on another worker


@pytest.mark.slow
def test_a_case_that_always_kills_its_worker_fails_after_the_retries(cluster, tiny_package, cases, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(D.FAULT_ENV, "C:predict:")  # no marker: the worker that reaches C's prediction dies, every time
    with pytest.raises(PredictFailures) as failed:
        D.predict_ray(cases, out, tiny_package, device="cpu", retries=1, progress=False)
    assert [case for case, _ in failed.value.failures] == ["C"] and "died 2 time(s)" in failed.value.failures[0][1]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["A.nii.gz", "B.nii.gz", "D.nii.gz"]
    assert not _leftovers(out)


@pytest.mark.slow
def test_a_bad_case_fails_alone(cluster, tiny_package, cases, reference, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(cases, src)
    (src / "E_0000.nii.gz").write_text("not an image")
    assert _ray("-i", src, "-o", out, "-m", tiny_package) == 2
    err = capsys.readouterr().err
    assert "1 case(s) failed (4 written)" in err and "E_0000.nii.gz" in err
    _assert_equal_to(reference, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{c}.nii.gz" for c in CASES] + [D.RUN_TABLE])
    bad = [r for r in _rows(out) if r["case"] == "E"]
    assert len(bad) == 1 and bad[0]["status"] == "failed" and "E_0000.nii.gz" in bad[0]["error"]


@pytest.mark.slow
def test_an_interrupted_driver_on_a_running_cluster_leaves_no_partial_file(cluster, tiny_package, cases, reference,
                                                                        tmp_path, monkeypatch):
    out = tmp_path / "out"
    append = D._RunTable.append

    def interrupt_after_the_first_case(self, job, attempt, info, result=None, **kw):
        append(self, job, attempt, info, result, **kw)
        raise KeyboardInterrupt  # Ctrl-C in the driver while the workers hold the other cases

    monkeypatch.setattr(D._RunTable, "append", interrupt_after_the_first_case)
    with pytest.raises(KeyboardInterrupt):
        D.predict_ray(cases, out, tiny_package, device="cpu", statistics=True, progress=False)
    monkeypatch.undo()
    assert not _leftovers(out)
    done = {p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz")}
    assert 1 <= len(done) < len(CASES)
    for case in done:  # what is there is complete
        assert (out / f"{case}.statistics.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != D.RUN_TABLE}
    first_run = len(_rows(out))

    written = D.predict_ray(cases, out, tiny_package, device="cpu", statistics=True, resume=True, progress=False)
    missing = sorted(set(CASES) - done)
    assert sorted(p.name for p in written) == [f"{c}.nii.gz" for c in missing]
    second = _rows(out)[first_run:]
    assert sorted(r["case"] for r in second) == missing  # only the missing cases were run
    _assert_equal_to(reference, out)
    for name, stamp in stamps.items():
        if name.split(".")[0] in done:
            assert (out / name).stat().st_mtime_ns == stamp, name  # finished cases untouched


#: Copies of the four cases (copy: original) that make the interrupted run long enough to interrupt.
COPIES = {chr(ord("E") + i): "ABCD"[i % 4] for i in range(12)}


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_continue_redoes_only_what_was_missing(tiny_package, cases, reference, tmp_path):
    """A real Ctrl-C: SIGINT to the process group of `pocketseg predict --ray` (its own local cluster included)."""
    pytest.importorskip("ray", reason="ray (extra 'ray') is not installed")
    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(cases, src)
    # Enough cases that the parallel workers cannot finish them all between the first one and the signal.
    for extra, copy_of in COPIES.items():
        shutil.copy(src / f"{copy_of}_0000.nii.gz", src / f"{extra}_0000.nii.gz")
    command = [sys.executable, "-m", "pocketseg", "-q", "predict", "-i", str(src), "-o", str(out), "-m",
               str(tiny_package), "--statistics", "--device", "cpu", "--ray"]
    # As a terminal's foreground job: SIGINT not ignored. A background job of a non-interactive shell (a CI script's
    # `cmd &`) inherits SIGINT ignored, and so would the run, which would then rightly go on to the end. A handled
    # signal is reset to its default in a new program, so the child starts with SIGINT at its default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 90
        while not ((out / D.RUN_TABLE).is_file() and (out / D.RUN_TABLE).read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "no case finished"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = {p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz")}
    assert proc.returncode == 130 and "interrupted" in err
    assert not _leftovers(out)
    assert 1 <= len(done) < 4 + len(COPIES)
    assert all((out / f"{case}.statistics.json").is_file() for case in done)  # what is there is complete
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != D.RUN_TABLE}
    first_run = len(_rows(out))

    assert main(["-q", "predict", "-i", str(src), "-o", str(out), "-m", str(tiny_package), "--statistics",
                 "--device", "cpu", "--ray", "--continue"]) == 0
    missing = sorted(set("ABCD").union(COPIES) - done)
    assert sorted(r["case"] for r in _rows(out)[first_run:]) == missing  # only the missing cases were run
    _assert_equal_to(reference, out)
    for copy, original in COPIES.items():
        np.testing.assert_array_equal(np.asarray(read_nifti(out / f"{copy}.nii.gz").data),
                                      np.asarray(read_nifti(reference / f"{original}.nii.gz").data))
    for name, stamp in stamps.items():
        assert (out / name).stat().st_mtime_ns == stamp, name  # finished cases untouched


@pytest.mark.slow
def test_a_bad_package_is_one_clear_error(cluster, tiny_package, cases, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_package, broken)
    (broken / "manifest.json").write_text("{}")
    assert _ray("-i", cases, "-o", tmp_path / "out", "-m", broken) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.nii.gz"))


# ------------------------------------------------------------------------------------------ without a cluster

def test_plans_from_a_folder_a_list_a_csv_and_series_folders(cases, tmp_path):
    out = tmp_path / "out"
    assert [j.case for j in D.plan_inputs(cases, out)] == list(CASES)
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# scans\n{cases / 'B_0000.nii.gz'}\n\n{cases / 'A_0000.nii.gz'}\n")
    jobs = D.plan_inputs(listing, out)
    assert [(j.case, j.output) for j in jobs] == [("B", out / "B.nii.gz"), ("A", out / "A.nii.gz")]
    shutil.copy(cases / "C_0000.nii.gz", tmp_path / "C_0000.nii.gz")
    table = tmp_path / "cases.csv"
    table.write_text("patient,image\np1,C_0000.nii.gz\np2,%s\n" % (cases / "D_0000.nii.gz"))
    jobs = D.plan_inputs(table, out)
    assert [(j.case, j.source) for j in jobs] == [("C", tmp_path / "C_0000.nii.gz"), ("D", cases / "D_0000.nii.gz")]
    studies = tmp_path / "studies"
    for patient in ("p2", "p1"):
        (studies / patient).mkdir(parents=True)
    assert [(j.case, j.output.name) for j in D.plan_inputs(studies, out)] == [("p1", "p1.nii.gz"),
                                                                             ("p2", "p2.nii.gz")]


@pytest.mark.parametrize("problem", ["missing", "file-output", "twice", "not-a-list", "empty-list", "empty-folder"])
def test_bad_plans_name_the_file(cases, tmp_path, problem):
    out, src = tmp_path / "out", tmp_path / "list.txt"
    if problem == "missing":
        src = tmp_path / "nothing"
    elif problem == "file-output":
        src, out = cases, tmp_path / "x.nii.gz"
    elif problem == "twice":
        src.write_text(f"{cases / 'A_0000.nii.gz'}\n{tmp_path / 'A.nii.gz'}\n")
    elif problem == "not-a-list":
        src = cases / "A_0000.nii.gz"
    elif problem == "empty-list":
        src.write_text("# nothing\n")
    else:
        src = tmp_path / "empty"
        src.mkdir()
    with pytest.raises(InputError) as refused:
        D.plan_inputs(src, out)
    assert str(refused.value).startswith(str(out if problem == "file-output" else src))
    assert not out.exists()


def test_the_temporary_files_of_a_lost_write_are_removed(tmp_path):
    job = CaseJob("A", tmp_path / "A_0000.nii.gz", tmp_path / "A.nii.gz")
    options = CaseOptions(statistics=True)
    (tmp_path / ".B.nii.gz.x1.part").write_bytes(b"another case's")
    for target in (job.output, job.statistics_path):
        child = os.fork()
        if child == 0:  # a writer that dies in the middle of an atomic write, as a killed worker does
            with atomic_open(target) as handle:
                handle.write(b"half")
                handle.flush()
                os._exit(0)
        os.waitpid(child, 0)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".A."))
    assert len(left) == 2 and all(name.endswith(".part") for name in left)
    assert sorted(p.name for p in D._remove_parts(job, options)) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".B.nii.gz.x1.part"]


def test_ray_options_need_ray(tiny_package, cases, tmp_path, capsys):
    args = ["predict", "-i", str(cases), "-o", str(tmp_path / "o"), "-m", str(tiny_package), "--workers", "2"]
    assert main(args) == 2
    assert "--workers: only with --ray" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ DICOM study trees and outputs

def _study_tree(root: Path) -> Path:
    pytest.importorskip("highdicom", reason="highdicom (extra 'dicom') is not installed")
    from dicom_phantom import write_phantom_series

    for patient, series in (("P001", 3), ("P002", 2)):
        write_phantom_series(root / patient / "study" / "ct", columns=64, rows=56, slices=20, patient_id=patient,
                             series_number=series)
    write_phantom_series(root / "P002" / "study" / "scout", columns=64, rows=56, slices=3, patient_id="P002",
                         series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    return root


def test_a_study_tree_is_planned_as_folder_mode_plans_it(tmp_path):
    tree, out = _study_tree(tmp_path / "export"), tmp_path / "out"
    from pocketseg.runtime.predict import plan_cases

    jobs = D.plan_inputs(tree, out)
    assert [(j.case, j.output.name) for j in jobs] == [("P001_20240131_s3", "P001_20240131_s3.nii.gz"),
                                                       ("P002_20240131_s2", "P002_20240131_s2.nii.gz")]
    assert all(j.series is not None and j.source == j.series.folder for j in jobs)  # the localizer is skipped
    assert jobs == plan_cases(tree, out)[0]


def test_ray_refuses_dicom_outputs_without_dicom_input(tiny_package, cases, tmp_path):
    with pytest.raises(InputError, match="needs DICOM input") as refused:
        D.predict_ray(cases, tmp_path / "out", tiny_package, output_type=["dicom-seg"], progress=False)
    assert str(refused.value).startswith(str(cases / "A_0000.nii.gz"))
    with pytest.raises(InputError, match="not for --ray") as refused:
        D.predict_ray(cases, tmp_path / "out", tiny_package, output_type=["dicom-seg"], dicom_reference=tmp_path,
                      progress=False)
    assert str(refused.value).startswith(str(tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_writes_the_dicom_outputs_of_a_study_tree_as_folder_mode(cluster, tiny_package, tmp_path):
    tree = _study_tree(tmp_path / "export")
    types = ("--output-type", "nifti", "--output-type", "dicom-seg", "--output-type", "dicom-rtstruct")
    local = tmp_path / "local"
    assert main(["-q", "predict", "-i", str(tree), "-o", str(local), "-m", str(tiny_package), "--device", "cpu",
                 "--threads", "1", "--no-intensity-check", *types]) == 0
    out = tmp_path / "out"
    assert _ray("-i", tree, "-o", out, "-m", tiny_package, "--no-intensity-check", *types) == 0
    names = sorted(p.name for p in out.iterdir() if p.name != D.RUN_TABLE)
    assert names == sorted(p.name for p in local.iterdir())
    assert names == sorted(f"{case}{end}" for case in ("P001_20240131_s3", "P002_20240131_s2")
                           for end in (".nii.gz", ".seg.dcm", ".rtstruct.dcm"))
    import pydicom

    for case in ("P001_20240131_s3", "P002_20240131_s2"):
        ours, theirs = read_nifti(out / f"{case}.nii.gz"), read_nifti(local / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(ours.data), np.asarray(theirs.data), err_msg=case)
        a, b = pydicom.dcmread(out / f"{case}.seg.dcm"), pydicom.dcmread(local / f"{case}.seg.dcm")
        assert a.Modality == "SEG" and a.PixelData == b.PixelData
        assert [s.SegmentLabel for s in a.SegmentSequence] == [s.SegmentLabel for s in b.SegmentSequence]
        assert pydicom.dcmread(out / f"{case}.rtstruct.dcm").Modality == "RTSTRUCT"
    assert {r["status"] for r in _rows(out)} == {"written"}
    assert not _leftovers(out)


def test_the_clean_up_waits_until_local_workers_have_ended():
    """After Ctrl-C the driver removes the temporary files of the cases its workers held; it first waits until the
    local workers' processes have ended (Ray may call an actor dead a moment before), and not for other machines'."""
    import socket

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.4)"])
    try:
        slots = [D._Slot(actor=None, info={"node": socket.gethostname(), "pid": worker.pid}),
                 D._Slot(actor=None, info={"node": "another-machine", "pid": os.getppid()}),  # alive
                 D._Slot(actor=None, info={})]
        assert D._running(worker.pid)
        start = time.monotonic()
        D._wait_gone(slots, timeout=20)
        waited = time.monotonic() - start
        assert not D._running(worker.pid)  # ended (a zombie until reaped: it writes nothing more)
        assert 0.2 < waited < 10
        start = time.monotonic()
        D._wait_gone(slots, timeout=20)  # nothing left to wait for: the other machine's pid is not looked at
        assert time.monotonic() - start < 0.5
    finally:
        worker.kill()
        worker.wait()
    assert not D._running(worker.pid)


def test_without_proc_the_kernel_is_asked(monkeypatch):
    """Where there is no /proc (macOS), whether a worker still runs comes from kill(pid, 0)."""
    real_isdir = os.path.isdir
    monkeypatch.setattr(D.os.path, "isdir", lambda p: False if str(p).startswith("/proc") else real_isdir(p))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert D._running(os.getpid()) and not D._running(ended.pid)


def test_a_replacement_worker_is_known_by_its_pid_once_it_answers():
    """A replacement's info() is asked for as it starts; its answer is taken as soon as it has come, so that a
    Ctrl-C waits for its process too. A call that failed (the replacement died at once) leaves it unknown."""
    class Refs:
        def __init__(self, answers):
            self.answers = answers

        def wait(self, refs, num_returns=1, timeout=None):
            done = [r for r in refs if r in self.answers]
            return done, [r for r in refs if r not in done]

        def get(self, ref):
            answer = self.answers[ref]
            if isinstance(answer, Exception):
                raise answer
            return answer

    rt = Refs({"a": {"node": "here", "pid": 12}, "dead": RuntimeError("actor died")})
    up, waiting, died = (D._Slot(None, {}, info_ref=ref) for ref in ("a", "later", "dead"))
    D._settle_infos(rt, [up, waiting, died], timeout=0)
    assert up.info == {"node": "here", "pid": 12} and up.info_ref is None
    assert waiting.info == {} and waiting.info_ref == "later"
    assert died.info == {} and died.info_ref is None
