"""The GPU check's plumbing, proven on the CPU with its dry run (the real run needs a lent GPU machine), and its kit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pocketseg.benchmarks import gpu_check as G
from pocketseg.benchmarks import gpu_kit as K
from pocketseg.errors import InputError, OutputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    """The dry run through its command line, as `make gpu-check DRY=1` runs it, without the CT examples."""
    pytest.importorskip("torch", reason="torch (extra 'train') builds the tiny nets of the dry run")
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OUT": str(out)}  # the report folder defaults to $OUT
    env.pop(G.CT_EXAMPLES_ENV, None)
    done = subprocess.run([sys.executable, "-m", "pocketseg.benchmarks.gpu_check", "--dry-run", "--ct-examples",
                           str(tmp / "absent"), "--work", str(tmp / "work"), "--root", str(ROOT)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_dry_run_walks_every_step_and_writes_the_report(dry_run):
    assert sorted(p.name for p in dry_run.iterdir()) == sorted(G.REPORT_FILES.values())  # at most 8 come back
    result = json.loads((dry_run / "gpu-report.json").read_text())
    assert result["dry_run"] and result["ok"]
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == list(G.STEP_NAMES)
    assert all(s["status"] == "ok" and s["seconds"] <= s["budget_s"] for s in steps.values()), steps

    assert steps["gpu-tests"]["tests"]["passed"] > 0 and steps["gpu-tests"]["tests"]["failed"] == 0

    cascade = steps["cascade"]["data"]
    assert cascade["ct_examples"] is None and str(Path(cascade["ct_looked_at"][0]).name) == "absent"
    phantoms = [i for i in cascade["inputs"] if i["kind"] == "phantom"]
    assert len(phantoms) == 2
    for item in phantoms:
        (variant,) = item["variants"].values()
        assert variant["required"] and variant["voxel_agreement"] == 1.0 and variant["same_roi_box"]
        assert set(item["cpu"]["timings_s"]) >= {"roi", "detail", "postprocess", "total"}

    bench = steps["bench"]["data"]
    (size,) = bench["sizes"]
    runs = size["result"]["runs"]
    assert {r["mode"] for r in runs} == {"cold", "warm"} and all(r["status"] == "ok" for r in runs)
    assert all(r["memory"]["used_mb"] and r["memory"]["auc_mb_s"] > 0 for r in runs)  # every sample is kept

    md = (dry_run / "gpu-report.md").read_text()
    assert "Dry run on the CPU" in md and "all steps ok" in md
    assert "CT examples not found" in md
    assert "| phantom 64x64x20 (seed 0) | 64×64×20 | NumPy path (dry run) | 100.0000 |" in md
    assert "bench_64x64x20" in md and "![GPU memory over time](gpu-memory.png)" in md
    assert "step cascade: ok" in (dry_run / "gpu-check.log").read_text()


@pytest.mark.slow
def test_a_report_is_published_under_its_date_and_card(dry_run, tmp_path):
    target = G.publish_report(dry_run, tmp_path / "docs")
    result = json.loads((dry_run / "gpu-report.json").read_text())
    assert target.name == f"{result['created'][:10]}-cpu-dry-run.md"
    assert target.with_suffix(".png").is_file()
    assert f"]({target.stem}.png)" in target.read_text()


def test_a_step_that_overruns_is_stopped_and_the_report_still_written(tmp_path):
    result = G.run_gpu_check(tmp_path / "out", dry_run=True, steps="gpu-tests", budgets={"gpu-tests": 0.3},
                             root=ROOT, work=tmp_path / "work")
    (step,) = result["steps"]
    assert step["status"] == "timeout" and step["seconds"] < 15
    assert "overran its budget of 0 s" in step["summary"] and not result["ok"]
    md = (tmp_path / "out" / "gpu-report.md").read_text()
    assert "| gpu-tests | timeout |" in md and "## Overruns and failures" in md
    assert json.loads((tmp_path / "out" / "gpu-report.json").read_text())["steps"][0]["status"] == "timeout"


def test_steps_budgets_and_an_existing_report_are_checked_before_any_work(tmp_path):
    with pytest.raises(InputError, match="unknown steps"):
        G.run_gpu_check(tmp_path, dry_run=True, steps="gpu-tests,warp-drive")
    with pytest.raises(InputError, match="budget of cascade"):
        G.run_gpu_check(tmp_path, dry_run=True, budgets={"cascade": 0})
    (tmp_path / "gpu-report.md").write_text("an earlier report")
    with pytest.raises(OutputError, match="already exists"):
        G.run_gpu_check(tmp_path, dry_run=True, steps="gpu-tests")


def test_the_report_folder_is_the_argument_else_OUT_else_a_local_one(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert G.resolve_out(None) == tmp_path and G.resolve_out("x") == Path("x")
    monkeypatch.delenv("OUT")
    assert G.resolve_out(None) == Path(G.DEFAULT_OUT)


def test_ct_examples_are_looked_for_beside_the_clone_then_in_the_kit(monkeypatch, tmp_path):
    monkeypatch.delenv(G.CT_EXAMPLES_ENV, raising=False)
    root, kit = tmp_path / "clone", tmp_path / "clone" / "gpu-kit"
    carried = kit / "carry" / "ct_examples"
    carried.mkdir(parents=True)
    assert G.find_ct_examples(root=root, kit=kit)[0] == carried
    beside = tmp_path / "shared" / "data" / "ct_examples"
    beside.mkdir(parents=True)
    assert G.find_ct_examples(root=root, kit=kit)[0] == beside
    monkeypatch.setenv(G.CT_EXAMPLES_ENV, str(tmp_path / "nowhere"))  # as the tests: the variable is the only place
    folder, looked = G.find_ct_examples(root=root, kit=kit)
    assert folder is None and looked == [str(tmp_path / "nowhere")]


def test_bench_sizes_are_planned_from_the_smaller_ones():
    assert G.predict_seconds([], 55) is None
    assert G.predict_seconds([(55, 40.0)], 110) == pytest.approx(80.0 * G.PLAN_SAFETY)
    # Two sizes: the line through them (fixed part + per-slice part), never falling.
    assert G.predict_seconds([(55, 40.0), (100, 49.0)], 150) == pytest.approx(59.0 * G.PLAN_SAFETY)
    assert G.predict_seconds([(55, 40.0), (100, 30.0)], 150) == pytest.approx(30.0 * G.PLAN_SAFETY)


def test_junit_results_are_counted_with_failures_and_skip_reasons(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_resample" name="test_a[cupy]"/>
      <testcase classname="tests.test_resample" name="test_b[cupy]"><failure message="assert 1 == 2">tb</failure></testcase>
      <testcase classname="tests.test_metrics" name="test_c[cupy]"><skipped message="CuPy is not usable here"/></testcase>
      <testcase classname="tests.test_metrics" name="test_d[cupy]"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>""")
    tests = G.parse_junit(junit)
    assert (tests["passed"], tests["failed"], tests["skipped"], tests["errors"], tests["total"]) == (1, 1, 1, 1, 4)
    assert tests["failures"][0] == {"test": "tests.test_resample::test_b[cupy]", "message": "assert 1 == 2"}
    assert tests["skips"][0]["reason"] == "CuPy is not usable here"


def test_the_kit_takes_only_wheels_the_gpu_machine_can_install():
    assert K._fits_target(Path("nibabel-5.4.2-py3-none-any.whl"))
    assert K._fits_target(Path("onnx_graphsurgeon-0.6.1-py2.py3-none-any.whl"))
    assert K._fits_target(Path("isal-1.9.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"))
    assert K._fits_target(Path("simpleitk-2.5.7-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"))
    assert not K._fits_target(Path("isal-1.9.1-cp311-cp311-manylinux2014_x86_64.whl"))
    assert not K._fits_target(Path("isal-1.9.1-cp312-cp312-manylinux2014_aarch64.whl"))
    assert K.pinned("nnunetv2==2.8.1") == "nnunetv2==2.8.1"
    assert K.pinned("surely-not-installed-here") == "surely-not-installed-here"


def test_unpack_extracts_the_carried_archives_and_installs_the_tree_beside_them(tmp_path):
    kit = tmp_path / "kit"
    staged = tmp_path / "staged" / "fakelib"
    staged.mkdir(parents=True)
    (staged / "__init__.py").write_text("VALUE = 7\n")
    (kit / "carry").mkdir(parents=True)
    with tarfile.open(kit / "carry" / "base.tar.xz", "w:xz") as tar:
        tar.add(staged, arcname="fakelib")
    (kit / "carry" / "kit.json").write_text(json.dumps({"commit": "abc123"}))
    project = tmp_path / "project"
    (project / "tinypkg").mkdir(parents=True)
    (project / "tinypkg" / "__init__.py").write_text("")
    (project / "setup.py").write_text("from setuptools import setup\nsetup(name='tinypkg', version='1', "
                                      "packages=['tinypkg'])\n")
    record = K.unpack(kit, root=project)
    site = kit / "site"
    assert (site / "fakelib" / "__init__.py").read_text() == "VALUE = 7\n"
    assert (site / "tinypkg" / "__init__.py").is_file() and record["pocketseg"] == "built from the tree"
    assert json.loads((site / "unpack.json").read_text())["kit"]["commit"] == "abc123"
    with pytest.raises(K.KitError, match="no packed archives"):
        K.unpack(tmp_path / "empty-kit", root=project)


def test_ct_images_are_carried_smallest_first_as_many_as_fit(tmp_path):
    source = tmp_path / "ct_examples"
    (source / "dicom_series").mkdir(parents=True)
    (source / "dicom_series" / "1.dcm").write_bytes(b"d" * 300)
    (source / "small_ct.nii.gz").write_bytes(b"s" * 100)
    (source / "large_ct.nii.gz").write_bytes(b"l" * 1000)
    (source / "example_seg.nii.gz").write_bytes(b"g" * 10)  # a segmentation: the check reads none
    (source / "NOTICE.md").write_text("where they come from")
    notes: list[str] = []
    record = K._carry_ct_examples(source, tmp_path / "carry" / "ct_examples", 600, notes)
    assert record["carried"] == ["small_ct.nii.gz", "dicom_series"] and record["left_out"] == ["large_ct.nii.gz"]
    carried = sorted(p.name for p in (tmp_path / "carry" / "ct_examples").iterdir())
    assert carried == ["NOTICE.md", "dicom_series", "small_ct.nii.gz"] and "large_ct.nii.gz" in notes[0]


def test_tf32_is_switched_off_through_the_api_this_torch_has():
    torch = pytest.importorskip("torch", reason="torch (extra 'train') runs the nets")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip("a torch older than 2.9 has the allow_tf32 flags only")
    before = conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    try:
        assert G._disable_tf32() == {"cudnn_conv_fp32_precision": "ieee", "matmul_fp32_precision": "ieee"}
        assert (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("ieee", "ieee")
    finally:
        conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
