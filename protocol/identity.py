"""A node's long-lived identity: an Ed25519 key, the fingerprint derived from it, and TLS certificates bound to it.

A node's id IS its fingerprint: lowercase unpadded base32 of the first 20 bytes of SHA-256 over the
32 raw public key bytes (32 characters, usable as a DNS label). Whoever holds the private key owns that id.

TLS: gRPC's BoringSSL does not negotiate Ed25519 certificates (NO_COMMON_SIGNATURE_ALGORITHMS, see
grpc/grpc#24252), so the TLS certificate carries a fresh ECDSA P-256 key, self-signed as usual, and a
non-critical extension (TLS_BINDING_OID) holding the identity's public key and its Ed25519 signature over
that ECDSA key and the certificate's expiry. `fingerprint_of_certificate` checks that signature, so a
certificate names an identity only if the identity's key authorised it.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
FINGERPRINT_DIGEST_BYTES = 20
# A UUID-based OID (ITU-T X.667 arc 2.25), so it needs no registration.
TLS_BINDING_OID = x509.ObjectIdentifier("2.25.170820237988354785339562629693417883308")
TLS_BINDING_DOMAIN = b"edgeswarm.v1.tls-binding\x00"
DEFAULT_TLS_VALIDITY = datetime.timedelta(days=365)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


class IdentityError(Exception):
    """An identity file or certificate that cannot be used, with the reason."""


def fingerprint_of_key(public_key_bytes: bytes) -> str:
    """The node id of a raw 32-byte Ed25519 public key (see the module docstring)."""
    digest = hashlib.sha256(public_key_bytes).digest()[:FINGERPRINT_DIGEST_BYTES]
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def verify(public_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is the key's Ed25519 signature of `data`; False (never an exception) on any garbage."""
    if not all(isinstance(value, bytes) for value in (public_key_bytes, data, signature)):
        return False
    if len(public_key_bytes) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class NodeIdentity:
    """A node's Ed25519 private key and what derives from it."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._fingerprint = fingerprint_of_key(self._public_key_bytes)

    @property
    def public_key_bytes(self) -> bytes:
        """The 32 raw bytes of the Ed25519 public key."""
        return self._public_key_bytes

    @property
    def fingerprint(self) -> str:
        """This node's id (see the module docstring)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"NodeIdentity({self.fingerprint})"

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A new random identity (not saved anywhere)."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Reads a PKCS#8 PEM Ed25519 key, refusing a file that group or others can access."""
        path = Path(path)
        try:
            with open(path, "rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                pem = file.read()
        except OSError as error:
            raise IdentityError(f"cannot read identity file {path}: {error.strerror}") from error
        if mode & 0o077:
            raise IdentityError(
                f"identity file {path} is accessible by group or others (mode {mode & 0o777:o}); "
                f"it holds a private key: run `chmod 600 {path}`"
            )
        return cls(_parse_private_key(pem, path))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Loads the identity at `path`, first creating it (mode 0600, atomically) if there is none."""
        path = Path(path)
        if not os.path.lexists(path):
            identity = cls.generate()
            try:
                created = _create_exclusively(path, identity._private_pem())
            except OSError as error:
                raise IdentityError(f"cannot create identity file {path}: {error}") from error
            if created:
                return identity
        return cls.load(path)  # it existed, or another process created it first

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self._private_key.sign(data)

    def tls_certificate(
        self, hostnames: Iterable[str], valid_for: datetime.timedelta = DEFAULT_TLS_VALIDITY
    ) -> tuple[bytes, bytes]:
        """(certificate PEM, ECDSA P-256 key PEM) for a TLS endpoint of this identity.

        Subject CN is the fingerprint; the SANs are the fingerprint (a DNS name, so a client can pass it as
        `grpc.ssl_target_name_override`) and each of `hostnames` (IP addresses become IP SANs). Every call
        makes a new TLS key.
        """
        tls_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        not_after = now + valid_for
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.fingerprint)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(tls_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(_alt_names([self.fingerprint, *hostnames])), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._binding(tls_key.public_key(), not_after), critical=False)
            .sign(tls_key, hashes.SHA256())
        )
        key_pem = tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem

    def _binding(
        self, tls_public_key: ec.EllipticCurvePublicKey, not_after: datetime.datetime
    ) -> x509.UnrecognizedExtension:
        signature = self.sign(_binding_message(tls_public_key, not_after))
        return x509.UnrecognizedExtension(TLS_BINDING_OID, self.public_key_bytes + signature)

    def _private_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def fingerprint_of_certificate(cert_pem: bytes) -> str:
    """The fingerprint of the identity that authorised this TLS certificate (see `NodeIdentity.tls_certificate`).

    Raises IdentityError if the certificate is unparsable, lacks the binding, the binding's signature does
    not cover this certificate's key and expiry, or its CN is not that fingerprint.
    """
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        extension = certificate.extensions.get_extension_for_oid(TLS_BINDING_OID).value
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        tls_public_key = certificate.public_key()
    except x509.ExtensionNotFound as error:
        raise IdentityError("certificate carries no edgeswarm identity binding") from error
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension) as error:
        raise IdentityError(f"unparsable certificate: {error}") from error
    binding = extension.value
    public_key_bytes, signature = binding[:PUBLIC_KEY_BYTES], binding[PUBLIC_KEY_BYTES:]
    if not isinstance(tls_public_key, ec.EllipticCurvePublicKey):
        raise IdentityError("certificate key is not an ECDSA key")
    if not verify(public_key_bytes, _binding_message(tls_public_key, certificate.not_valid_after_utc), signature):
        raise IdentityError("certificate's identity binding is not signed by the identity it names")
    fingerprint = fingerprint_of_key(public_key_bytes)
    if [attribute.value for attribute in common_names] != [fingerprint]:
        raise IdentityError(f"certificate CN does not match its bound identity {fingerprint}")
    return fingerprint


def _binding_message(tls_public_key: ec.EllipticCurvePublicKey, not_after: datetime.datetime) -> bytes:
    """What the identity signs to authorise a TLS key until `not_after` (domain tag, key, expiry in seconds)."""
    key_der = tls_public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TLS_BINDING_DOMAIN + key_der + struct.pack(">q", int(not_after.timestamp()))


def _alt_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for hostname in dict.fromkeys(hostnames):  # dedupe, keep order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
        except ValueError:
            names.append(x509.DNSName(hostname))
    return names


def _parse_private_key(pem: bytes, path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise IdentityError(f"identity file {path} is not an unencrypted PEM private key: {error}") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _create_exclusively(path: Path, content: bytes) -> bool:
    """Writes `content` to `path` with mode 0600 all at once; False if `path` already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)  # unlike rename, never replaces an identity another process just wrote
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True
