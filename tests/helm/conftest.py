"""Fixtures of the chart tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def make_namespace(kube: Any) -> Iterator[Callable[[], str]]:
    """Create fresh namespaces on demand (deleted afterwards)."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    made: list[str] = []

    def make() -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        made.append(name)
        return name

    yield make
    for name in made:
        with contextlib.suppress(client.ApiException):
            core.delete_namespace(name)
