"""Object store: ``s3://bucket/prefix`` (boto3) or a local folder, behind one small interface.

Keys are '/'-separated paths relative to the store's root URI. S3 credentials come from the standard
AWS chain (env, shared config, IRSA / pod identity); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)
selects an S3-compatible server. Errors become one line naming the URI and the AWS error code.

Both backends keep one contract (tests/integration/test_store_contract.py runs it on each):
``list(p)`` and ``delete(p)`` take ``p`` as a key or a folder alike (``p`` and ``p/`` are the same, and
``ckpt`` never reaches ``ckpt-old/``); reading a missing key raises StoreNotFound; writes overwrite;
``read_range`` past the end returns what exists (maybe nothing). A delete removes every
``manifest.json`` under the prefix before anything else, so no reader ever finds a published folder
whose files are half gone. S3 transient errors are retried for ``retry_s`` seconds (store_retry.py).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from gptoss_cloud.contract.errors import StoreError
from gptoss_cloud.contract.store.retry import DEFAULT_RETRY_S, error_code, is_transient, retrying

MiB = 1024 * 1024
PUBLISH_MARKER = "manifest.json"  # the file whose presence publishes a folder; deleted first
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


def _markers_first(keys: list[str]) -> list[list[str]]:
    first = [k for k in keys if k.rsplit("/", 1)[-1] == PUBLISH_MARKER]
    return [first, [k for k in keys if k.rsplit("/", 1)[-1] != PUBLISH_MARKER]]


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


def open_store(uri: str | Path, *, retry_s: float | None = None) -> Store:
    """``retry_s``: how long S3 transient errors are retried (default DEFAULT_RETRY_S); a folder ignores it."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return S3Store(uri, retry_s=DEFAULT_RETRY_S if retry_s is None else float(retry_s))
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
            markers = [q for q in p.rglob(PUBLISH_MARKER) if q.is_file()]
            for q in markers:
                q.unlink()
            n = len(markers) + sum(1 for q in p.rglob("*") if q.is_file())
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
        # Few quick attempts here: the long, bounded wait for an outage is store_retry.retrying's, so
        # that checkpoint.store_retry_s is what a run actually waits.
        cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=120,
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
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError") or (
            name == "S3UploadFailedError" and "Could not connect to the endpoint" in str(e)):
        return StoreError(f"{action} {uri}: cannot reach the S3 endpoint ({name})", hint="check AWS_ENDPOINT_URL and the network")
    return StoreError(f"{action} {uri}: {code or name}" + (f" ({e})" if not code else ""), hint=hints.get(code or ""))


@dataclass
class S3Store:
    uri: str
    retry_s: float = DEFAULT_RETRY_S

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

    def _call(self, action: str, key: str, fn, *a, missing: bool = False, **kw):
        """``fn(*a, **kw)`` with transient errors retried for ``retry_s``; failures become one StoreError line
        (``missing``: a 404 is StoreNotFound, the normal answer of a probe)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return retrying(lambda: fn(*a, **kw), self.retry_s, f"{action} {self._uri(key)}")
        except (ClientError, BotoCoreError, Boto3Error) as e:
            if missing and error_code(e) in _NOT_FOUND:
                raise StoreNotFound(f"not found: {self._uri(key)}") from None
            err = translate_aws_error(e, self._uri(key), action)
            if is_transient(e):
                err = StoreError(f"{err.message}; still failing after {self.retry_s:.0f}s of retries",
                                 hint="check the endpoint and the network; checkpoint.store_retry_s sets how long to retry")
            raise err from e

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:  # the body is read inside the retry: a connection can drop mid-body too
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()

        return self._call("read", key, get, missing=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)

    def upload_file(self, local: str | Path, key: str) -> None:
        self._call("upload", key, self.client.upload_file, str(local), self.bucket, self._k(key), Config=_transfer_config())

    def read_range(self, key: str, start: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        if length <= 0:
            return b""

        def get() -> bytes:
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._k(key), Range=f"bytes={start}-{start + length - 1}")
            except ClientError as e:
                if error_code(e) == "InvalidRange":  # starts past the end: nothing there, as for a file
                    return b""
                raise
            return r["Body"].read()

        return self._call("read", key, get, missing=True)

    def download_file(self, key: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(local) + ".part")
        try:
            self._call("download", key, self.client.download_file, self.bucket, self._k(key), str(tmp),
                       Config=_transfer_config(), missing=True)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never leave half a download beside the real name
            raise
        os.replace(tmp, local)

    def _iter(self, prefix: str) -> Iterator[str]:
        full = self._k(prefix)
        # A folder first ("ckpt/", never "ckpt-old/..."); only when it is empty can the prefix be a key itself.
        folder = f"{full}/" if full else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=folder)))
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        if not keys and full:
            try:
                self._call("stat", prefix, self.client.head_object, Bucket=self.bucket, Key=full, missing=True)
                keys = [full]
            except StoreNotFound:
                pass
        for k in keys:
            yield k[len(self.prefix) + 1:] if self.prefix else k

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._iter(prefix))

    def exists(self, key: str) -> bool:
        full = self._k(key)
        try:
            if full:
                self._call("stat", key, self.client.head_object, Bucket=self.bucket, Key=full, missing=True)
                return True
        except StoreNotFound:
            pass
        # A folder: S3 has no object for it, only keys under it.
        r = self._call("list", key, self.client.list_objects_v2, Bucket=self.bucket, Prefix=f"{full}/" if full else "",
                       MaxKeys=1)
        return bool(r.get("Contents"))

    def delete(self, prefix: str) -> int:
        keys = self.list(prefix)
        for group in _markers_first(keys):  # one request per group: S3 deletes a batch in no set order
            for i in range(0, len(group), 1000):
                batch = [{"Key": self._k(k)} for k in group[i:i + 1000]]
                resp = self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket,
                                  Delete={"Objects": batch, "Quiet": True})
                errors = (resp or {}).get("Errors") or []
                if errors:  # a 200 answer that refused some keys: the caller must not think them gone
                    first = errors[0]
                    raise StoreError(f"delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                                     f"({len(errors)} of {len(batch)} keys not deleted)", hint=None)
        return len(keys)

    def child(self, key: str) -> "S3Store":
        return S3Store(join(self.uri, key), retry_s=self.retry_s)

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
