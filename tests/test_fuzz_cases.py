"""Property-based fuzzing of the input edges (pocketseg.benchmarks.fuzz_cases) with a small, derandomised
profile: every generated NIfTI file, DICOM series, manifest and scan ends in a result with the input's
geometry or in a PocketsegError, never in another exception and never with a partial output.

The same properties run longer with ``python -m pocketseg.benchmarks.fuzz --examples 2000``.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="hypothesis (extra 'test') is not installed")

from pocketseg.benchmarks import fuzz, fuzz_cases  # noqa: E402  (needs hypothesis, checked above)

#: Inputs per property in the normal test run: together well under a minute on 2 busy cores.
CI_EXAMPLES = {"nifti": 300, "dicom": 150, "manifest": 400, "predict": 25}


@pytest.fixture(autouse=True)
def _quiet(caplog):
    # The inputs are broken on purpose; nibabel and the readers warn about each one.
    caplog.set_level(logging.ERROR)


def test_nifti_headers_and_arrays_read_with_their_geometry_or_are_refused():
    fuzz_cases.run_property("nifti", CI_EXAMPLES["nifti"])


def test_dicom_tag_sets_read_with_their_geometry_or_are_refused():
    pytest.importorskip("pydicom", reason="pydicom (extra 'dicom') is not installed")
    fuzz_cases.run_property("dicom", CI_EXAMPLES["dicom"])


def test_mutated_manifests_load_soundly_or_are_refused():
    fuzz_cases.run_property("manifest", CI_EXAMPLES["manifest"])


def test_predictions_keep_the_input_geometry_or_leave_no_output(tiny_package, tmp_path):
    package = shutil.copytree(tiny_package, tmp_path / "pkg")
    fuzz_cases.run_property("predict", CI_EXAMPLES["predict"], package=package)


def test_the_properties_catch_what_they_are_meant_to(tmp_path, monkeypatch):
    """A property that cannot fail proves nothing: a reader that lets a foreign exception out, or returns a
    wrong geometry, makes the property fail."""
    case = fuzz_cases.NiftiCase(
        dims=(2, 3, 4), dtype="int16", data=np.arange(24, dtype=np.int16), spacing=(1.0, 2.5, 5.0),
        qform_rotation="oblique", qform_code=1, sform_rotation="lps", sform_code=1, sform_kind="regular",
        offset=(0.0, -100.5, 250.0), bad_spacing=None, bad_quatern=None, slope=2.0, inter=-1024.0,
        big_endian=True, gz=True, truncate=0, dim0=None)
    (tmp_path / "a").mkdir()
    fuzz_cases.check_nifti_case(case, tmp_path / "a")  # sound: passes
    real = fuzz_cases.load_volume

    def shifted(path, **kwargs):
        volume = real(path, **kwargs)
        volume.affine[0, 3] += 1.0
        return volume

    monkeypatch.setattr(fuzz_cases, "load_volume", shifted)
    (tmp_path / "b").mkdir()
    with pytest.raises(AssertionError):
        fuzz_cases.check_nifti_case(case, tmp_path / "b")

    def foreign(path, **kwargs):
        raise ValueError("w2 should be positive")

    monkeypatch.setattr(fuzz_cases, "load_volume", foreign)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError):
        fuzz_cases.check_nifti_case(case, tmp_path / "c")


def test_the_long_run_says_clearly_when_hypothesis_is_missing(monkeypatch, capsys):
    real = fuzz.require

    def without_hypothesis(module, feature, extra):
        real("hypothesis_is_not_installed_here", feature, extra)

    monkeypatch.setattr(fuzz, "require", without_hypothesis)
    assert fuzz.main(["--examples", "5", "--properties", "manifest"]) == 2
    err = capsys.readouterr().err
    assert "The fuzz benchmark needs the optional package" in err and "pocketseg[test]" in err


def test_the_long_run_prints_its_table(capsys):
    assert fuzz.main(["--examples", "5", "--properties", "manifest,predict"]) == 0
    out = capsys.readouterr().out
    assert "| manifest | 5 |" in out and "passed" in out and "| predict | 0 | 0.0 | skipped: needs --model |" in out


def test_the_long_run_leaves_the_logging_levels_as_they_were():
    before = logging.getLogger("pocketseg").level, logging.getLogger("nibabel").level
    fuzz.main(["--examples", "2", "--properties", "manifest"])
    assert (logging.getLogger("pocketseg").level, logging.getLogger("nibabel").level) == before
