"""Shared fixtures: the real local control plane (kube-apiserver + etcd + SeaweedFS S3), clients, tiny models.

Session-scoped: one control plane per test session (``LANGMERGE_TEST_STATE`` may point at a folder to reuse between
runs; otherwise a temporary folder). Tests get their own namespace and bucket, so they never see each other's objects.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from langmerge.dev.controlplane import ControlPlane, Endpoints
from langmerge.store import ObjectStore, S3Config

ROOT = Path(__file__).resolve().parent.parent
#: Every server a test starts ends with the run (SIGINT, SIGTERM, SIGKILL included).
pytest_plugins = ["lifeline_plugin"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        parts = path.relative_to(ROOT / "tests").parts if path.is_relative_to(ROOT / "tests") else ()
        if parts and parts[0] in ("integration", "e2e"):
            item.add_marker(pytest.mark.integration)
        if parts and parts[0] in ("trainer", "merge"):
            item.add_marker(pytest.mark.trainer)
        if parts and parts[0] == "gpu":
            item.add_marker(pytest.mark.gpu)
    if any(item.get_closest_marker("gpu") for item in items):
        reason = _gpu_skip_reason()
        if reason:
            for item in items:
                if item.get_closest_marker("gpu"):
                    item.add_marker(pytest.mark.skip(reason=reason))


def _gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device: GPU tests run only where a GPU is present"
    return None


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The real local control plane of this test session (started by ``control_plane``). Fault-injection tests stop
    and restart its components (``stop_component("seaweedfs")``, then ``start()``: same ports, same data)."""
    state = os.environ.get("LANGMERGE_TEST_STATE")
    state_dir = Path(state) if state else tmp_path_factory.mktemp("controlplane")
    cp = ControlPlane(state_dir)
    try:
        yield cp
    finally:
        if not state:
            cp.stop()


@pytest.fixture(scope="session")
def control_plane(local_cluster: ControlPlane) -> Iterator[Endpoints]:
    """The real local control plane with the CRDs installed. Environment variables point clients at it."""
    t0 = time.monotonic()
    endpoints = local_cluster.start()
    print(f"\nlocal control plane ready in {time.monotonic() - t0:.1f}s ({local_cluster.dir})")
    saved = {k: os.environ.get(k) for k in endpoints.env()}
    os.environ.update(endpoints.env())
    from langmerge.kube import install_crds, load_client

    install_crds(load_client(endpoints.kubeconfig))
    try:
        yield endpoints
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3(control_plane: Endpoints) -> ObjectStore:
    """An object store client on the local S3 server."""
    return ObjectStore.from_config(
        S3Config(endpoint_url=control_plane.s3_endpoint),
        aws_access_key_id=control_plane.s3_access_key,
        aws_secret_access_key=control_plane.s3_secret_key,
    )


@pytest.fixture
def bucket(s3: ObjectStore) -> Iterator[str]:
    """A fresh, empty bucket for one test, deleted afterwards (SeaweedFS gives each bucket its own volumes, and a
    server has only so many: a long session would run out)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(Exception):  # best effort: a test may have stopped S3 and failed
        s3.delete_prefix(f"s3://{name}")
        s3.client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def kube(control_plane: Endpoints) -> Any:
    """A kubernetes ApiClient authenticated as the local cluster's admin."""
    from langmerge.kube import load_client

    return load_client(control_plane.kubeconfig)


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    """A fresh namespace for one test (deleted afterwards), with the S3 Secret the operator's Jobs read."""
    from kubernetes import client

    from operator_harness import create_s3_secret

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    create_s3_secret(kube, name)
    yield name
    with contextlib.suppress(client.ApiException):
        core.delete_namespace(name)


@pytest.fixture
def make_namespace(kube: Any) -> Iterator[Callable[[], str]]:
    """Create more fresh namespaces on demand, each with the S3 Secret (deleted afterwards)."""
    from kubernetes import client

    from operator_harness import create_s3_secret

    core = client.CoreV1Api(kube)
    made: list[str] = []

    def make() -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        create_s3_secret(kube, name)
        made.append(name)
        return name

    yield make
    for name in made:
        with contextlib.suppress(client.ApiException):
            core.delete_namespace(name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-style causal LM (2 layers, 64 wide) with a BPE tokenizer trained on the sample text."""
    from langmerge_trainer.sample import build_tiny_llama, sample_texts

    out = tmp_path_factory.mktemp("tiny-llama")
    return build_tiny_llama(out, sample_texts(["es", "it", "pt"]))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Counts by kind, so a run shows that the integration tests really ran (not skipped) against the real servers."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            keywords = getattr(report, "keywords", {})
            for kind in ("integration", "trainer", "e2e", "gpu"):
                if kind in keywords:
                    counts.setdefault(kind, {}).setdefault(outcome, 0)
                    counts[kind][outcome] += 1
    if counts:
        terminalreporter.write_sep("-", "tests by kind")
        for kind, by_outcome in sorted(counts.items()):
            summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(by_outcome.items()))
            terminalreporter.write_line(f"{kind}: {summary}")
