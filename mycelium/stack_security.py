"""The embedded stack's locks, so that only a holder of the state folder's secrets reaches data.

SeaweedFS's S3 gateway checks signatures, but its filer, volume and master servers answer plain
HTTP and gRPC to anyone on the machine. SeaweedFS's own security configuration closes them:

* JWT signing keys for volume writes and reads and for filer writes and reads (the S3 gateway and
  the filer sign their internal requests; an unsigned request gets 401), and the filer stops
  listing directory metadata;
* mutual TLS on every gRPC port, with a CA and one certificate generated here (the filer's gRPC
  API can list and delete any entry, so it must not accept a client without a certificate).

SeaweedFS reads ``security.toml`` from its working directory, which is the state folder. The
MLflow server runs MLflow's own basic-auth app, so its artifact proxy (which holds the S3 keys)
is no door either. Every file here is written once, mode 0600, and kept across restarts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

SECURITY_TOML = "security.toml"
TLS_DIR = "tls"
MLFLOW_AUTH_INI = "mlflow-auth.ini"
# The gRPC components of `weed mini` (and the client side every one of them uses to call another).
_GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "msg_broker", "msg_agent", "mq", "worker", "client")


def write_private(path: Path, data: str | bytes) -> None:
    """Create or replace ``path`` readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def ensure_seaweedfs_security(state_dir: Path) -> Path:
    """``state_dir/security.toml`` (JWT keys, mTLS certificates), generated on first use."""
    path = state_dir / SECURITY_TOML
    tls = state_dir / TLS_DIR
    if path.exists() and all((tls / name).exists() for name in ("ca.crt", "tls.crt", "tls.key")):
        return path
    tls.mkdir(mode=0o700, exist_ok=True)
    _write_certificates(tls)
    keys = {name: secrets.token_hex(32) for name in ("signing", "signing.read", "filer_signing", "filer_signing.read")}
    lines = [f'[jwt.{name}]\nkey = "{key}"\n' for name, key in keys.items()]
    # Without this the filer's GET on a folder lists it even to a request it then refuses data.
    lines.append("[filer.expose_directory_metadata]\nenabled = false\n")
    lines.append("[access]\nui = false\n")
    lines.append(f'[grpc]\nca = "{TLS_DIR}/ca.crt"\n')
    lines += [f'[grpc.{name}]\ncert = "{TLS_DIR}/tls.crt"\nkey = "{TLS_DIR}/tls.key"\n' for name in _GRPC_SECTIONS]
    write_private(path, "\n".join(lines))
    return path


def _write_certificates(folder: Path) -> None:
    """A private CA and one loopback certificate it signs, used by every SeaweedFS component both as
    server and as client (mutual TLS: a peer without a certificate from this CA is refused)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=3650))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mycelium embedded stack CA")])
    ca = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mycelium")]),
                                public_key=key.public_key(), serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write_private(folder / "ca.crt", ca.public_bytes(pem))
    write_private(folder / "tls.crt", cert.public_bytes(pem))
    write_private(folder / "tls.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def mlflow_auth_ini(state_dir: Path, username: str, password: str) -> Path:
    """The config of MLflow's basic-auth app: its user store in the state folder, one admin user.

    The password is read only when the user store is created (MLflow ignores it afterwards)."""
    path = state_dir / MLFLOW_AUTH_INI
    write_private(
        path,
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{state_dir / 'mlflow-auth.db'}\n"
        f"admin_username = {username}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checking the password hash costs tens of ms; a training makes hundreds of calls.
        "auth_cache_ttl_seconds = 600\n",
    )
    return path
