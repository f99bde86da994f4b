"""The certificates of a local API server, made in Python (``cryptography``; no openssl CLI).

A CA, a serving certificate for 127.0.0.1/localhost, an admin client
certificate in ``system:masters`` and a service-account RSA key pair, written
as PEM files for :class:`~tideflow.tools.launchers.cluster.EnvtestCluster`
(the tests' TLS broker serves the same CA and serving certificate).
Its own module so that ``cryptography`` — a dependency of the ``demo`` extra
only — is imported only when a cluster is started.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from tideflow.tools.launchers import HOST

__all__ = ["Pki"]


class Pki:
    """CA, serving cert, admin client cert and service-account keys, as PEM files."""

    def __init__(self, directory: Path, label: str = "tideflow-envtest") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        until = now + dt.timedelta(days=2)

        def name(cn: str, org: str | None = None) -> x509.Name:
            attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
            if org:
                attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
            return x509.Name(attrs)

        def key_pem(key: Any) -> bytes:
            return bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

        def write(filename: str, data: bytes) -> Path:
            path = directory / filename
            path.write_bytes(data)
            path.chmod(0o600)
            return path

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = name(f"{label}-ca")
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip

        def leaf(
            subject: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]
        ) -> tuple[bytes, bytes]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(until)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    critical=False,
                )
            )
            if sans:
                builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

        serving_crt, serving_key = leaf(
            name("kube-apiserver"),
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")],
        )
        admin_crt, admin_key = leaf(
            name("admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, []
        )
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        self.admin_crt_pem = admin_crt
        self.admin_key_pem = admin_key
        self.ca = write("ca.crt", self.ca_pem)
        self.serving_crt = write("serving.crt", serving_crt)
        self.serving_key = write("serving.key", serving_key)
        self.admin_crt = write("admin.crt", admin_crt)
        self.admin_key = write("admin.key", admin_key)
        self.sa_key = write("sa.key", key_pem(sa_key))
        self.sa_pub = write(
            "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
