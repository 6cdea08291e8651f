"""Integration fixtures: a real S3-compatible HTTP server (moto in server mode) on 127.0.0.1.

The server runs as its own process; boto3 talks to it over HTTP through AWS_ENDPOINT_URL, exactly as
the trainer talks to S3 (no in-process mock of boto3). A second server enforces IAM, for the
"wrong credentials / no permission" tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from support import free_port


def _start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:  # a TCP connect, not a request: the IAM server counts requests before it starts enforcing
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start within 30 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    proc, url = _start_moto()
    yield url
    _stop(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (here and in child processes) at the test server; returns the env to pass on."""
    env = dict(S3_ENV, AWS_ENDPOINT_URL=s3_server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return env


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh bucket; returns an ``s3://bucket/prefix`` store URI."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}/runs"


@pytest.fixture(scope="session")
def s3_iam_server():
    """A server that checks credentials and IAM policies.

    moto lets the first INITIAL_NO_AUTH_ACTION_COUNT requests through unauthenticated: we use them to
    create an admin user, then make everything else (bucket, a read-only user) with its keys.
    """
    import boto3

    proc, url = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    anon = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="admin")
    admin_key = iam.create_access_key(UserName="admin")["AccessKey"]
    allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(allow_all))
    admin = dict(endpoint_url=url, region_name="us-east-1",
                 aws_access_key_id=admin_key["AccessKeyId"], aws_secret_access_key=admin_key["SecretAccessKey"])
    boto3.client("s3", **admin).create_bucket(Bucket="locked")
    iam_a = boto3.client("iam", **admin)
    iam_a.create_user(UserName="reader")
    reader_key = iam_a.create_access_key(UserName="reader")["AccessKey"]
    read_only = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": ["arn:aws:s3:::locked", "arn:aws:s3:::locked/*"]}]}
    iam_a.put_user_policy(UserName="reader", PolicyName="ro", PolicyDocument=json.dumps(read_only))
    yield {"url": url, "admin": (admin_key["AccessKeyId"], admin_key["SecretAccessKey"]),
           "reader": (reader_key["AccessKeyId"], reader_key["SecretAccessKey"])}
    _stop(proc)
