"""Object store: ``s3://bucket/prefix`` (boto3) or a local folder, behind one small interface.

Keys are '/'-separated paths relative to the store's root URI. S3 credentials come from the standard
AWS chain (env, shared config, IRSA / pod identity); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
selects an S3-compatible server. Errors become one line naming the URI and the AWS error code.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from .errors import StoreError

MiB = 1024 * 1024


class StoreNotFound(StoreError):
    """A key that does not exist (a normal answer for readers that probe, e.g. for a manifest)."""


class Store(Protocol):
    uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, local: str | Path, key: str) -> None: ...
    def download_file(self, key: str, local: str | Path) -> None: ...
    def read_range(self, key: str, start: int, length: int) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, prefix: str) -> int: ...
    def child(self, key: str) -> "Store": ...
    def check_access(self, write: bool = True) -> None: ...


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def open_store(uri: str | Path) -> Store:
    uri = str(uri)
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}: use s3://bucket/prefix or a local folder")
    return LocalStore(uri)


# ---------------------------------------------------------------------------------------- local
@dataclass
class LocalStore:
    root: str

    @property
    def uri(self) -> str:
        return str(Path(self.root).resolve())

    def _p(self, key: str) -> Path:
        p = Path(self.root) / key.strip("/") if key else Path(self.root)
        return p

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            raise StoreNotFound(f"not found: {self._p(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)  # atomic: a reader never sees half a file

    def upload_file(self, local: str | Path, key: str) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() == p.resolve():
            return
        tmp = p.with_name(p.name + ".tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, p)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._p(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise StoreNotFound(f"not found: {self._p(key)}") from None

    def download_file(self, key: str, local: str | Path) -> None:
        src = self._p(key)
        if not src.is_file():
            raise StoreNotFound(f"not found: {src}")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != Path(local).resolve():
            shutil.copyfile(src, local)

    def list(self, prefix: str = "") -> list[str]:
        base = Path(self.root)
        start = self._p(prefix)
        if start.is_file():
            return [prefix.strip("/")]
        if not start.is_dir():
            return []
        return sorted(str(p.relative_to(base)) for p in start.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def delete(self, prefix: str) -> int:
        p = self._p(prefix)
        if p.is_file():
            p.unlink()
            return 1
        if p.is_dir():
            n = sum(1 for q in p.rglob("*") if q.is_file())
            shutil.rmtree(p)
            return n
        return 0

    def child(self, key: str) -> "LocalStore":
        return LocalStore(str(self._p(key)))

    def check_access(self, write: bool = True) -> None:
        root = Path(self.root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if write:
                probe = root / f".gptoss-write-check-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as e:
            raise StoreError(f"access {self.uri}: {e.strerror or e}", hint="check the folder's permissions and free space") from None


# ------------------------------------------------------------------------------------------- s3
_CLIENTS: dict[tuple, object] = {}


def _s3_client():
    import boto3  # lazy: the control plane starts without it
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # boto3 clients are thread-safe and slow to build: share one per process and credential source.
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if key not in _CLIENTS:
        cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120,
                     max_pool_connections=32)
        # A fresh session: boto3's default one caches the credentials it first found.
        _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
    return _CLIENTS[key]


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # Multipart, parallel: 64 MiB parts, 16 threads. Large shards saturate a node's NIC this way.
    return TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=16, use_threads=True)


def translate_aws_error(e: Exception, uri: str, action: str) -> StoreError:
    import re

    code = None
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
    if code is None:  # boto3's transfer manager wraps the ClientError into S3UploadFailedError's text
        m = re.search(r"An error occurred \((\w+)\)", str(e))
        code = m.group(1) if m else None
    name = type(e).__name__
    hints = {
        "NoSuchBucket": "create the bucket or fix output.store",
        "AccessDenied": "the credentials lack permission for this bucket/prefix",
        "403": "the credentials lack permission for this bucket/prefix",
        "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID / the store Secret",
        "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY / the store Secret",
        "NoSuchKey": None,
        "404": None,
    }
    if name == "NoCredentialsError":
        return StoreError(f"{action} {uri}: no AWS credentials found (NoCredentialsError)",
                          hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an IAM role")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return StoreError(f"{action} {uri}: cannot reach the S3 endpoint ({name})", hint="check AWS_ENDPOINT_URL and the network")
    return StoreError(f"{action} {uri}: {code or name}" + (f" ({e})" if not code else ""), hint=hints.get(code or ""))


@dataclass
class S3Store:
    uri: str

    def __post_init__(self) -> None:
        rest = self.uri[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StoreError(f"bad S3 URI {self.uri!r}: expected s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = _s3_client()
        return self._client

    def _k(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def _call(self, action: str, key: str, fn, *a, **kw):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*a, **kw)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise translate_aws_error(e, self._uri(key), action) from e

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise StoreNotFound(f"not found: {self._uri(key)}") from None
            raise translate_aws_error(e, self._uri(key), "read") from e
        except BotoCoreError as e:  # no credentials, unreachable endpoint
            raise translate_aws_error(e, self._uri(key), "read") from e
        return self._call("read", key, r["Body"].read)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)

    def upload_file(self, local: str | Path, key: str) -> None:
        self._call("upload", key, self.client.upload_file, str(local), self.bucket, self._k(key), Config=_transfer_config())

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        r = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._k(key),
                       Range=f"bytes={start}-{start + length - 1}")
        return self._call("read", key, r["Body"].read)

    def download_file(self, key: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(local) + ".part")
        self._call("download", key, self.client.download_file, self.bucket, self._k(key), str(tmp), Config=_transfer_config())
        os.replace(tmp, local)

    def _iter(self, prefix: str) -> Iterator[str]:
        full = self._k(prefix)
        # A prefix is a folder: "ckpt" must not also list "ckpt-old/...".
        full_dir = full + "/" if full and not full.endswith("/") else full
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full_dir))):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                yield k[len(self.prefix) + 1:] if self.prefix else k

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._iter(prefix))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return bool(self.list(key))
            raise translate_aws_error(e, self._uri(key), "stat") from e

    def delete(self, prefix: str) -> int:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._k(k)} for k in keys[i:i + 1000]]
            self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)

    def child(self, key: str) -> "S3Store":
        return S3Store(join(self.uri, key))

    def check_access(self, write: bool = True) -> None:
        """Fail early, before training, with one clear line if the bucket is unreachable or read-only."""
        self._call("access", "", self.client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        if write:
            probe = f".gptoss-write-check-{os.getpid()}"
            self._call("write", probe, self.client.put_object, Bucket=self.bucket, Key=self._k(probe), Body=b"")
            self._call("delete", probe, self.client.delete_object, Bucket=self.bucket, Key=self._k(probe))


def upload_files(store: Store, items: list[tuple[str | Path, str]], max_workers: int = 8) -> None:
    """Upload many (local path, key) pairs in parallel; each file is itself multipart on S3."""
    if not items:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        for f in [pool.submit(store.upload_file, local, key) for local, key in items]:
            f.result()
