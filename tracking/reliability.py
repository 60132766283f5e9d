"""Talking to a tracking store that may be busy, restarting or gone: retries, outages, secrets kept out.

- `with_retry` / `RetryingClient`: a SQLite store under concurrent writers answers "database is locked"
  (TEMPORARILY_UNAVAILABLE); such calls are retried with backoff instead of failing a configuration.
- `is_unreachable`: the errors that mean "the store can't be reached right now" (the caller keeps its
  results locally instead of failing, see tracking/unsynced.py).
- `Outage`: one warning when the store goes away, one line when it is back, and a bounded wait for it
  (at most once per process) before results are written to an unsynced record.
- `redact` / `scrub`: no password or token from a URL or the environment in a message, param or record.
"""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode

from tracking import keys

log = logging.getLogger(__name__)

T = TypeVar("T")


# How long a configuration that has lost the tracking store waits for it before keeping its results
# locally (a server restart takes a few seconds). Waited at most once per process.
GRACE_ENV = "MNIST_TRACKING_GRACE_SECONDS"
DEFAULT_GRACE_SECONDS = 30.0
PROBE_SECONDS = 1.0

BUSY_ATTEMPTS = 6  # 0.25 + 0.5 + 1 + 2 + 4 s of backoff: a lock held longer than that is not "busy"
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]+)@")


def set_http_defaults() -> None:
    """Short retries and timeouts for MLflow's HTTP client, unless the user set their own."""
    for name, value in keys.MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def redact(uri: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://user:***@host/...`: never print or log a password."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def scrub(text: str) -> str:
    """`text` with every `://user:secret@` password and the value of any secret variable replaced by ***."""
    text = _URL_PASSWORD.sub(lambda match: f"{match['scheme']}{match['user']}:***@", text)
    for name in SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def short(error: BaseException, limit: int = 200) -> str:
    """The error in one scrubbed line of at most `limit` characters, for a log message."""
    lines = str(error).strip().splitlines()
    text = scrub(lines[0] if lines else type(error).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_busy(error: BaseException) -> bool:
    """A SQLite store locked by another writer, or a store asking to try again later."""
    if not isinstance(error, MlflowException):
        return False
    return error.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE) or "database is locked" in str(error)


def is_unreachable(error: BaseException) -> bool:
    """An error that means the store can't be reached now (connection refused, timeout, a 5xx, a lock).

    A rejected request (bad parameter, a run that does not exist) is not: that is a bug to see, not an
    outage to wait out.
    """
    if isinstance(error, (requests.RequestException, ConnectionError, TimeoutError, urllib.error.URLError)):
        return True
    if isinstance(error, MlflowException):
        text = str(error)
        if "failed with exception" in text or "failed with timeout exception" in text:
            return True  # MLflow's HTTP client gave up: refused, reset, timed out, 5xx after its retries
        if "failed with error code" in text:  # a non-JSON error page, e.g. from a proxy in front
            return error.get_http_status_code() >= 500
        return is_busy(error)
    return False


def with_retry(function: Callable[..., T], *args, **kwargs) -> T:
    """`function(*args, **kwargs)`, retried with backoff while the store reports itself busy."""
    delay = 0.25
    for attempt in range(1, BUSY_ATTEMPTS + 1):
        try:
            return function(*args, **kwargs)
        except MlflowException as error:
            if not is_busy(error) or attempt == BUSY_ATTEMPTS:
                raise
            log.info("Tracking store busy (%s); retrying in %.2f s", str(error).splitlines()[0][:120], delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class RetryingClient:
    """An MlflowClient whose every call goes through `with_retry`."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            return with_retry(attribute, *args, **kwargs)

        return call


def store_reachable(tracking_uri: str, timeout: float = 5.0) -> bool:
    """Whether the store answers now: a tracking server's /health, or any local store's experiment list."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
            return True
        except (OSError, urllib.error.URLError):
            return False
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)
        return True
    except Exception as error:  # noqa: BLE001 (any failure means: not reachable now)
        return not is_unreachable(error)


class Outage:
    """The state of this process's connection to the tracking store: one warning per outage."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.grace_used = False

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException, what: str) -> None:
        """Record a failed call; warn once, when the outage starts."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("Tracking store unreachable while %s (%s); results are buffered", what, short(error))

    def recovered(self, what: str) -> None:
        if self.down_since is not None:
            log.info("Tracking store reachable again after %.0f s; %s", time.monotonic() - self.down_since, what)
            self.down_since = None

    def wait(self, tracking_uri: str) -> bool:
        """Wait (once per process, up to $MNIST_TRACKING_GRACE_SECONDS) for the store; True if it is back."""
        if store_reachable(tracking_uri):
            return True
        if self.grace_used:
            return False
        self.grace_used = True
        grace = grace_seconds()
        if grace <= 0:
            return False
        log.warning("Waiting up to %.0f s for the tracking store %s to come back", grace, redact(tracking_uri))
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(PROBE_SECONDS)
            if store_reachable(tracking_uri):
                return True
        return False


def grace_seconds() -> float:
    """$MNIST_TRACKING_GRACE_SECONDS (a number >= 0), else the default."""
    text = os.environ.get(GRACE_ENV, "")
    try:
        value = float(text) if text else DEFAULT_GRACE_SECONDS
    except ValueError:
        log.warning("%s=%r is not a number; using %.0f s", GRACE_ENV, text, DEFAULT_GRACE_SECONDS)
        return DEFAULT_GRACE_SECONDS
    return value if value >= 0 else 0.0


outage = Outage()  # one per process: the CLI runs one command
