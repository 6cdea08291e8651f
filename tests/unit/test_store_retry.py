"""Which S3 errors are waited out, and for how long (a fake clock: no sleeping, no server)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from gptoss_cloud.contract.store.retry import is_transient, retrying


def _client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("e", [
    EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x"),
    _client_error("SlowDown", 503), _client_error("InternalError", 500), _client_error("503", 503),
    _client_error("Throttling"), ConnectionResetError(104, "Connection reset by peer"),
    Exception("Failed to upload a to b/k: Could not connect to the endpoint URL: \"http://x/b/k\""),
])
def test_transient(e):
    assert is_transient(e)


@pytest.mark.parametrize("e", [
    _client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404), _client_error("NoSuchKey", 404),
    _client_error("InvalidAccessKeyId", 403), ValueError("bad"),
    Exception("Failed to upload a to b/k: An error occurred (AccessDenied) when calling the PutObject operation"),
])
def test_not_transient(e):
    assert not is_transient(e)


class Clock:
    def __init__(self):
        self.t, self.sleeps = 0.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_retries_with_growing_delays_until_it_works():
    clock, calls = Clock(), []

    def flaky():
        calls.append(clock.t)
        if len(calls) < 4:
            raise EndpointConnectionError(endpoint_url="http://x")
        return "ok"

    assert retrying(flaky, 60, "write s3://b/k", sleep=clock.sleep, clock=clock) == "ok"
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_gives_up_once_the_budget_is_spent_and_raises_the_last_error():
    clock = Clock()

    def down():
        raise _client_error("ServiceUnavailable", 503)

    with pytest.raises(ClientError, match="ServiceUnavailable"):
        retrying(down, 10, "write s3://b/k", sleep=clock.sleep, clock=clock)
    assert sum(clock.sleeps) == pytest.approx(10) and clock.sleeps[-1] <= 10 - sum(clock.sleeps[:-1])


def test_a_permanent_error_is_raised_at_once():
    clock = Clock()

    def denied():
        raise _client_error("AccessDenied", 403)

    with pytest.raises(ClientError, match="AccessDenied"):
        retrying(denied, 60, "write s3://b/k", sleep=clock.sleep, clock=clock)
    assert clock.sleeps == []
