"""`synthesize_dataset`: nnU-Net v2 raw layout, subsets, partial-label records, previews, atomicity."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pocketseg import labels as L
from pocketseg.errors import InputError, OutputError
from pocketseg.synth import dataset as D
from pocketseg.synth.phantom import make_phantom


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "set"
    D.synthesize_dataset(out, full=1, partial=2, unlabeled=1, seed=3, small=True, slices=40, preview=True, progress=False)
    return out


def test_layout_and_dataset_json(small_set):
    meta = json.loads((small_set / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {lab.name: lab.id for lab in L.LABELS}
    assert meta["labels"]["liver"] == 1 and meta["labels"]["left_kidney"] == 13 and meta["labels"]["tumor"] == 14
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    rec = meta["pocketseg"]
    assert rec["subsets"] == {"full": ["FLARESyn_0001"], "partial": ["FLARESyn_0002", "FLARESyn_0003"],
                              "unlabeled": ["FLARESyn_0004"]}
    images = sorted(p.name for p in (small_set / "imagesTr").iterdir())
    labels = sorted(p.name for p in (small_set / "labelsTr").iterdir())
    assert images == [f"FLARESyn_000{i}_0000.nii.gz" for i in (1, 2, 3)]
    assert labels == [f"FLARESyn_000{i}.nii.gz" for i in (1, 2, 3)]  # nnU-Net: a label for every training image
    assert [p.name for p in (small_set / "imagesUnlabeled").iterdir()] == ["FLARESyn_0004_0000.nii.gz"]
    previews = sorted(p.name for p in (small_set / "previews").iterdir())
    assert previews == [f"FLARESyn_000{i}.png" for i in (1, 2, 3, 4)]
    for png in (small_set / "previews").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(small_set.parent.glob(".*.part"))


def test_files_are_int16_ct_and_uint8_labels_on_one_grid(small_set):
    img = nib.load(small_set / "imagesTr" / "FLARESyn_0001_0000.nii.gz")
    lab = nib.load(small_set / "labelsTr" / "FLARESyn_0001.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert img.shape == lab.shape and img.shape[2] == 40
    np.testing.assert_array_equal(img.affine, lab.affine)
    full = np.asanyarray(lab.dataobj)
    assert set(np.unique(full)) >= set(range(0, 14))  # all 13 organs in a fully labelled case


def test_partial_cases_keep_exactly_the_annotated_classes(small_set):
    rec = json.loads((small_set / "dataset.json").read_text())["pocketseg"]
    assert set(rec["annotated_classes"]) == {"FLARESyn_0002", "FLARESyn_0003"}
    for index, name in ((1, "FLARESyn_0002"), (2, "FLARESyn_0003")):
        annotated = rec["annotated_classes"][name]
        assert annotated == D.annotated_classes(3, index) and 0 < len(annotated) < 14
        truth = make_phantom(D.case_seed(3, index), small=True, slices=40).labels
        stored = np.asanyarray(nib.load(small_set / "labelsTr" / f"{name}.nii.gz").dataobj)
        expected = np.where(np.isin(truth, annotated), truth, 0)
        np.testing.assert_array_equal(stored, expected)
        assert set(np.unique(stored)) - {0} <= set(annotated)


def test_case_content_depends_only_on_seed_and_index(tmp_path, small_set):
    D.synthesize_dataset(tmp_path / "one", full=1, seed=3, small=True, slices=40, progress=False)
    a = nib.load(tmp_path / "one" / "imagesTr" / "FLARESyn_0001_0000.nii.gz")
    b = nib.load(small_set / "imagesTr" / "FLARESyn_0001_0000.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    D.synthesize_dataset(tmp_path / "other", full=1, seed=4, small=True, slices=40, progress=False)
    c = nib.load(tmp_path / "other" / "imagesTr" / "FLARESyn_0001_0000.nii.gz")
    assert c.shape != a.shape or not np.array_equal(np.asanyarray(c.dataobj), np.asanyarray(a.dataobj))


def test_parallel_workers_give_identical_data(tmp_path):
    D.synthesize_dataset(tmp_path / "a", full=1, partial=1, seed=8, small=True, slices=24, progress=False)
    D.synthesize_dataset(tmp_path / "b", full=1, partial=1, seed=8, small=True, slices=24, workers=2, progress=False)
    meta_a = json.loads((tmp_path / "a" / "dataset.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert meta_a == meta_b
    for rel in ("imagesTr/FLARESyn_0002_0000.nii.gz", "labelsTr/FLARESyn_0002.nii.gz"):
        np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "a" / rel).dataobj),
                                      np.asanyarray(nib.load(tmp_path / "b" / rel).dataobj))


def test_refuses_non_empty_folder_and_bad_counts(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="non-empty"):
        D.synthesize_dataset(out, full=1, small=True, slices=20, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(InputError, match="all 0"):
        D.synthesize_dataset(tmp_path / "x", full=0, progress=False)
    with pytest.raises(InputError, match="non-negative"):
        D.synthesize_dataset(tmp_path / "x", full=-1, progress=False)
    assert not (tmp_path / "x").exists()


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    real = D.make_phantom
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "make_phantom", flaky)
    with pytest.raises(RuntimeError):
        D.synthesize_dataset(tmp_path / "set", full=3, small=True, slices=20, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_after_success(tmp_path):
    out = tmp_path / "set"
    D.synthesize_dataset(out, full=1, seed=1, small=True, slices=20, progress=False)
    D.synthesize_dataset(out, full=2, seed=1, small=True, slices=20, overwrite=True, progress=False)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
