"""S3 for the Jobs: every request retried with bounded backoff while S3 is unreachable or failing.

A Job must not lose an attempt (a GPU allocation, a model download, hours of training) to an S3 blip, so the trainer
and the merge Job reach S3 through :class:`RetryingStore`, a wrapper of :class:`langmerge.store.ObjectStore` (the
one S3 seam) with this contract:

* **Transient errors are retried**: the connection failed, was reset or timed out, or S3 answered 5xx, 408 or 429
  (``SlowDown``, ``InternalError``, ...). The call is repeated with exponential backoff (``initial_delay`` doubling
  up to ``max_delay``) until ``budget_seconds`` have passed since its first failure; then the last error is raised.
  boto3's own few quick retries happen inside each try.
* **Everything else is raised at once**: :class:`~langmerge.store.NotFound`,
  :class:`~langmerge.store.PreconditionFailed`, access denied, a missing bucket, a bad request.
* Every primitive (list, head, get, put, upload, ranged download, delete) is retried on its own; the composite
  operations of :class:`~langmerge.store.ObjectStore` (``put_json``, ``upload_dir``, ``download_prefix``, ...) are
  built on them, so a download resumes where the outage cut it.
* A conditional put whose response was lost may already have succeeded: its retry then raises ``PreconditionFailed``
  for the object it wrote itself. Callers that commit read the object back and recognise their own (the committed
  manifest names their attempt's own upload prefix).

The budget comes from ``LANGMERGE_S3_RETRY_SECONDS`` (default :data:`DEFAULT_BUDGET_SECONDS`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from langmerge.store import NotFound, ObjectInfo, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_BUDGET = "LANGMERGE_S3_RETRY_SECONDS"
#: How long one S3 call keeps being retried (seconds) unless ``LANGMERGE_S3_RETRY_SECONDS`` says otherwise.
DEFAULT_BUDGET_SECONDS = 300.0
#: S3 error codes that mean "try again later".
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)


def budget_from_env() -> float:
    """``LANGMERGE_S3_RETRY_SECONDS`` as a number of seconds (>= 0), else the default."""
    raw = os.environ.get(ENV_BUDGET, "").strip()
    if not raw:
        return DEFAULT_BUDGET_SECONDS
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %.0fs", ENV_BUDGET, raw, DEFAULT_BUDGET_SECONDS)
        return DEFAULT_BUDGET_SECONDS
    return max(0.0, value)


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(err: BaseException) -> bool:
    """Whether an S3 error may go away by itself (see the module's contract)."""
    if isinstance(err, NotFound | PreconditionFailed):
        return False
    for cause in _causes(err):
        if isinstance(cause, BotoConnectionError | HTTPClientError | ConnectionError | TimeoutError):
            return True
        if isinstance(cause, ClientError):
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            code = str(cause.response.get("Error", {}).get("Code", ""))
            return status >= 500 or status in (408, 429) or code in TRANSIENT_CODES
    return False


class RetryingStore(ObjectStore):
    """An :class:`ObjectStore` whose primitives retry transient errors for ``budget_seconds`` (see the module)."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        budget_seconds: float | None = None,
        initial_delay: float = 0.5,
        max_delay: float = 15.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner.client)
        self.inner = inner
        self.budget_seconds = budget_from_env() if budget_seconds is None else budget_seconds
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._clock = clock

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on transient errors until the budget is spent."""
        started: float | None = None
        delay = self.initial_delay
        while True:
            try:
                return fn()
            except Exception as err:
                if not is_transient(err):
                    raise
                now = self._clock()
                started = now if started is None else started
                left = self.budget_seconds - (now - started)
                if left <= 0:
                    log.error("S3 %s failed for %.0fs; giving up: %s", what, now - started, err)
                    raise
                wait = min(delay, left)
                log.warning("S3 %s failed (%s); retrying in %.1fs (%.0fs left)", what, _brief(err), wait, left)
                self._sleep(wait)
                delay = min(delay * 2, self.max_delay)

    # -- primitives, each retried on its own -----------------------------------------------------------------------
    def iter_objects(self, uri: str) -> Iterator[ObjectInfo]:
        yield from self.retry(f"list {uri}", lambda: list(self.inner.iter_objects(uri)))

    def head(self, uri: str) -> ObjectInfo | None:
        return self.retry(f"head {uri}", lambda: self.inner.head(uri))

    def get_bytes(self, uri: str) -> tuple[bytes, str]:
        return self.retry(f"get {uri}", lambda: self.inner.get_bytes(uri))

    def put_bytes(self, uri: str, data: bytes, **kwargs: Any) -> str:
        return self.retry(f"put {uri}", lambda: self.inner.put_bytes(uri, data, **kwargs))

    def upload_file(self, path: Path, uri: str) -> None:
        self.retry(f"upload {uri}", lambda: self.inner.upload_file(path, uri))

    def _download_resumable(
        self, bucket: str, obj: ObjectInfo, part: Path, progress: Callable[[str, int], None] | None = None
    ) -> None:
        # A retried download resumes from the bytes already in ``part`` (and reports progress from there).
        self.retry(
            f"download s3://{bucket}/{obj.key}",
            lambda: self.inner._download_resumable(bucket, obj, part, progress),
        )

    def delete(self, uri: str) -> None:
        self.retry(f"delete {uri}", lambda: self.inner.delete(uri))

    def delete_prefix(self, uri: str) -> int:
        return self.retry(f"delete {uri}/", lambda: self.inner.delete_prefix(uri))


def retrying(store: ObjectStore, budget_seconds: float | None = None) -> RetryingStore:
    """``store`` with retries (itself if it retries already)."""
    if isinstance(store, RetryingStore):
        return store
    return RetryingStore(store, budget_seconds=budget_seconds)


def _brief(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
