"""Ed25519 package signatures: keys, signing, trusted keys in predict and doctor (pocketseg.signing)."""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import pytest

from pocketseg.cli import main
from pocketseg.deploy.doctor import diagnose, format_report
from pocketseg.errors import InputError, OutputError
from pocketseg.manifest import MANIFEST_NAME, content_digest, load_package, sha256_file
from pocketseg.nifti import write_nifti
from pocketseg.signing import (SIGNATURE_NAME, TRUSTED_KEYS_ENV, check_trusted, generate_keys, sign_package,
                               signature_status)
from pocketseg.synth.phantom import make_phantom

pytest.importorskip("cryptography", reason="cryptography (extra 'sign') is not installed")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs: ``ours`` (its public key in the ``trusted`` folder) and ``theirs`` (not trusted)."""
    root = tmp_path_factory.mktemp("keys")
    ours_key, ours_pub = generate_keys(root / "ours")
    theirs_key, _ = generate_keys(root / "theirs")
    trusted = root / "trusted"
    trusted.mkdir()
    shutil.copy(ours_pub, trusted / "ours.pub")
    return {"ours": ours_key, "theirs": theirs_key, "trusted": trusted}


@pytest.fixture
def package(tiny_package, tmp_path) -> Path:
    """A copy of the tiny package, unsigned."""
    return Path(shutil.copytree(tiny_package, tmp_path / "pkg"))


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    ph = make_phantom(0, small=True, slices=16)
    path = tmp_path_factory.mktemp("scan") / "ct.nii.gz"
    write_nifti(ph.image, path, affine=ph.affine)
    return path


def _rewrite_manifest(folder: Path, edit) -> None:
    """Edit manifest.json as a careful attacker would: the value, then a matching content_sha256."""
    data = json.loads((folder / MANIFEST_NAME).read_text())
    edit(data)
    data["content_sha256"] = content_digest(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2))


def _predict(scan: Path, out: Path, package: Path, *extra) -> int:
    return main(["-q", "predict", "-i", str(scan), "-o", str(out), "-m", str(package), *map(str, extra)])


# ------------------------------------------------------------------------------------------------------------ keys

def test_keygen_writes_an_owner_only_private_key_and_never_replaces_a_key(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k"), "--name", "site"]) == 0
    private, public = tmp_path / "k" / "site.key", tmp_path / "k" / "site.pub"
    assert capsys.readouterr().out.split() == [str(private), str(public)]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes(), public.read_bytes()
    assert main(["keygen", str(tmp_path / "k"), "--name", "site"]) == 2
    assert "site.key: already exists; a key is never replaced" in capsys.readouterr().err
    public.unlink()  # the public half alone missing: the private key is still not replaced
    with pytest.raises(OutputError, match="site.key: already exists"):
        generate_keys(tmp_path / "k", name="site")
    assert private.read_bytes() == before[0]
    with pytest.raises(InputError, match="plain file name"):
        generate_keys(tmp_path / "k", name="../escape")


def test_a_file_that_is_not_an_ed25519_key_is_refused(package, tmp_path, keys):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(InputError, match="bad.key: is not an unencrypted PEM private key"):
        sign_package(package, bad)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "broken.pub").write_text("garbage")
    sign_package(package, keys["ours"])
    with pytest.raises(InputError, match="broken.pub: is not a PEM public key"):
        check_trusted(package, trusted)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no public key"):
        check_trusted(package, tmp_path / "empty")
    with pytest.raises(InputError, match="trusted keys folder does not exist"):
        check_trusted(package, tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------- signing

def test_a_signed_package_is_accepted_and_predicts(package, keys, scan, tmp_path, capsys):
    assert main(["sign", str(package), "--key", str(keys["ours"])]) == 0
    record = json.loads((package / SIGNATURE_NAME).read_text())
    assert record["algorithm"] == "Ed25519"
    assert record["content_sha256"] == content_digest(json.loads((package / MANIFEST_NAME).read_text()))
    status = check_trusted(package, keys["trusted"])
    assert status.state == "trusted" and status.key_id == record["key_id"]
    assert _predict(scan, tmp_path / "out.nii.gz", package, "--trusted-keys", keys["trusted"]) == 0
    assert (tmp_path / "out.nii.gz").is_file()
    # signing again needs --overwrite; the signature is then replaced by the new key's
    assert main(["sign", str(package), "--key", str(keys["theirs"])]) == 2
    assert "signature.json: already exists" in capsys.readouterr().err
    assert main(["sign", str(package), "--key", str(keys["theirs"]), "--overwrite"]) == 0
    assert signature_status(package).key_id != record["key_id"]


def test_an_unsigned_package_is_refused_with_trusted_keys_and_runs_without(package, keys, scan, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    assert _predict(scan, out, package, "--trusted-keys", keys["trusted"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pocketseg: error: {package}: model package refused: not signed (no signature.json) "
                   f"(trusted keys: {keys['trusted']})")
    assert not out.exists()
    assert _predict(scan, out, package) == 0  # no trusted keys: behaviour unchanged


def test_a_signature_by_an_untrusted_key_is_refused(package, keys, scan, tmp_path, capsys):
    sign_package(package, keys["theirs"])
    assert _predict(scan, tmp_path / "out.nii.gz", package, "--trusted-keys", keys["trusted"]) == 2
    assert "which is not among the trusted keys" in capsys.readouterr().err
    assert not (tmp_path / "out.nii.gz").exists()
    assert signature_status(package).state == "valid"  # a sound signature, only not by a trusted key


def test_an_edited_manifest_is_refused_after_signing(package, keys):
    sign_package(package, keys["ours"])
    manifest = (package / MANIFEST_NAME).read_text()
    _rewrite_manifest(package, lambda d: d["stages"]["detail"]["intensity"].update(mean=500.0))
    load_package(package)  # the content digest was rewritten to match, so only the signature can tell
    with pytest.raises(InputError, match="changed after it was signed"):
        check_trusted(package, keys["trusted"])
    (package / MANIFEST_NAME).write_text(manifest.replace('"mean": 80.0', '"mean": 500.0'))  # digest left stale
    with pytest.raises(InputError, match="does not match its content_sha256"):
        load_package(package)


def test_an_edited_file_is_refused_after_signing(package, keys):
    sign_package(package, keys["ours"])
    with open(package / "detail.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(InputError, match="detail.onnx does not match its SHA-256"):
        load_package(package)
    # the checksum updated to the edited file: the manifest's digest changes, and the signature no longer fits
    _rewrite_manifest(package, lambda d: d["checksums"].update({"detail.onnx": sha256_file(package / "detail.onnx")}))
    load_package(package)
    with pytest.raises(InputError, match=f"{package}: model package refused: .*changed after it was signed"):
        check_trusted(package, keys["trusted"])


def test_a_forged_or_mismatched_signature_is_refused(package, keys):
    sign_package(package, keys["ours"])
    path = package / SIGNATURE_NAME
    record = json.loads(path.read_text())
    forged = bytearray(base64.b64decode(record["signature"]))
    forged[0] ^= 1
    path.write_text(json.dumps({**record, "signature": base64.b64encode(bytes(forged)).decode()}))
    assert signature_status(package).reason == "the signature does not verify (forged or corrupt)"
    with pytest.raises(InputError, match="does not verify"):
        check_trusted(package, keys["trusted"])
    # a trusted key id pasted over another key's signature
    theirs = package.parent / "theirs"
    shutil.copytree(package, theirs)
    sign_package(theirs, keys["theirs"], overwrite=True)
    other = json.loads((theirs / SIGNATURE_NAME).read_text())
    path.write_text(json.dumps({**other, "key_id": record["key_id"]}))
    with pytest.raises(InputError, match="key id does not match its public key"):
        check_trusted(package, keys["trusted"])
    path.write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        check_trusted(package, keys["trusted"])


def test_only_a_sound_package_is_signed(package, keys):
    with open(package / "roi.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(InputError, match="roi.onnx does not match"):
        sign_package(package, keys["ours"])
    assert not (package / SIGNATURE_NAME).exists()


def test_the_environment_variable_names_the_trusted_keys(package, keys, scan, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["trusted"]))
    assert _predict(scan, tmp_path / "out.nii.gz", package) == 2
    assert "not signed" in capsys.readouterr().err
    sign_package(package, keys["ours"])
    assert check_trusted(package).state == "trusted"
    monkeypatch.setenv(TRUSTED_KEYS_ENV, "")  # empty: not set
    assert check_trusted(package) is None


def test_export_signs_the_package_it_writes(tmp_path, keys):
    pytest.importorskip("torch", reason="torch (extra 'train') is needed to export")
    from conftest import make_run

    from pocketseg.trainer.package import export_package

    roi = make_run(tmp_path / "roi", "roi", "roi-tiny")
    detail = make_run(tmp_path / "detail", "detail", "detail-tiny", seed=1)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(InputError, match="is not an unencrypted PEM private key"):  # before any export work
        export_package(roi, detail, tmp_path / "never", fp16=False, check=False, sign_key=bad)
    assert not (tmp_path / "never").exists()
    out = export_package(roi, detail, tmp_path / "model", fp16=False, check=False, sign_key=keys["ours"])
    assert check_trusted(out, keys["trusted"]).state == "trusted"


# ---------------------------------------------------------------------------------------------------------- doctor

def test_doctor_reports_the_signature_and_never_raises(package, keys, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    report = diagnose(package)
    assert report["package"]["signature"]["state"] == "unsigned"
    assert not any("signature" in p for p in report["problems"])
    report = diagnose(package, trusted_keys=keys["trusted"])
    assert report["package"]["signature"]["state"] == "unsigned"
    assert any(p.startswith("model package refused by predict: not signed") for p in report["problems"])
    sign_package(package, keys["ours"])
    report = diagnose(package, trusted_keys=keys["trusted"])
    signature = report["package"]["signature"]
    assert signature["state"] == "trusted" and not any("signature" in p or "refused" in p for p in report["problems"])
    assert f"signature   TRUSTED: signed by key {signature['key_id']}, a trusted key" in format_report(report)
    _rewrite_manifest(package, lambda d: d.update(roi_margin_mm=30.0))
    report = diagnose(package)  # no trusted keys: an invalid signature is still a problem worth saying
    assert report["package"]["signature"]["state"] == "invalid"
    assert any("changed after it was signed" in p for p in report["problems"])
    report = diagnose(package, trusted_keys=tmp_path / "nowhere")  # a broken trust store: reported, not raised
    assert report["package"]["signature"]["state"] == "unknown"
    assert any("trusted keys folder does not exist" in p for p in report["problems"])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keys["trusted"]))
    assert main(["doctor", "-m", str(package), "--json"]) == 0


def test_the_signature_flags_are_keywords_of_the_functions_they_call():
    import inspect

    pytest.importorskip("torch", reason="torch (extra 'train') is needed by the exporters")
    from pocketseg.cli import _RAY_ONLY
    from pocketseg.commands import build_parser
    from pocketseg.engine_build.nnunet_import import import_nnunet
    from pocketseg.runtime.predict import predict
    from pocketseg.trainer.package import export_package

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command, func, flag in (("export", export_package, "sign_key"), ("import-nnunet", import_nnunet, "sign_key"),
                                ("predict", predict, "trusted_keys"), ("doctor", diagnose, "trusted_keys"),
                                ("keygen", generate_keys, "name"), ("sign", sign_package, "key")):
        dests = {a.dest for a in sub.choices[command]._actions} - {"help", "json", "verbose", "quiet"}
        if command == "predict":  # the Ray options are keywords of predict_ray (tests/test_layers.py)
            dests -= {"ray", *_RAY_ONLY}
        params = set(inspect.signature(func).parameters)
        assert flag in dests and dests - {"folds"} <= params, (command, dests - params)


def test_without_cryptography_only_signature_work_needs_it(package, keys, monkeypatch):
    from pocketseg import signing
    from pocketseg.errors import MissingDependencyError

    sign_package(package, keys["ours"])

    def missing():
        raise MissingDependencyError("cryptography", "Package signatures", "sign")

    monkeypatch.setattr(signing, "_crypto", missing)
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)
    assert check_trusted(package) is None  # no trusted keys: predict never touches the library
    with pytest.raises(MissingDependencyError, match=r"pocketseg\[sign\]"):
        check_trusted(package, keys["trusted"])
    signature = diagnose(package, trusted_keys=keys["trusted"])["package"]["signature"]
    assert signature["state"] == "unknown" and "pocketseg[sign]" in signature["detail"]
