"""The local broker's TLS material: a CA of its own and a broker certificate it signs, made once
(on the first `tensorline broker start --secure`) into the broker's data dir as PEM files, which
Kafka reads as they are (`ssl.keystore.type=PEM`) and kafka-python takes as `ssl_cafile`.

The broker certificate names 127.0.0.1 and localhost, the only addresses the launcher listens
on, so clients verify the hostname as they would against a real cluster. Private keys are
written unencrypted, readable by their owner only (the broker reads its key at start, with no
password to hand it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Ten years: a local CA outliving the data dir it sits in is no risk, an expired one a puzzle.
VALID_DAYS = 3650
# P-256: what every JDK and OpenSSL in use speaks, and keys made in milliseconds.
CURVE = ec.SECP256R1()
HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Material:
    """Where the PEM files are: the CA's certificate (clients trust it), the CA's key, and the
    broker's key with its certificate chain (the broker's keystore)."""
    ca_cert: Path
    ca_key: Path
    keystore: Path


def material(folder: Path) -> Material:
    return Material(folder / "ca.pem", folder / "ca.key", folder / "broker.pem")


def write_private(path: Path, data: bytes) -> None:
    """Write `data` readable by its owner only (created so: never world-readable for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8: the only private key form Kafka's PEM keystore reads.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure(folder: Path) -> Material:
    """The CA and broker certificate under `folder`, made now if they are not there yet."""
    found = material(folder)
    if found.ca_cert.exists() and found.keystore.exists():
        return found
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tensorline local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(CURVE)
    names = [x509.IPAddress(ipaddress.ip_address(HOSTS[0])), x509.DNSName(HOSTS[1])]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[1])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_private(found.ca_key, _key_pem(ca_key))
    write_private(found.keystore, _key_pem(key) + cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    found.ca_cert.write_bytes(ca_cert.public_bytes(pem))  # last: its presence says the set is complete
    return found
