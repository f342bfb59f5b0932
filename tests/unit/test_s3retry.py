"""The Jobs' S3 retries (issue 12, item 2): transient errors are retried with backoff for a bounded time, others
raised at once. The inner store is a stand-in of our own S3 seam (``ObjectStore``) that fails as botocore does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from langmerge.store import NotFound, ObjectInfo, ObjectStore, PreconditionFailed, StoreError
from langmerge_trainer.s3retry import RetryingStore, budget_from_env, is_transient


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _wrapped(cause: BaseException) -> StoreError:
    try:
        raise StoreError(f"put failed: {cause}") from cause
    except StoreError as err:
        return err


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (EndpointConnectionError(endpoint_url="http://s3:9000"), True),
        (ReadTimeoutError(endpoint_url="http://s3:9000"), True),
        (ConnectionResetError(104, "reset"), True),
        (_wrapped(EndpointConnectionError(endpoint_url="http://s3:9000")), True),
        (_wrapped(_client_error(503, "SlowDown")), True),
        (_wrapped(_client_error(500, "InternalError")), True),
        (_client_error(429, "TooManyRequests"), True),
        (_wrapped(_client_error(403, "AccessDenied")), False),
        (_wrapped(_client_error(400, "InvalidRequest")), False),
        (NotFound("s3://b/k"), False),
        (PreconditionFailed("conditional put of s3://b/k lost"), False),
        (ValueError("bad"), False),
    ],
)
def test_what_is_transient(err: BaseException, transient: bool) -> None:
    assert is_transient(err) is transient


class FlakyStore(ObjectStore):
    """Our seam, failing its first ``failures`` calls of each primitive with ``error``."""

    def __init__(self, failures: int, error: BaseException) -> None:
        super().__init__(client=None)  # type: ignore[arg-type]
        self.failures = failures
        self.error = error
        self.calls: dict[str, int] = {}
        self.objects: dict[str, bytes] = {}

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.failures:
            raise self.error

    def put_bytes(self, uri: str, data: bytes, **kwargs: Any) -> str:
        self._call("put")
        if kwargs.get("if_none_match") and uri in self.objects:
            raise PreconditionFailed(uri)
        self.objects[uri] = data
        return "etag"

    def get_bytes(self, uri: str) -> tuple[bytes, str]:
        self._call("get")
        if uri not in self.objects:
            raise NotFound(uri)
        return self.objects[uri], "etag"

    def iter_objects(self, uri: str) -> Any:
        self._call("list")
        yield from (ObjectInfo(key=k, size=len(v), etag="e") for k, v in self.objects.items() if k.startswith(uri))

    def upload_file(self, path: Path, uri: str) -> None:
        self._call("upload")
        self.objects[uri] = path.read_bytes()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def _retrying(inner: ObjectStore, budget: float) -> tuple[RetryingStore, Clock]:
    clock = Clock()
    return RetryingStore(inner, budget_seconds=budget, sleep=clock.sleep, clock=clock), clock


def test_a_blip_costs_time_not_the_call(tmp_path: Path) -> None:
    inner = FlakyStore(3, EndpointConnectionError(endpoint_url="http://s3:9000"))
    store, clock = _retrying(inner, budget=60)
    path = tmp_path / "w"
    path.write_bytes(b"weights")
    store.upload_dir(tmp_path, "s3://b/adapter")  # composite operations retry through the primitives
    store.put_json("s3://b/m.json", {"a": 1}, if_none_match=True)
    assert store.get_json("s3://b/m.json") == {"a": 1}
    assert [o.key for o in store.iter_objects("s3://b/adapter")] == ["s3://b/adapter/w"]
    assert inner.calls == {"upload": 4, "put": 4, "get": 4, "list": 4}
    assert clock.sleeps[:3] == [0.5, 1.0, 2.0]  # exponential backoff per call


def test_an_outage_longer_than_the_budget_raises_the_last_error() -> None:
    inner = FlakyStore(1000, _wrapped(_client_error(503, "SlowDown")))
    store, clock = _retrying(inner, budget=30)
    with pytest.raises(StoreError, match="SlowDown"):
        store.put_bytes("s3://b/k", b"x")
    assert clock.now == pytest.approx(30) and max(clock.sleeps) <= 15
    assert inner.calls["put"] == len(clock.sleeps) + 1


def test_errors_that_cannot_heal_are_raised_at_once() -> None:
    inner = FlakyStore(1, _wrapped(_client_error(403, "AccessDenied")))
    store, clock = _retrying(inner, budget=60)
    with pytest.raises(StoreError, match="AccessDenied"):
        store.put_bytes("s3://b/k", b"x")
    inner.failures = 0
    with pytest.raises(NotFound):
        store.get_bytes("s3://b/missing")
    store.put_bytes("s3://b/k", b"x", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("s3://b/k", b"y", if_none_match=True)
    assert clock.sleeps == [] and inner.objects["s3://b/k"] == b"x"


def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGMERGE_S3_RETRY_SECONDS", "12.5")
    assert budget_from_env() == 12.5
    monkeypatch.setenv("LANGMERGE_S3_RETRY_SECONDS", "soon")
    assert budget_from_env() == 300.0
    monkeypatch.delenv("LANGMERGE_S3_RETRY_SECONDS")
    assert budget_from_env() == 300.0
