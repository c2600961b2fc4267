"""``pocketseg evaluate`` (pocketseg.evaluation.evaluate and the CLI subcommand).

* Outputs: per_case.csv columns and rows, summary.json keys and means,
  table.md rows; refusing to overwrite unless asked; ``workers`` > 1 gives the same result.
* Geometry: spacing from the ground truth, the axial axis found from the affine
  (here the first voxel axis), so aorta overshoot past the GT slices is free.
* Bad input, each an InputError naming the file or folder: missing folders,
  a GT case without prediction (listed), shape or grid mismatch, labels > 14,
  non-integer labels; a prediction without GT is only a warning.
* The CLI end to end: exit 0 with the outputs, exit 2 with one line on bad input.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pocketseg import cli
from pocketseg.evaluation.evaluate import evaluate_folders, superior_axis
from pocketseg.evaluation.metrics import COLUMNS
from pocketseg.errors import InputError, OutputError

SHAPE = (12, 10, 8)
# Voxel axis 0 runs superior (world z), axis 1 anterior, axis 2 to the left: the superior axis is not the 3rd.
AFFINE = np.array([[0.0, 0.0, -0.8, 40.0], [0.0, 0.9, 0.0, -20.0], [2.5, 0.0, 0.0, -100.0], [0, 0, 0, 1]])


def write(path: Path, labels: np.ndarray, affine: np.ndarray = AFFINE, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(labels, dtype=dtype), affine), path)
    return path


def phantom() -> np.ndarray:
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:9, 1:5, 1:4] = 1  # liver
    gt[3:8, 6:9, 5:7] = 5  # aorta on slices 3..7 of axis 0
    gt[1:4, 6:9, 1:3] = 3  # spleen
    return gt


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """case_a: perfect; case_b: spleen missing, aorta running past the GT slices, liver shifted by three slices (7.5 mm)."""
    gt_a, gt_b = phantom(), phantom()
    pred_b = gt_b.copy()
    pred_b[pred_b == 3] = 0
    pred_b[0:12, 6:9, 5:7] = 5
    pred_b[pred_b == 1] = 0
    pred_b[5:12, 1:5, 1:4] = 1
    write(tmp_path / "gt" / "case_a.nii.gz", gt_a)
    write(tmp_path / "gt" / "case_b.nii.gz", gt_b)
    write(tmp_path / "pred" / "case_a.nii.gz", gt_a)
    write(tmp_path / "pred" / "case_b.nii.gz", pred_b)
    return tmp_path / "pred", tmp_path / "gt"


def test_superior_axis():
    assert superior_axis(AFFINE) == 0
    assert superior_axis(np.diag([-0.8, -0.8, 2.5, 1.0])) == 2
    rot = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    rot[1:3, 1:3] = [[c, -s], [s, c]]  # tilted 17 degrees about x: j still runs closest to y
    assert superior_axis(rot @ np.diag([1.0, 1.0, 3.0, 1.0])) == 2


def test_outputs(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "out"
    summary = evaluate_folders(pred, gt, out, progress=False)

    with open(out / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", *COLUMNS]
    assert list(rows[0])[1:4] == ["Liver_DSC", "Right_kidney_DSC", "Spleen_DSC"]
    assert [r["case"] for r in rows] == ["case_a", "case_b"]
    a, b = ({k: float(v) for k, v in r.items() if k != "case"} for r in rows)
    assert all(v == 1.0 for v in a.values())
    assert b["Spleen_DSC"] == b["Spleen_NSD"] == 0.0
    assert b["Aorta_DSC"] == b["Aorta_NSD"] == 1.0  # overshoot along the superior axis (voxel axis 0) is free
    assert b["Liver_DSC"] == pytest.approx(2 * 4 / 14, abs=1e-6)
    assert 0 < b["Liver_NSD"] < 1
    assert b["Tumor_DSC"] == b["Tumor_NSD"] == 1.0

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["num_cases"] == 2
    assert {"mean", "std", "organ_mean_DSC", "organ_mean_NSD", "tumor_DSC", "tumor_NSD", "tolerance_mm"} <= set(summary)
    assert set(summary["mean"]) == set(COLUMNS)
    assert summary["mean"]["Spleen_DSC"] == pytest.approx(0.5)
    assert summary["std"]["Spleen_DSC"] == pytest.approx(0.5)
    organ_dsc = [(a[c] + b[c]) / 2 for c in COLUMNS[:13]]
    assert summary["organ_mean_DSC"] == pytest.approx(np.mean(organ_dsc), abs=1e-6)
    assert summary["organ_mean_NSD"] == pytest.approx(np.mean([(a[c] + b[c]) / 2 for c in COLUMNS[14:27]]), abs=1e-6)
    assert summary["tumor_DSC"] == 1.0 and summary["tolerance_mm"]["Duodenum"] == 7.0

    table = (out / "table.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Target")]
    assert [line.split(" | ")[0][2:] for line in body] == [
        "Liver", "Right kidney", "Spleen", "Pancreas", "Aorta", "Inferior vena cava", "Right adrenal gland",
        "Left adrenal gland", "Gallbladder", "Esophagus", "Stomach", "Duodenum", "Left kidney", "Tumor", "Organ mean"]
    assert "| Target | DSC (%) | NSD (%) |" in table
    assert "| Spleen | 50.00 ± 50.00 | 50.00 ± 50.00 |" in table
    assert f"| Organ mean | {100 * summary['organ_mean_DSC']:.2f} ± " in table


def test_refuses_to_overwrite(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "out"
    evaluate_folders(pred, gt, out, progress=False)
    before = (out / "per_case.csv").read_bytes()
    with pytest.raises(OutputError, match="per_case.csv"):
        evaluate_folders(pred, gt, out, progress=False)
    evaluate_folders(pred, gt, out, overwrite=True, progress=False)
    assert (out / "per_case.csv").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_workers_give_the_same_result(folders, tmp_path):
    pred, gt = folders
    one = evaluate_folders(pred, gt, tmp_path / "one", progress=False)
    two = evaluate_folders(pred, gt, tmp_path / "two", workers=2, progress=False)
    assert one == two
    assert (tmp_path / "one" / "per_case.csv").read_bytes() == (tmp_path / "two" / "per_case.csv").read_bytes()


def test_spacing_comes_from_the_ground_truth(folders, tmp_path):
    """The same voxels with a finer GT spacing: the liver's three-slice shift is then within tolerance."""
    pred, gt = folders
    coarse = evaluate_folders(pred, gt, tmp_path / "coarse", progress=False)
    fine_affine = AFFINE.copy()
    fine_affine[:3, :3] *= 0.1
    for folder in (pred, gt):
        for path in folder.iterdir():
            write(path, np.asarray(nib.load(path).dataobj), fine_affine)
    fine = evaluate_folders(pred, gt, tmp_path / "fine", progress=False)
    assert coarse["mean"]["Liver_NSD"] < 0.99
    assert fine["mean"]["Liver_NSD"] == 1.0
    assert fine["mean"]["Liver_DSC"] == coarse["mean"]["Liver_DSC"]


def test_missing_prediction_lists_the_cases(folders, tmp_path):
    pred, gt = folders
    write(gt / "case_c.nii.gz", phantom())
    write(gt / "case_d.nii.gz", phantom())
    with pytest.raises(InputError, match="2 ground-truth case") as info:
        evaluate_folders(pred, gt, tmp_path / "out", progress=False)
    assert info.value.path == str(pred)
    assert "case_c, case_d" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_prediction_without_ground_truth_is_a_warning(folders, tmp_path, caplog):
    pred, gt = folders
    write(pred / "case_z.nii.gz", phantom())
    with caplog.at_level(logging.WARNING, logger="pocketseg.evaluation.evaluate"):
        summary = evaluate_folders(pred, gt, tmp_path / "out", progress=False)
    assert summary["num_cases"] == 2
    assert "case_z" in caplog.text


@pytest.mark.parametrize("problem", ["shape", "affine", "label_15", "float_labels", "negative"])
def test_bad_prediction_names_the_file(folders, tmp_path, problem):
    pred, gt = folders
    bad = pred / "case_b.nii.gz"
    labels = phantom()
    if problem == "shape":
        write(bad, labels[:, :, :-1])
    elif problem == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] += 0.01
        write(bad, labels, shifted)
    elif problem == "label_15":
        labels[0, 0, 0] = 15
        write(bad, labels)
    elif problem == "float_labels":
        write(bad, labels + 0.5 * (labels == 1), dtype=np.float32)
    else:
        write(bad, labels.astype(np.int16) - 1, dtype=np.int16)
    match = {"shape": "shape", "affine": "differs", "label_15": "label value 15",
             "float_labels": "non-integer", "negative": "negative"}[problem]
    with pytest.raises(InputError, match=match) as info:
        evaluate_folders(pred, gt, tmp_path / "out", progress=False)
    assert info.value.path == str(bad)
    assert not (tmp_path / "out").exists()


def test_tiny_grid_difference_is_accepted(folders, tmp_path):
    pred, gt = folders
    nudged = AFFINE.copy()
    nudged[0, 3] += 2e-4  # float32 round-off scale, below 1e-3 mm
    write(pred / "case_a.nii.gz", phantom(), nudged)
    assert evaluate_folders(pred, gt, tmp_path / "out", progress=False)["num_cases"] == 2


def test_ground_truth_labels_are_checked_too(folders, tmp_path):
    pred, gt = folders
    labels = phantom()
    labels[1, 1, 1] = 20
    write(gt / "case_a.nii.gz", labels)
    with pytest.raises(InputError, match="label value 20") as info:
        evaluate_folders(pred, gt, tmp_path / "out", workers=2, progress=False)  # also from a worker process
    assert info.value.path == str(gt / "case_a.nii.gz")


def test_missing_folders(folders, tmp_path):
    pred, gt = folders
    with pytest.raises(InputError, match="does not exist") as info:
        evaluate_folders(tmp_path / "nope", gt, tmp_path / "out", progress=False)
    assert info.value.path == str(tmp_path / "nope")
    with pytest.raises(InputError, match="no ground-truth"):
        evaluate_folders(pred, tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="workers"):
        evaluate_folders(pred, gt, tmp_path / "out", workers=0, progress=False)


def test_cli_end_to_end(folders, tmp_path, capsys):
    pred, gt = folders
    out = tmp_path / "cli"
    assert cli.main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| Organ mean |" in printed
    assert {p.name for p in out.iterdir()} == {"per_case.csv", "summary.json", "table.md"}
    assert cli.main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(out), "--overwrite"]) == 0
    capsys.readouterr()

    (pred / "case_b.nii.gz").unlink()
    assert cli.main(["-q", "evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"pocketseg: error: {pred}: no prediction for 1 ground-truth case(s): case_b")


def test_cli_flags_map_to_keywords():
    import inspect

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    dests = {a.dest for a in sub.choices["evaluate"]._actions} - {"help", "verbose", "quiet"}
    assert dests == set(inspect.signature(evaluate_folders).parameters) - {"progress"}


# ------------------------------------------------------------------------------------------- other label sets

def test_a_packages_label_set_is_scored_with_flare_rules_for_flare_names(tmp_path, capsys):
    """Labels {liver 1, aorta 2, colon 3}: liver and aorta keep FLARE's tolerance and slice rule, colon gets --tolerance-mm."""
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:9, 1:5, 1:4] = 1
    gt[3:8, 6:9, 5:7] = 2  # aorta on slices 3..7 of axis 0 (the superior axis)
    gt[9:12, 1:4, 5:8] = 3
    pred = gt.copy()
    pred[0:12, 6:9, 5:7] = 2  # aorta past the GT slices: free under FLARE's rule
    pred[pred == 3] = 0
    pred[9:12, 1:4, 6:8] = 3  # colon one voxel (0.8 mm) narrower
    write(tmp_path / "gt" / "c.nii.gz", gt)
    write(tmp_path / "pred" / "c.nii.gz", pred)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "aorta": 2, "colon": 3}}))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", labels=dataset,
                               tolerance_mm=0.5, progress=False)
    assert set(summary["mean"]) == {f"{c}_{m}" for m in ("DSC", "NSD") for c in ("Liver", "Aorta", "colon")}
    assert summary["tolerance_mm"] == {"Liver": 5.0, "Aorta": 2.0, "colon": 0.5}
    assert summary["mean"]["Liver_DSC"] == 1.0 and summary["mean"]["Aorta_DSC"] == 1.0
    assert summary["mean"]["colon_DSC"] == pytest.approx(2 * 18 / (27 + 18))
    assert summary["mean"]["colon_NSD"] < 1.0 and "tumor_DSC" not in summary
    assert summary["organ_mean_DSC"] == pytest.approx((2 + 2 * 18 / 45) / 3)
    rows = list(csv.reader((tmp_path / "out" / "per_case.csv").open()))
    assert rows[0] == ["case", "Liver_DSC", "Aorta_DSC", "colon_DSC", "Liver_NSD", "Aorta_NSD", "colon_NSD"]
    assert "| colon |" in (tmp_path / "out" / "table.md").read_text()

    wider = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out2", labels=dataset,
                             tolerance_mm=1.0, progress=False)
    assert wider["mean"]["colon_NSD"] == 1.0  # the 0.8 mm shortfall is within 1 mm

    write(tmp_path / "pred" / "c.nii.gz", np.where(pred == 3, 4, pred))  # a value outside the label set
    code = cli.main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                     "-o", str(tmp_path / "out3"), "--labels", str(dataset)])
    err = capsys.readouterr().err
    assert code == 2 and "c.nii.gz" in err and "at most 3" in err
    assert not (tmp_path / "out3").exists()
