"""API plumbing of the local Job runner: which errors are worth a retry, error messages (watch streams:
:mod:`langmerge.dev.watching`)."""

from __future__ import annotations

import contextlib
import json

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


class _Gone(Exception):
    """The Job was deleted (or replaced by another with the same name)."""


class _Cancelled(Exception):
    """The worker was told to stop."""
