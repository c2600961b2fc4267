"""The `pocketseg` command line: subcommands, JSON output, one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pocketseg.cli import build_parser, main
from pocketseg.nifti import read_nifti, write_nifti


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketseg", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0
    assert "synth" in res.stdout and "info" in res.stdout


def test_flags_map_to_function_keywords():
    import inspect

    from pocketseg.synth.dataset import synthesize_dataset
    from pocketseg.imageio import volume_info

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, func in (("synth", synthesize_dataset), ("info", volume_info)):
        dests = {a.dest for a in sub.choices[name]._actions} - {"help", "json", "verbose", "quiet"}  # global flags
        params = set(inspect.signature(func).parameters)
        assert dests <= params, f"{name}: flags without a keyword: {dests - params}"


def test_info_json(tmp_path, capsys):
    path = tmp_path / "ct.nii.gz"
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 100
    write_nifti(data, path, affine=np.diag([-0.8, -0.8, 2.5, 1.0]))
    assert main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [4, 5, 6]
    assert info["spacing_mm"] == pytest.approx([0.8, 0.8, 2.5])
    assert info["orientation"] == "LPS"
    assert info["dtype"] == "int16" and info["min"] == -100 and info["max"] == 19
    assert main(["info", str(path)]) == 0
    assert "LPS" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, b"this is not a nifti file\n"])
def test_bad_input_is_one_line_error_without_traceback(tmp_path, content):
    path = tmp_path / "broken.nii.gz"
    if content is not None:
        path.write_bytes(content)
    res = run_cli("info", str(path))
    assert res.returncode == 2
    assert res.stderr.startswith("pocketseg: error: ") and str(path) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_synth_refuses_non_empty_output_and_keeps_it(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    res = run_cli("synth", str(tmp_path), "--small", "--full", "1")
    assert res.returncode == 2 and "non-empty" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_synth_cli_writes_a_data_set(tmp_path):
    out = tmp_path / "ds"
    res = run_cli("-q", "synth", str(out), "--small", "--full", "1", "--unlabeled", "1", "--slices", "24", "--seed", "2")
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and meta["pocketseg"]["seed"] == 2
    unlabeled = read_nifti(out / "imagesUnlabeled" / "FLARESyn_0002_0000.nii.gz")
    assert unlabeled.shape == (128, 128, 24) and unlabeled.data.dtype == np.int16
    assert not (out / "labelsTr" / "FLARESyn_0002.nii.gz").exists()  # unlabelled: an image only


def test_model_info_json_lists_presets_with_params(capsys):
    assert main(["model-info", "--json", "--no-flops"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert {"roi", "detail", "roi-unet", "detail-unet", "roi-cpu", "detail-cpu", "roi-tiny", "detail-tiny"} <= set(by_name)
    assert abs(by_name["roi"]["params"] / 5.76e6 - 1) < 0.02 and abs(by_name["detail"]["params"] / 7.97e6 - 1) < 0.02


def test_train_cli_reports_bad_dataset_in_one_line(tmp_path):
    res = run_cli("train", str(tmp_path / "missing"), "--stage", "roi", "--preset", "roi-tiny", "--epochs", "1",
                  "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_output_cut_short_by_a_closed_pipe_ends_quietly(tmp_path):
    """`pocketseg info FILE | head`: the reader is gone before pocketseg writes; no traceback."""
    image = tmp_path / "ct.nii.gz"
    write_nifti(np.full((4, 6, 8), -1000, np.int16), image, affine=np.eye(4))
    proc = subprocess.Popen([sys.executable, "-m", "pocketseg", "info", str(image)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the interpreter has even started
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_an_unreadable_model_file_is_one_line_in_predict_and_reported_by_doctor(tiny_package, tmp_path,
                                                                               monkeypatch, capsys):
    from pocketseg import manifest as manifest_module
    from pocketseg.deploy.doctor import diagnose

    real = manifest_module.sha256_file

    def unreadable(path, *args, **kwargs):  # as chmod 000 does for anyone but root
        if path.suffix == ".onnx":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "sha256_file", unreadable)
    image = tmp_path / "ct.nii.gz"
    write_nifti(np.full((8, 16, 16), -1000, np.int16), image, affine=np.eye(4))
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", str(image), "-o", str(out), "-m", str(tiny_package)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be read (Permission denied)" in err[0] and ".onnx" in err[0]
    assert not out.exists()
    report = diagnose(tiny_package)
    assert not report["package"]["checksums_ok"]
    assert "cannot be read (Permission denied)" in report["package"]["checksum_problem"]


def test_an_operating_system_error_is_one_line_with_the_file(monkeypatch, capsys):
    from pocketseg import cli

    def full_disk(args):
        raise OSError(28, "No space left on device", "/data/out/case.nii.gz")

    monkeypatch.setitem(cli.HANDLERS, "info", full_disk)
    assert main(["info", "whatever.nii.gz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pocketseg: error: /data/out/case.nii.gz: No space left on device"]


@pytest.mark.parametrize("flag, value", [("--threads", "0"), ("--threads", "-1"), ("--batch-size", "0"),
                                         ("--threads", "two")])
def test_counts_below_one_are_refused_by_the_parser(flag, value):
    res = run_cli("predict", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "-m", "model", flag, value)
    assert res.returncode == 2
    assert f"argument {flag}" in res.stderr
    assert "must be at least 1" in res.stderr or "expected a whole number" in res.stderr


@pytest.mark.parametrize("argv", [["-q", "info", "x.nii.gz"], ["info", "x.nii.gz", "-q"], ["info", "-q", "x.nii.gz"]])
def test_quiet_works_before_and_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False


def test_global_flags_default_to_off_with_a_command():
    args = build_parser().parse_args(["info", "x.nii.gz"])
    assert args.quiet is False and args.verbose is False
