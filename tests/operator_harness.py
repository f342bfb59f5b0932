"""Helpers for the operator's integration tests: run the operator in-process, seed S3, and stand in for Job execution.

``SimulatedJobs`` plays the role of kubelet + the Job controller + the trainer for tests that exercise the operator's
logic quickly: it writes what a real training Job writes (adapter files, then the manifest; or a failure record) to
the real S3 server and reports the Job's status through the real API server's ``/status`` subresource. The real
trainer running under the local Job runner is covered by the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.artifacts import (
    AdapterManifest,
    Cost,
    FailureRecord,
    FileEntry,
    MergeInputRecord,
    MergeManifest,
    SearchCandidate,
    SearchRecord,
    Versions,
)
from langmerge.constants import API_VERSION, EXPERT_PLURAL, GROUP, MERGED_PLURAL, VERSION
from langmerge.store import ObjectStore, files_digest
from langmerge.tasks import MergeTask, TrainTask


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str | Callable[[], str] = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something true. ``what`` names the wait in the failure message (a
    callable is evaluated only then, e.g. to show the state that was waited on)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    described = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {described} (last value: {last!r})")


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def run_operator(
    namespace: str,
    artifacts_uri: str,
    *,
    kubeconfig: str | None = None,
    clusterwide: bool = False,
    also_watch: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
    **settings: Any,
) -> Iterator[Any]:
    """The real operator (kopf + our controller) in this process, watching one namespace.

    ``kubeconfig``: authenticate as another identity (default: ``$KUBECONFIG``, the admin); kopf and the controller
    read it at start-up. ``clusterwide``: watch every namespace (``--all-namespaces``, as ``langmerge run`` does
    without namespaces) instead of ``namespace``; ``also_watch``: more namespaces to watch beside it.
    ``extra_args``: more ``kopf run`` options, e.g. ``--liveness URL``.
    """
    from kopf.testing import KopfRunner

    values = {
        "LANGMERGE_ARTIFACTS_URI": artifacts_uri,
        "LANGMERGE_S3_ENDPOINT": os.environ["LANGMERGE_S3_ENDPOINT"],
        "LANGMERGE_METRICS_PORT": "0",
        "LANGMERGE_RESYNC_SECONDS": "5",
        "LANGMERGE_PROGRESS_SECONDS": "0.5",
        "LANGMERGE_TRAINER_IMAGE": "langmerge/trainer:test",
    }
    if not clusterwide:
        values["LANGMERGE_NAMESPACES"] = namespace  # what `langmerge run --namespace` sets
    values.update({f"LANGMERGE_{k.upper()}": str(v) for k, v in settings.items()})
    if kubeconfig:
        values["KUBECONFIG"] = kubeconfig
    if "uri_grants" not in settings:
        # The tests' objects use URIs anywhere in their bucket: grant it to every namespace (the URI policy's own
        # tests pass their grants).
        bucket = artifacts_uri.removeprefix("s3://").split("/", 1)[0]
        values["LANGMERGE_URI_GRANTS"] = json.dumps({"*": {"readWrite": [f"s3://{bucket}/"]}})
    where = ["--all-namespaces"] if clusterwide else [a for ns in (namespace, *also_watch) for a in ("--namespace", ns)]
    with (
        env(**values),
        KopfRunner(
            ["run", "--standalone", *where, *extra_args, "-m", "langmerge.controller.main"], timeout=60
        ) as runner,
    ):
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def create_s3_secret(kube: Any, namespace: str, name: str = "langmerge-s3") -> None:
    """The S3 Secret the operator's Jobs read, as the README says to create it in each namespace."""
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        },
    }
    client.CoreV1Api(kube).create_namespaced_secret(namespace, body)


def custom(kube: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def apply_expert(
    kube: Any, namespace: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Create, or replace the spec of, a LanguageExpert (like ``kubectl apply``)."""
    api = custom(kube)
    body = {
        "apiVersion": API_VERSION,
        "kind": "LanguageExpert",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }
    try:
        return dict(api.create_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, body))
    except ApiException as err:
        if err.status != 409:
            raise
    return _replace(api, namespace, EXPERT_PLURAL, name, spec, labels or {})


def _replace(
    api: client.CustomObjectsApi,
    namespace: str,
    plural: str,
    name: str,
    spec: dict[str, Any],
    labels: dict[str, str] | None,
) -> dict[str, Any]:
    """Replace the spec (fields left out fall back to their defaults), retrying when the status moved meanwhile."""
    for _ in range(20):
        current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        current["spec"] = spec
        if labels is not None:
            current["metadata"]["labels"] = labels
        try:
            return dict(api.replace_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, current))
        except ApiException as err:
            if err.status != 409:
                raise
    raise AssertionError(f"could not replace {plural}/{name}: conflicts")


def apply_merged(kube: Any, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    api = custom(kube)
    body = {"apiVersion": API_VERSION, "kind": "MergedModel", "metadata": {"name": name}, "spec": spec}
    try:
        return dict(api.create_namespaced_custom_object(GROUP, VERSION, namespace, MERGED_PLURAL, body))
    except ApiException as err:
        if err.status != 409:
            raise
    return _replace(api, namespace, MERGED_PLURAL, name, spec, None)


def get_expert(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, name))


def get_merged(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, MERGED_PLURAL, name))


def status_of(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj.get("status") or {})


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status_of(obj).get("conditions", []) if c["type"] == type_), None)


def jobs(kube: Any, namespace: str, selector: str = "app.kubernetes.io/managed-by=langmerge") -> list[Any]:
    return list(client.BatchV1Api(kube).list_namespaced_job(namespace, label_selector=selector).items)


def events(kube: Any, namespace: str, name: str) -> list[Any]:
    items = client.CoreV1Api(kube).list_namespaced_event(namespace).items
    return [e for e in items if e.involved_object.name == name]


def put_jsonl(store: ObjectStore, uri: str, rows: list[dict[str, Any]]) -> None:
    store.put_bytes(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def seed_fake_base_model(store: ObjectStore, uri: str) -> None:
    """A stand-in base model folder for tests whose Jobs are simulated (only its listing digest matters)."""
    store.put_bytes(artifacts.join(uri, "config.json"), b'{"model_type": "llama"}')
    store.put_bytes(artifacts.join(uri, "model.safetensors"), b"weights")


#: A small dialog dataset: what the tests' experts train on (``put_jsonl`` it under ``s3://<bucket>/data/<lang>``).
DIALOG_ROWS = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)]


def _with(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``overrides`` replacing its top-level keys; an override of ``None`` drops the key."""
    spec.update(overrides)
    return {k: v for k, v in spec.items() if v is not None}


def dialog_expert(bucket: str, lang: str, **overrides: Any) -> dict[str, Any]:
    """A LanguageExpert spec for the "dialog" task: base model ``s3://<bucket>/base``, data
    ``s3://<bucket>/data/<lang>``, LoRA rank 4, no GPU. ``overrides`` replace top-level keys (e.g.
    ``baseModel={"uri": ...}``, ``dataset={"uri": ...}``, ``retry={...}``); ``None`` drops a key."""
    spec: dict[str, Any] = {
        "language": lang,
        "task": "dialog",
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "dataset": {"uri": f"s3://{bucket}/data/{lang}"},
        "lora": {"rank": 4},
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 1},
        "resources": {"gpus": 0},
    }
    return _with(spec, overrides)


def dialog_merged(bucket: str, **overrides: Any) -> dict[str, Any]:
    """A MergedModel spec that ties-merges every expert labelled ``task=dialog`` over ``s3://<bucket>/base`` into
    ``s3://<bucket>/merged/dialog``. ``overrides`` replace top-level keys; ``None`` drops a key."""
    spec: dict[str, Any] = {
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "experts": {"selector": {"matchLabels": {"task": "dialog"}}},
        "method": "ties",
        "parameters": {"density": 1.0},
        "output": {"uri": f"s3://{bucket}/merged/dialog"},
        "settleSeconds": 1,
    }
    return _with(spec, overrides)


#: The merge engine's message for an adapter beyond output.maxRelativeError (simulated "fail-bound" merges).
REFACTOR_BOUND_MESSAGE = (
    "the ties merge cannot be written as a PEFT adapter within output.maxRelativeError 0.01: module "
    "model.layers.1.self_attn.q_proj has relative error 0.151 at output.rank 8; 8 of 9 modules exceed the bound. Use "
    "output.format: full-weights (exact), raise output.rank (or use rank auto), or accept a larger "
    "output.maxRelativeError"
)

Behaviour = Callable[[Any, str], str]
"""(job, fingerprint) -> "succeed" | "succeed-on-read-data" | "fail" | "fail-bound" | "fail-silently" | "collapse" |
"hang".

"collapse" is a training Job whose adapter collapsed: the trainer commits nothing and records ``Collapsed`` with the
seed the attempt used (spec seed + 1000 per earlier collapsed attempt, from the failure records in S3).

"succeed-on-read-data" is a training Job that finds the data changed since the operator listed it: it commits the
adapter of the data as it is now under that data's fingerprint and leaves a ``DataChanged`` record, as the trainer
does."""


@dataclass
class SimulatedJobs:
    """Runs the operator's Jobs in a namespace by writing what the trainer would write, then patching Job status."""

    kube: Any
    store: ObjectStore
    namespace: str
    behaviour: Behaviour = lambda job, fp: "succeed"
    #: Seconds a Job stays active before it finishes.
    duration: float = 0.3
    #: Eval loss of the merged model per language in simulated merges (default 2.05 vs the experts' 2.0).
    merge_losses: dict[str, float] = field(default_factory=dict)
    #: Eval loss of the base model per language in simulated merges (default 5.0: above every planted merge loss).
    base_losses: dict[str, float] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    max_active_seen: int = 0
    #: Carry on through an API server that does not answer (a fault-injection test stops it on purpose).
    outage_tolerant: bool = False
    #: The files of a simulated merge's ``model/`` folder (name -> bytes), e.g. a real tiny model for a real model
    #: server to load; default: one stand-in adapter file.
    merge_files: Callable[[MergeTask], dict[str, bytes]] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _starts: dict[str, float] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)

    def __enter__(self) -> SimulatedJobs:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        assert not self.errors, self.errors

    def _loop(self) -> None:
        batch = client.BatchV1Api(self.kube)
        while not self._stop.is_set():
            try:
                items = batch.list_namespaced_job(
                    self.namespace, label_selector="app.kubernetes.io/managed-by=langmerge"
                ).items
                active = 0
                for job in items:
                    name = job.metadata.name
                    if name in self._done or job.metadata.deletion_timestamp:
                        continue
                    if name not in self._starts:
                        self._starts[name] = time.monotonic()
                        self.started.append(name)
                        self._patch(batch, name, {"startTime": now(), "active": 1})
                    fp = job.metadata.labels.get("langmerge.dev/fingerprint", "")
                    mode = self.behaviour(job, fp)
                    if mode == "hang" or time.monotonic() - self._starts[name] < self.duration:
                        active += 1
                        continue
                    self._finish(batch, job, mode)
                    self._done.add(name)
                self.max_active_seen = max(self.max_active_seen, active)
            except ApiException as err:
                if err.status != 404 and not (self.outage_tolerant and (err.status or 0) in (0, 500, 503)):
                    self.errors.append(err)
            except BaseException as err:  # surfaced in __exit__
                if not (self.outage_tolerant and isinstance(err, urllib3.exceptions.HTTPError | OSError)):
                    self.errors.append(err)
            time.sleep(0.05)

    def _patch(self, batch: client.BatchV1Api, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiException):
            batch.patch_namespaced_job_status(name, self.namespace, {"status": status})

    def _finish(self, batch: client.BatchV1Api, job: Any, mode: str) -> None:
        args = job.spec.template.spec.containers[0].args
        verb, task_json = args[0], args[args.index("--task") + 1]
        if mode in ("succeed", "succeed-on-read-data"):
            if mode == "succeed-on-read-data":
                write_adapter_of_read_data(self.store, TrainTask.model_validate_json(task_json))
            elif verb == "train":
                write_fake_adapter(self.store, TrainTask.model_validate_json(task_json))
            else:
                write_fake_merge(
                    self.store,
                    MergeTask.model_validate_json(task_json),
                    self.merge_losses,
                    self.base_losses,
                    self.merge_files,
                )
            cond = {"type": "Complete", "status": "True", "lastTransitionTime": now()}
            self._patch(
                batch, job.metadata.name, {"active": 0, "succeeded": 1, "completionTime": now(), "conditions": [cond]}
            )
            return
        task_fp = json.loads(task_json)["fingerprint"]
        prefix = json.loads(task_json)["output_uri"]
        attempt = json.loads(task_json).get("attempt", 1)
        if mode == "fail":
            record = FailureRecord(
                fingerprint=task_fp,
                error_class="DataError",
                message="data.jsonl line 3: missing 'completion'",
                retryable=True,
                attempt=attempt,
            )
            self.store.put_json(artifacts.failure_uri(prefix, attempt), record, if_none_match=True)
        if mode == "collapse":  # what the trainer records when the adapter it trained collapsed
            task = TrainTask.model_validate_json(task_json)
            seed = training_seed(self.store, task)
            record = FailureRecord(
                fingerprint=task_fp,
                error_class=artifacts.COLLAPSED,
                message=f"the trained adapter collapsed on its eval split with seed {seed}: predicts money for 10 of "
                f"10 inputs (100%); it was not committed (a retry trains with seed {seed + artifacts.RESEED_STEP})",
                retryable=True,
                attempt=attempt,
                seed=seed,
            )
            self.store.put_json(artifacts.failure_uri(prefix, attempt), record)
        if mode == "fail-bound":  # what the merge engine reports when a PEFT adapter cannot meet the error bound
            record = FailureRecord(
                fingerprint=task_fp,
                error_class="RefactorBoundExceeded",
                message=REFACTOR_BOUND_MESSAGE,
                retryable=False,
                attempt=attempt,
            )
            self.store.put_json(artifacts.failure_uri(prefix, attempt), record, if_none_match=True)
        cond = {
            "type": "Failed",
            "status": "True",
            "reason": "BackoffLimitExceeded",
            "message": "Job has reached the specified backoff limit",
            "lastTransitionTime": now(),
        }
        self._patch(batch, job.metadata.name, {"active": 0, "failed": 1, "conditions": [cond]})


def training_seed(store: ObjectStore, task: TrainTask) -> int:
    """The seed the trainer trains ``task``'s attempt with (from the failure records of its earlier attempts)."""
    from langmerge.controller.attempts import failure_records

    return artifacts.attempt_seed(task.spec.training.seed, failure_records(store, task.output_uri), task.attempt)


def write_fake_adapter(
    store: ObjectStore, task: TrainTask, eval_loss: float = 2.0, requested_fingerprint: str | None = None
) -> AdapterManifest:
    """Commit an adapter the way the trainer does: files first, manifest last (conditional)."""
    adapter = artifacts.adapter_uri(task.output_uri)
    payload = f"adapter {task.fingerprint}".encode()
    store.put_bytes(artifacts.join(adapter, "adapter_model.safetensors"), payload)
    store.put_bytes(artifacts.join(adapter, "adapter_config.json"), b"{}")
    import hashlib

    files = {
        "adapter_model.safetensors": (len(payload), hashlib.sha256(payload).hexdigest()),
        "adapter_config.json": (2, hashlib.sha256(b"{}").hexdigest()),
    }
    manifest = AdapterManifest(
        fingerprint=task.fingerprint,
        namespace=task.namespace,
        name=task.name,
        language=task.spec.language,
        task=task.spec.task,
        base_model=task.base_model,
        data_digest=task.data_digest,
        adapter_uri=adapter,
        adapter_digest=files_digest(files),
        files={k: FileEntry(size=s, sha256=h) for k, (s, h) in files.items()},
        lora=task.spec.lora.model_dump(mode="json"),
        training=task.spec.training.model_dump(mode="json"),
        labels=task.spec.labels if task.spec.is_classifier else None,
        label_counts=_label_counts(store, task) if task.spec.is_classifier else None,
        metrics=Metrics(eval_loss=eval_loss, perplexity=7.39, token_accuracy=0.4, exact_match=0.1, examples=10),
        examples_train=90,
        examples_eval=10,
        tokens_trained=5000,
        steps=12,
        cost=Cost(wall_seconds=1.5, cpu_seconds=1.4),
        versions=Versions(langmerge="test"),
        started_at=now(),
        finished_at=now(),
        requested_fingerprint=requested_fingerprint,
        seed=training_seed(store, task),
        init_adapter={"uri": task.init_adapter.uri, "digest": task.init_adapter.digest} if task.init_adapter else None,
    )
    store.put_json(artifacts.join(task.output_uri, artifacts.MANIFEST), manifest, if_none_match=True)
    return manifest


def _label_counts(store: ObjectStore, task: TrainTask) -> dict[str, int]:
    """A classifier's examples per label in its data (every ``*.jsonl`` under the dataset URI), as the trainer records
    them (the simulation does not split off an eval share)."""
    counts = dict.fromkeys(task.spec.labels or [], 0)
    bucket = task.spec.dataset.uri.removeprefix("s3://").split("/", 1)[0]
    for info in store.list_objects(task.spec.dataset.uri):
        if not info.key.endswith(".jsonl"):
            continue
        for line in store.get_bytes(f"s3://{bucket}/{info.key}")[0].decode().splitlines():
            if line.strip():
                label = json.loads(line)["label"]
                counts[label] = counts.get(label, 0) + 1
    return counts


def write_adapter_of_read_data(store: ObjectStore, task: TrainTask) -> AdapterManifest:
    """What the trainer does when the data changed after the operator listed it: it trains on the data as it is
    now, commits under that data's fingerprint (a sibling prefix) and leaves a DataChanged record for the attempt."""
    from langmerge.fingerprint import training_fingerprint

    digest, _count = store.prefix_digest(task.spec.dataset.uri, suffix=".jsonl")
    fingerprint = training_fingerprint(
        task.spec,
        base_model_digest=task.base_model.digest,
        data_digest=digest,
        eval_data_digest=None,
        image=task.image or "",
    )
    assert fingerprint != task.fingerprint, "the data did not change"
    moved = task.model_copy(
        update={
            "fingerprint": fingerprint,
            "output_uri": artifacts.sibling_prefix(task.output_uri, fingerprint),
            "data_digest": digest,
        }
    )
    raw = store.get_json_or_none(artifacts.join(moved.output_uri, artifacts.MANIFEST))
    if raw is not None:
        manifest = AdapterManifest.model_validate(raw)
    else:
        manifest = write_fake_adapter(store, moved, requested_fingerprint=task.fingerprint)
    record = FailureRecord(
        fingerprint=task.fingerprint,
        error_class=artifacts.DATA_CHANGED,
        message=f"the data changed after the operator listed it: digest {task.data_digest} when listed, {digest} "
        f"when read; the adapter of the data read is fingerprint {fingerprint}",
        retryable=True,
        attempt=task.attempt,
    )
    store.put_json(artifacts.failure_uri(task.output_uri, task.attempt), record)
    return manifest


def write_fake_merge(
    store: ObjectStore,
    task: MergeTask,
    merged_loss: dict[str, float] | None = None,
    base_losses: dict[str, float] | None = None,
    files: Callable[[MergeTask], dict[str, bytes]] | None = None,
) -> MergeManifest:
    model = artifacts.merged_model_uri(task.output_uri)
    contents = files(task) if files else {"adapter_model.safetensors": f"merged {task.fingerprint}".encode()}
    for name, body in contents.items():
        store.put_bytes(artifacts.join(model, name), body)
    losses = merged_loss or {}
    adapter = task.output.format == "peft-adapter"
    search = None
    method, parameters = task.method, task.parameters
    if task.search is not None:  # as the trainer records a search: the chosen candidate is what was merged
        languages = [i.language for i in task.inputs]
        chosen_parameters = {
            **task.parameters,
            "weights": {lang: 1.5 if i == 0 else 1.0 for i, lang in enumerate(languages)},
        }
        chosen = SearchCandidate(
            method="linear", parameters=chosen_parameters, objective=-0.01, relative=dict.fromkeys(languages, -0.01)
        )
        default = SearchCandidate(method=task.method, parameters=task.parameters, objective=-0.04)
        search = SearchRecord(
            objective=str(task.search.objective),
            metric=str(task.evaluation.metric),
            candidates=7,
            seconds=1.0,
            stopped="exhausted",
            chosen=chosen,
            default=default,
            top=[chosen, default],
        )
        method, parameters = chosen.method, chosen.parameters
    manifest = MergeManifest(
        fingerprint=task.fingerprint,
        namespace=task.namespace,
        name=task.name,
        method=method,
        parameters=parameters,
        # a PEFT adapter output, as the engine reports it: each module's error and rank
        module_errors={"model.layers.0.self_attn.q_proj": 0.0042, "model.layers.0.self_attn.v_proj": 0.0}
        if adapter
        else {},
        module_ranks={"model.layers.0.self_attn.q_proj": 40, "model.layers.0.self_attn.v_proj": 12} if adapter else {},
        search=search,
        inputs=[
            MergeInputRecord(
                expert=i.expert,
                language=i.language,
                adapter_uri=i.adapter_uri,
                adapter_digest=i.adapter_digest,
                weight=i.weight,
            )
            for i in task.inputs
        ],
        base_model=task.base_model,
        output_format=task.output.format,
        model_uri=model,
        model_digest=task.fingerprint,
        files={},
        evaluation={i.language: Metrics(eval_loss=losses.get(i.language, 2.05)) for i in task.inputs},
        expert_metrics={i.language: i.expert_metrics or Metrics(eval_loss=2.0) for i in task.inputs},
        base_metrics={i.language: Metrics(eval_loss=(base_losses or {}).get(i.language, 5.0)) for i in task.inputs},
        cost=Cost(wall_seconds=0.5, cpu_seconds=0.4),
        versions=Versions(langmerge="test"),
        started_at=now(),
        finished_at=now(),
    )
    store.put_json(artifacts.join(task.output_uri, artifacts.MANIFEST), manifest, if_none_match=True)
    return manifest
