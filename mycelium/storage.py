"""One place that talks to object storage: S3 URIs (AWS or any S3-compatible endpoint) and local paths.

Credentials and endpoint come from the standard AWS chain; an S3-compatible endpoint is picked up
from ``AWS_ENDPOINT_URL_S3`` (read by boto3 itself) or ``MLFLOW_S3_ENDPOINT_URL`` (MLflow's name),
so the same code runs against AWS, the embedded SeaweedFS, or a team's MinIO without changes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


class StorageError(RuntimeError):
    """S3 is unreachable or refuses us; the message says which endpoint and what to check."""


def _explain(uri: str, err: Exception) -> StorageError:
    endpoint = s3_endpoint() or "AWS S3 (no AWS_ENDPOINT_URL_S3 set)"
    code = err.response.get("Error", {}).get("Code", "") if isinstance(err, ClientError) else type(err).__name__
    hint = {
        "NoSuchBucket": "the bucket does not exist; create it or fix the URI",
        "AccessDenied": "the credentials may not read it; check AWS_ACCESS_KEY_ID / the AWS profile",
        "InvalidAccessKeyId": "the access key is unknown to this endpoint; check AWS_ACCESS_KEY_ID",
        "SignatureDoesNotMatch": "the secret key does not match; check AWS_SECRET_ACCESS_KEY",
        "NoCredentialsError": "no credentials found; for the embedded stack run eval \"$(mycelium stack env)\"",
        "EndpointConnectionError": "nothing answers there; start the embedded stack with `mycelium stack up` "
        "and eval \"$(mycelium stack env)\", or set AWS_ENDPOINT_URL_S3",
    }.get(code, "check the endpoint, the credentials and the URI")
    return StorageError(f"cannot read {uri} from {endpoint}: {code or err} — {hint}")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its full URI, key relative to the listing, size and version token."""

    uri: str
    key: str
    size: int
    etag: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://BUCKET/KEY)")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """A local folder or file from a plain path or a ``file://`` URI."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    return Path(uri)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, access_key: str | None):  # noqa: ARG001 - a key of the cache: new keys, new client
    # Path-style addressing: S3-compatible servers on loopback have no per-bucket DNS names.
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=32,
    )
    # A session of its own: boto3's default session keeps the first credentials it resolved.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def s3_client():
    """A boto3 S3 client for the configured endpoint and access key (cached per pair)."""
    return _client(s3_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"))


def list_objects(prefix_uri: str) -> list[ObjectInfo]:
    """All objects under an S3 prefix or local folder, sorted by key; follows every listing page."""
    if is_s3(prefix_uri):
        bucket, prefix = split_s3(prefix_uri)
        out: list[ObjectInfo] = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(
                        ObjectInfo(
                            uri=f"s3://{bucket}/{obj['Key']}",
                            key=obj["Key"][len(prefix):].lstrip("/"),
                            size=int(obj["Size"]),
                            etag=obj["ETag"].strip('"'),
                        )
                    )
        except (BotoCoreError, ClientError) as e:
            raise _explain(prefix_uri, e) from None
        return sorted(out, key=lambda o: o.key)
    root = local_path(prefix_uri)
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    out = []
    for p in files:
        st = p.stat()
        # For local files the "etag" is size+mtime: cheap, and changes when the file is rewritten.
        out.append(ObjectInfo(uri=str(p), key=str(p.relative_to(root)), size=st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}"))
    return sorted(out, key=lambda o: o.key)


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return local_path(uri).read_bytes()


def download(uri: str, dest: Path) -> None:
    """Copy one object to a local file, atomically (a partial download never looks complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().download_file(bucket, key, str(tmp))
    else:
        tmp.write_bytes(local_path(uri).read_bytes())
    os.replace(tmp, dest)


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        local_path(uri).unlink(missing_ok=True)


def join(prefix: str, *parts: str) -> str:
    """Join a prefix URI (S3 or local) with relative parts using ``/``."""
    base = prefix.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])
