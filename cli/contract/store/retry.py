"""Which S3 failures are worth waiting out, and the bounded wait itself.

A few seconds of S3 trouble (a restarted endpoint, a dropped connection, 5xx, throttling) must not kill
a run that has trained for hours, and a bucket that is really gone must not hang it forever either: a
transient error is retried with exponential backoff until ``budget_s`` seconds have passed since the
first failure, then it is raised. Everything else (access denied, no such bucket, a missing key) is
raised at once: waiting would not change the answer. botocore's own retries (a few quick attempts)
happen inside each call; this is the longer, coarser loop around them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("gptoss_cloud.contract.store.objects")
T = TypeVar("T")

DEFAULT_RETRY_S = 180.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 20.0

TRANSIENT_CODES = frozenset({
    "500", "502", "503", "504", "429", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestTimeout", "RequestLimitExceeded", "TooManyRequestsException", "BadGateway",
})
# What boto3's transfer manager leaves of a connection failure once it wraps it into S3UploadFailedError.
_TRANSIENT_TEXT = re.compile(r"Could not connect to the endpoint|Connection was closed|Read timeout|Connect timeout|"
                             r"Connection reset|Broken pipe|IncompleteRead", re.IGNORECASE)


def error_code(e: BaseException) -> str | None:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code) if code else (str(status) if status else None)
    m = re.search(r"An error occurred \((\w+)\)", str(e))
    return m.group(1) if m else None


def is_transient(e: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # no boto3: nothing here talks to S3
        BotoConnectionError = HTTPClientError = ()  # type: ignore[assignment]
    if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return True
    code = error_code(e)
    if code in TRANSIENT_CODES or (code is not None and code.isdigit() and code.startswith("5")):
        return True
    return code is None and bool(_TRANSIENT_TEXT.search(str(e)))


def retrying(fn: Callable[[], T], budget_s: float, what: str, *, sleep=time.sleep, clock=time.monotonic) -> T:
    """``fn()``, retried on transient errors for up to ``budget_s`` seconds after the first one."""
    start, delay = None, FIRST_DELAY_S
    while True:
        try:
            return fn()
        except Exception as e:  # classified right here; anything else is re-raised untouched
            if not is_transient(e):
                raise
            now = clock()
            start = now if start is None else start
            left = budget_s - (now - start)
            if left <= 0:
                raise
            wait = min(delay, left)
            log.warning("%s: %s (transient); retrying in %.1fs (giving up %.0fs after the first failure)",
                        what, error_code(e) or type(e).__name__, wait, budget_s)
            sleep(wait)
            delay = min(delay * 2, MAX_DELAY_S)
