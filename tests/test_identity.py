"""Node identity: key files and their checks, signatures, and TLS certificates bound to the key, over real gRPC."""

from __future__ import annotations

import datetime
import ipaddress
import os
import threading
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from edgeswarm.protocol.identity import (
    TLS_BINDING_OID,
    IdentityError,
    NodeIdentity,
    fingerprint_of_certificate,
    fingerprint_of_key,
    verify,
)

BASE32_LOWER = set("abcdefghijklmnopqrstuvwxyz234567")


def pem_of(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_key_file(path, content: bytes, mode: int = 0o600):
    path.write_bytes(content)
    path.chmod(mode)
    return path


# --- keys, fingerprints, signatures


def test_fingerprint_is_stable_short_base32(identity):
    assert fingerprint_of_key(bytes(32)) == "mzuhvlpymk6xo3epygfy5h4oeaejofef"  # node ids must never change
    assert identity.fingerprint == fingerprint_of_key(identity.public_key_bytes)
    assert len(identity.fingerprint) == 32 and set(identity.fingerprint) <= BASE32_LOWER
    assert len(identity.public_key_bytes) == 32
    assert identity.fingerprint in repr(identity)


def test_sign_and_verify(identity, other):
    signature = identity.sign(b"hello")
    assert len(signature) == 64
    assert verify(identity.public_key_bytes, b"hello", signature)
    assert not verify(identity.public_key_bytes, b"hellO", signature)
    assert not verify(other.public_key_bytes, b"hello", signature)


@pytest.mark.parametrize(
    "public_key, data, signature",
    [
        (b"", b"data", bytes(64)),
        (bytes(31), b"data", bytes(64)),
        (bytes(33), b"data", bytes(64)),
        (b"\xff" * 32, b"data", b"\xff" * 64),  # not a curve point
        (bytes(32), b"data", bytes(63)),
        (bytes(32), b"data", bytes(65)),
        (None, b"data", bytes(64)),
        ("k" * 32, b"data", bytes(64)),
        (bytes(32), "data", bytes(64)),
        (bytes(32), None, bytes(64)),
        (bytes(32), b"data", 12345),
        (bytearray(32), b"data", bytearray(64)),
        ([0] * 32, [0], [0] * 64),
    ],
)
def test_verify_is_false_on_garbage(public_key, data, signature):
    assert verify(public_key, data, signature) is False


# --- identity files


def test_load_or_create_round_trip(tmp_path):
    path = tmp_path / "keys" / "node.pem"
    created = NodeIdentity.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = NodeIdentity.load_or_create(path)
    assert loaded.fingerprint == created.fingerprint
    assert verify(created.public_key_bytes, b"x", loaded.sign(b"x"))
    assert NodeIdentity.load(path).fingerprint == created.fingerprint
    assert os.listdir(path.parent) == ["node.pem"]  # no temporary left behind


def test_concurrent_creation_yields_one_identity(tmp_path):
    path = tmp_path / "node.pem"
    barrier = threading.Barrier(8)

    def create() -> str:
        barrier.wait()
        return NodeIdentity.load_or_create(path).fingerprint

    with futures.ThreadPoolExecutor(8) as pool:
        fingerprints = set(pool.map(lambda _: create(), range(8)))
    assert fingerprints == {NodeIdentity.load(path).fingerprint}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_refuses_a_file_others_can_access(tmp_path, mode):
    path = write_key_file(tmp_path / "node.pem", pem_of(ed25519.Ed25519PrivateKey.generate()), mode)
    with pytest.raises(IdentityError, match=r"accessible by group or others .*chmod 600"):
        NodeIdentity.load_or_create(path)


def test_refuses_a_key_that_is_not_ed25519(tmp_path):
    path = write_key_file(tmp_path / "node.pem", pem_of(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        NodeIdentity.load_or_create(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\x00\xff",
        pem_of(ed25519.Ed25519PrivateKey.generate())[:60],  # truncated
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        ),
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "garbage", "truncated", "encrypted", "certificate"],
)
def test_refuses_garbage(tmp_path, content):
    path = write_key_file(tmp_path / "node.pem", content)
    with pytest.raises(IdentityError, match="not an unencrypted PEM private key"):
        NodeIdentity.load_or_create(path)


def test_reports_a_file_it_cannot_create(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(IdentityError, match="cannot create identity file"):
        NodeIdentity.load_or_create(tmp_path / "file" / "node.pem")


def test_refuses_an_unreadable_path(tmp_path):
    with pytest.raises(IdentityError, match="cannot read identity file"):
        NodeIdentity.load(tmp_path)  # a directory
    with pytest.raises(IdentityError, match="cannot read identity file"):
        NodeIdentity.load(tmp_path / "missing.pem")


# --- TLS certificates


def test_certificate_names_the_identity(identity):
    cert_pem, key_pem = identity.tls_certificate(["node.example", "10.1.2.3", "::1"])
    certificate = x509.load_pem_x509_certificate(cert_pem)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.fingerprint
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [identity.fingerprint, "node.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")]
    assert isinstance(serialization.load_pem_private_key(key_pem, None), ec.EllipticCurvePrivateKey)
    assert fingerprint_of_certificate(cert_pem) == identity.fingerprint


def _binding_of(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_oid(TLS_BINDING_OID).value.value


def _self_signed(key_pem: bytes, common_name: str, not_after: datetime.datetime, binding: bytes | None) -> bytes:
    """A certificate as anyone holding `key_pem` could make one."""
    key = serialization.load_pem_private_key(key_pem, None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=1))
        .not_valid_after(not_after)
    )
    if binding is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(TLS_BINDING_OID, binding), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_certificate_without_a_binding_is_refused(identity):
    _, key_pem = identity.tls_certificate([])
    not_after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    with pytest.raises(IdentityError, match="no edgeswarm identity binding"):
        fingerprint_of_certificate(_self_signed(key_pem, identity.fingerprint, not_after, None))


def test_binding_copied_onto_another_key_is_refused(identity):
    cert_pem, _ = identity.tls_certificate([])
    _, attacker_key_pem = NodeIdentity.generate().tls_certificate([])
    not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    forged = _self_signed(attacker_key_pem, identity.fingerprint, not_after, _binding_of(cert_pem))
    with pytest.raises(IdentityError, match="not signed by the identity"):
        fingerprint_of_certificate(forged)


def test_binding_cannot_outlive_its_certificate(identity):
    cert_pem, key_pem = identity.tls_certificate([])
    later = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc + datetime.timedelta(days=3650)
    with pytest.raises(IdentityError, match="not signed by the identity"):
        fingerprint_of_certificate(_self_signed(key_pem, identity.fingerprint, later, _binding_of(cert_pem)))


def test_common_name_must_match_the_binding(identity, other):
    cert_pem, key_pem = identity.tls_certificate([])
    not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    forged = _self_signed(key_pem, other.fingerprint, not_after, _binding_of(cert_pem))
    with pytest.raises(IdentityError, match="CN does not match"):
        fingerprint_of_certificate(forged)


@pytest.mark.parametrize(
    "cert_pem", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_unparsable_certificate_is_refused(cert_pem):
    with pytest.raises(IdentityError, match="unparsable certificate"):
        fingerprint_of_certificate(cert_pem)


# --- gRPC over TLS with identity certificates (mutual: each side learns the other's fingerprint)


@pytest.fixture(scope="module")
def tls_server(identity):
    """A gRPC server on the identity's certificate that answers with the fingerprint of its client's certificate."""
    client = NodeIdentity.generate()
    server_cert, server_key = identity.tls_certificate(["127.0.0.1"])
    client_cert, client_key = client.tls_certificate([])

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        (peer_cert,) = context.auth_context()["x509_pem_cert"]
        return fingerprint_of_certificate(peer_cert).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(server_key, server_cert)], root_certificates=client_cert, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield {"port": port, "cert": server_cert, "client": client, "client_cert": client_cert, "client_key": client_key}
    server.stop(grace=None)


def _call_whoami(tls_server, trusted_cert: bytes, target_name: str) -> bytes:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted_cert,
        private_key=tls_server["client_key"],
        certificate_chain=tls_server["client_cert"],
    )
    options = [("grpc.ssl_target_name_override", target_name)]
    with grpc.secure_channel(f"127.0.0.1:{tls_server['port']}", credentials, options=options) as channel:
        return channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)


def test_grpc_mutual_tls_with_identity_certificates(identity, tls_server):
    assert fingerprint_of_certificate(tls_server["cert"]) == identity.fingerprint
    # the client names the server by its fingerprint, whatever address it dialled
    answer = _call_whoami(tls_server, tls_server["cert"], identity.fingerprint)
    assert answer.decode() == tls_server["client"].fingerprint


def test_grpc_refuses_a_server_that_is_not_the_expected_identity(other, tls_server):
    other_cert, _ = other.tls_certificate(["127.0.0.1"])
    with pytest.raises(grpc.RpcError) as raised:
        _call_whoami(tls_server, other_cert, other.fingerprint)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
