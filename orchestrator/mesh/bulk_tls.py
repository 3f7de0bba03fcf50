"""TLS for the bulk channel, pinned through the mesh.

A serving daemon makes a throwaway self-signed certificate when it starts. Its sha256
fingerprint travels to the fetching peer inside the roster-checked Noise channel, together
with a ticket. The fetcher then accepts exactly that certificate, whatever its name or issuer
(WebRTC pins its DTLS certificates the same way). No CA is involved, and no key is written
outside a private temporary folder that lives only while the certificate is loaded.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class PinMismatch(ssl.SSLError):
    """The bulk server presented another certificate than the one its ticket names."""


def _self_signed() -> tuple[bytes, bytes]:
    """PEM certificate and key (P-256, valid for a week: a daemon restarts long before)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "islands-bulk")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_context() -> tuple[ssl.SSLContext, str]:
    """A TLS 1.3 server context on a fresh certificate, and that certificate's fingerprint."""
    cert_pem, key_pem = _self_signed()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files only: a private folder, removed as soon as it is loaded.
    with tempfile.TemporaryDirectory(prefix="islands-bulk-") as folder:
        os.chmod(folder, 0o700)
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(cert_pem)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(key_pem)
        context.load_cert_chain(cert_path, key_path)
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    return context, hashlib.sha256(der).hexdigest()


def client_context() -> ssl.SSLContext:
    """Certificate checks are replaced by the pin (`check_pin`), made right after the
    handshake and before a byte is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_pin(sock: ssl.SSLSocket, fingerprint: str) -> None:
    der = sock.getpeercert(binary_form=True)
    got = hashlib.sha256(der).hexdigest() if der else "none"
    if got != fingerprint:
        raise PinMismatch(f"bulk server certificate {got[:16]}... is not the pinned "
                          f"{fingerprint[:16]}...")
