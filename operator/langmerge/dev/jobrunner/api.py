"""API plumbing of the local Job runner: which errors are worth a retry, error messages, watch streams."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException


def _transient(err: BaseException) -> bool:
    """Worth retrying: the API server is unreachable, restarting or overloaded."""
    if isinstance(err, ApiException):
        return err.status in (None, 0, 408, 429) or int(err.status) >= 500
    return isinstance(err, urllib3.exceptions.HTTPError | OSError | json.JSONDecodeError)


def _api_message(err: ApiException) -> str:
    with contextlib.suppress(ValueError, TypeError):
        return str(json.loads(err.body)["message"])
    return f"{err.status} {err.reason}"


def _iter_lines(resp: Any) -> Iterator[bytes]:
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class _Gone(Exception):
    """The Job was deleted (or replaced by another with the same name)."""


class _Cancelled(Exception):
    """The worker was told to stop."""
