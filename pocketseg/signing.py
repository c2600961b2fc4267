"""Ed25519 signatures of model packages: who wrote a package, for deployments that run only their own.

A package's ``manifest.json`` lists the SHA-256 of every file and carries ``content_sha256``, the digest of its
own canonical JSON (:func:`pocketseg.manifest.content_digest`). A signature over that digest therefore covers
the manifest's every value and, through the checksums it holds, every file of the package:
:func:`pocketseg.manifest.load_package` refuses a file that does not match its checksum, and a checksum
changed to match an edited file changes the digest, which the signature then no longer fits.

The signature is a detached file in the package, ``signature.json``: the signer's key id and public key,
the digest it signed and the Ed25519 signature (base64). Keys are PEM files: ``NAME.key`` (PKCS#8 private
key, owner-only) and ``NAME.pub`` (SubjectPublicKeyInfo public key); a folder of ``*.pub`` files is a set of
trusted keys (``--trusted-keys DIR`` or ``$POCKETSEG_TRUSTED_KEYS``). The cryptography is the
``cryptography`` library's (extra ``sign``); nothing here computes a signature by hand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketseg.atomic import ensure_dir, read_json, write_json
from pocketseg.errors import InputError, OutputError, PocketsegError, require
from pocketseg.manifest import MANIFEST_NAME, content_digest, load_package

__all__ = ["SIGNATURE_NAME", "TRUSTED_KEYS_ENV", "SignatureStatus", "check_trusted", "generate_keys", "key_id",
           "signature_status", "sign_package", "trusted_keys_folder"]

log = logging.getLogger(__name__)

SIGNATURE_NAME = "signature.json"
TRUSTED_KEYS_ENV = "POCKETSEG_TRUSTED_KEYS"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
SIGNATURE_FORMAT = 1
ALGORITHM = "Ed25519"
#: Signed bytes: this prefix, then the manifest's content digest in hex. The prefix keeps a package signature
#: from being valid as a signature of anything else made with the same key.
_CONTEXT = b"pocketseg model package signature v1\n"


def _crypto() -> Any:
    """The ``cryptography`` modules used here, or :class:`MissingDependencyError` naming the ``sign`` extra."""
    require("cryptography", "Package signatures", "sign")
    # optional: the `sign` extra; inference without signatures does not need it
    from cryptography import exceptions
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return exceptions, serialization, ed25519


def _raw_public(public_key: Any) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """A short name of a public key: the first 16 hex digits of the SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _message(digest: str) -> bytes:
    return _CONTEXT + digest.encode("ascii")


def generate_keys(out_dir: str | os.PathLike, *, name: str = "pocketseg") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair, ``OUT_DIR/NAME.key`` (private, mode 0600) and ``OUT_DIR/NAME.pub``
    (``pocketseg keygen``); returns both paths. Existing key files are never replaced."""
    _, serialization, ed25519 = _crypto()
    if not name or Path(name).name != name or name.startswith("."):
        raise InputError(None, f"key name must be a plain file name, got {name!r}")
    folder = ensure_dir(out_dir, "key folder")
    private_path, public_path = folder / f"{name}{PRIVATE_SUFFIX}", folder / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise OutputError(path, "already exists; a key is never replaced (choose another --name or folder)")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL: a file that appeared since the check above is not replaced; the mode is set at creation, so the
    # private key is never readable by others, not even for a moment.
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OutputError(private_path, "already exists; a key is never replaced") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    try:
        with open(public_path, "xb") as handle:
            handle.write(public_pem)
    except BaseException:
        private_path.unlink()  # no private key without its public half
        raise
    log.info("key %s: %s (private, keep it secret), %s (public, for --trusted-keys)",
             key_id(private.public_key()), private_path, public_path)
    return private_path, public_path


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, f"{what} does not exist") from None
    except OSError as exc:
        raise InputError(path, f"{what} cannot be read ({exc.strerror or exc})") from None


def _load_private(path: str | os.PathLike) -> Any:
    _, serialization, ed25519 = _crypto()
    source = Path(path)
    data = _read_bytes(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(source, f"is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(source, f"is not an Ed25519 private key ({type(key).__name__})")
    return key


def _load_public(path: Path) -> Any:
    _, serialization, ed25519 = _crypto()
    data = _read_bytes(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"is not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(path, f"is not an Ed25519 public key ({type(key).__name__})")
    return key


def check_signing_key(key: str | os.PathLike) -> None:
    """Refuse an unusable private key before the work whose result it is to sign (an export, an import)."""
    _load_private(key)


def sign_package(package_dir: str | os.PathLike, key: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Sign a model package with an Ed25519 private key (``pocketseg sign``); returns the signature file.

    The package is verified first (manifest and every file's checksum): only a sound package is signed.
    ``overwrite`` replaces an existing signature (after ``build-engine``, which changes the manifest).
    """
    folder = Path(package_dir)
    private = _load_private(key)
    load_package(folder)  # a package that does not verify is not signed
    target = folder / SIGNATURE_NAME
    if target.exists() and not overwrite:
        raise OutputError(target, "already exists (--overwrite replaces the signature; overwrite=True from Python)")
    return write_signature(folder, private, overwrite=overwrite)


def write_signature(folder: Path, private: Any, *, overwrite: bool = False) -> Path:
    """Write ``folder``'s ``signature.json`` for its manifest as it is on disk, signed with ``private``
    (a key object or a key file)."""
    if not hasattr(private, "sign"):
        private = _load_private(private)
    digest = content_digest(read_json(folder / MANIFEST_NAME))
    public = private.public_key()
    record = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "key_id": key_id(public),
              "public_key": base64.b64encode(_raw_public(public)).decode("ascii"),
              "signed": "manifest content_sha256", "content_sha256": digest,
              "signature": base64.b64encode(private.sign(_message(digest))).decode("ascii")}
    path = write_json(folder / SIGNATURE_NAME, record, indent=2, overwrite=overwrite)
    log.info("%s: signed by key %s", folder, record["key_id"])
    return path


def trusted_keys_folder(trusted_keys: str | os.PathLike | None = None) -> Path | None:
    """The folder of trusted public keys: ``trusted_keys``, else ``$POCKETSEG_TRUSTED_KEYS``, else None."""
    if trusted_keys is None:
        trusted_keys = os.environ.get(TRUSTED_KEYS_ENV) or None
    return None if trusted_keys is None else Path(trusted_keys)


def read_trusted_keys(folder: Path) -> dict[str, Any]:
    """``{key id: public key}`` of every ``*.pub`` file in ``folder``; a folder without one, or a file that
    is not an Ed25519 public key, is an error (a broken trust store must not pass silently)."""
    if not folder.is_dir():
        raise InputError(folder, f"trusted keys folder does not exist or is not a folder (--trusted-keys, "
                                 f"${TRUSTED_KEYS_ENV})")
    keys = {}
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        public = _load_public(path)
        keys[key_id(public)] = public
    if not keys:
        raise InputError(folder, f"trusted keys folder holds no public key (*{PUBLIC_SUFFIX}; pocketseg keygen)")
    return keys


@dataclass(frozen=True)
class SignatureStatus:
    """What a package's signature says. ``state``: ``unsigned``, ``invalid`` (malformed, not this manifest's,
    or not made by the key it names), ``trusted`` (valid, by a trusted key), ``untrusted`` (valid, by a key
    not among the trusted ones) or ``valid`` (valid, no trusted keys given)."""

    state: str
    key_id: str | None = None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.state == "trusted"

    def describe(self) -> str:
        by = f" by key {self.key_id}" if self.key_id else ""
        return {"unsigned": f"not signed (no {SIGNATURE_NAME})",
                "invalid": f"signature{by} is invalid: {self.reason}",
                "trusted": f"signed{by}, a trusted key",
                "untrusted": f"signed{by}, which is not among the trusted keys",
                "valid": f"signed{by} (valid; not checked against trusted keys)"}[self.state]


def signature_status(package_dir: str | os.PathLike, trusted: dict[str, Any] | None = None) -> SignatureStatus:
    """Verify ``package_dir``'s signature against its manifest as it is on disk and against the key it names;
    with ``trusted`` (:func:`read_trusted_keys`) also whether that key is trusted. The files' checksums are
    :func:`pocketseg.manifest.load_package`'s to check."""
    exceptions, _, ed25519 = _crypto()
    folder = Path(package_dir)
    path = folder / SIGNATURE_NAME
    if not path.exists():
        return SignatureStatus("unsigned")
    try:
        record = read_json(path)
    except InputError as exc:
        return SignatureStatus("invalid", reason=exc.problem)
    if not isinstance(record, dict):
        return SignatureStatus("invalid", reason=f"{SIGNATURE_NAME} is not a JSON object")
    kid = record.get("key_id") if isinstance(record.get("key_id"), str) else None
    if record.get("format") != SIGNATURE_FORMAT or record.get("algorithm") != ALGORITHM:
        return SignatureStatus("invalid", kid, f"unknown signature format {record.get('format')!r} / algorithm "
                                               f"{record.get('algorithm')!r}")
    try:
        raw_public = base64.b64decode(record["public_key"], validate=True)
        signature = base64.b64decode(record["signature"], validate=True)
        public = ed25519.Ed25519PublicKey.from_public_bytes(raw_public)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        return SignatureStatus("invalid", kid, f"malformed {SIGNATURE_NAME} ({type(exc).__name__}: {exc})")
    actual_id = key_id(public)
    if kid != actual_id:
        return SignatureStatus("invalid", kid, f"its key id does not match its public key ({actual_id})")
    try:
        digest = content_digest(read_json(folder / MANIFEST_NAME))
    except InputError as exc:
        return SignatureStatus("invalid", kid, f"the manifest cannot be read ({exc.problem})")
    if record.get("content_sha256") != digest:
        return SignatureStatus("invalid", kid, "the manifest was changed after it was signed")
    try:
        public.verify(signature, _message(digest))
    except exceptions.InvalidSignature:
        return SignatureStatus("invalid", kid, "the signature does not verify (forged or corrupt)")
    if trusted is None:
        return SignatureStatus("valid", kid)
    return SignatureStatus("trusted" if kid in trusted else "untrusted", kid)


def check_trusted(package_dir: str | os.PathLike, trusted_keys: str | os.PathLike | None = None) -> SignatureStatus | None:
    """With trusted keys (``trusted_keys`` or ``$POCKETSEG_TRUSTED_KEYS``), refuse a package that is not signed
    by one of them with one :class:`InputError` naming the package and the reason; None without trusted keys."""
    folder = trusted_keys_folder(trusted_keys)
    if folder is None:
        return None
    status = signature_status(package_dir, read_trusted_keys(folder))
    if not status.accepted:
        raise InputError(package_dir, f"model package refused: {status.describe()} (trusted keys: {folder})")
    return status


def describe_signature(package_dir: str | os.PathLike, trusted_keys: str | os.PathLike | None = None
                       ) -> dict[str, Any]:
    """The signature part of ``pocketseg doctor``'s report; reports every problem, raises none."""
    folder = trusted_keys_folder(trusted_keys)
    info: dict[str, Any] = {"state": None, "key_id": None, "detail": None,
                            "trusted_keys": None if folder is None else str(folder), "required": folder is not None}
    try:
        trusted = None if folder is None else read_trusted_keys(folder)
        status = signature_status(package_dir, trusted)
    except (PocketsegError, OSError) as exc:  # no cryptography, a broken or unreadable trust store
        info.update(state="unknown", detail=str(exc))
        if not (Path(package_dir) / SIGNATURE_NAME).exists():
            info["state"] = "unsigned"
        return info
    info.update(state=status.state, key_id=status.key_id, detail=status.describe())
    return info
