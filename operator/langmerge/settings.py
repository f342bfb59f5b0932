"""Operator settings: one frozen object read from the environment at start-up (``LANGMERGE_*`` variables)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from langmerge.references import ImageError, parse_image, parse_quantity
from langmerge.store import S3Config
from langmerge.tenancy import (
    DEFAULT_NAMESPACE_PREFIX,
    ENFORCE,
    OFF,
    Access,
    UriError,
    UriPolicy,
    parse_grants,
    uri_segments,
)


class SettingsError(ValueError):
    pass


#: Training runtimes (``spec.runtime`` of a LanguageExpert, ``LANGMERGE_TRAINING_RUNTIME``).
RUNTIMES = ("job", "trainjob")
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class Settings:
    """Everything the operator is configured with. Each field maps to ``LANGMERGE_<FIELD>`` in upper case."""

    #: Namespaces to watch (comma-separated); empty watches the whole cluster.
    namespaces: tuple[str, ...] = ()
    #: Root of the expert artifacts: ``s3://bucket/prefix``.
    artifacts_uri: str = "s3://langmerge/artifacts"
    #: S3 endpoint for S3-compatible stores (empty for AWS).
    s3_endpoint: str = ""
    #: S3 region.
    s3_region: str = "us-east-1"
    #: Name of the Secret (in each custom resource's namespace) holding the S3 credentials Jobs use.
    s3_secret_name: str = "langmerge-s3"
    #: Key of the access key id inside that Secret.
    s3_secret_access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    #: Key of the secret access key inside that Secret.
    s3_secret_secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    #: Trainer image used by training and merge Jobs unless a custom resource names another.
    trainer_image: str = "langmerge/trainer:0.1.0"
    #: Image pull policy of the Jobs.
    image_pull_policy: str = "IfNotPresent"
    #: Extended resource name of a GPU unless the spec names another.
    gpu_resource_name: str = "nvidia.com/gpu"
    #: Most training Jobs running at once, operator-wide; the rest wait in phase Pending.
    max_training_jobs: int = 4
    #: Most merge Jobs running at once, operator-wide.
    max_merge_jobs: int = 2
    #: Most training Jobs running at once in one namespace (0: only the operator-wide cap), so that one namespace
    #: cannot hold every training slot.
    max_training_jobs_per_namespace: int = 2
    #: Most merge Jobs running at once in one namespace (0: only the operator-wide cap).
    max_merge_jobs_per_namespace: int = 1
    #: Largest CPU request of one Job (a Kubernetes quantity); larger specs are refused before a Job is created.
    max_job_cpu: str = "256"
    #: Largest memory request of one Job (a Kubernetes quantity).
    max_job_memory: str = "4Ti"
    #: Registries (or ``registry/path`` prefixes) the Jobs' images may come from, comma-separated; ``*`` allows any.
    #: Empty: the registry of ``trainer_image``.
    allowed_registries: tuple[str, ...] = ()
    #: Check that the S3 Secret exists in a namespace (by name, metadata only) before creating a Job there.
    check_s3_secret: bool = True
    #: ``enforce``: every S3 URI in a spec must be under a prefix its namespace may use; ``off``: single-tenant
    #: clusters, any URI (see :mod:`langmerge.tenancy`).
    uri_policy: str = ENFORCE
    #: The default rule: the prefix every namespace may read and write, a template with ``{artifactsUri}`` and
    #: ``{namespace}``; empty: no default rule (grants only).
    namespace_prefix: str = DEFAULT_NAMESPACE_PREFIX
    #: Prefixes granted per namespace, JSON: ``{"team-a": {"read": ["s3://shared/models/"], "readWrite": [...]},
    #: "*": {"read": [...]}}`` (``*``: every namespace).
    uri_grants: tuple[tuple[str, Access, str], ...] = ()
    #: Pod-level retries inside one Job (e.g. node loss; the trainer resumes from its checkpoint).
    job_backoff_limit: int = 1
    #: Seconds a finished Job is kept before Kubernetes deletes it (S3 keeps the record).
    job_ttl_seconds: int = 7 * 86400
    #: Keep a training run's resumable checkpoints in S3 after its adapter is committed (default: delete them then).
    keep_checkpoints: bool = False
    #: Kueue LocalQueue of the Jobs and TrainJobs (empty: no Kueue). With a queue they are created suspended with the
    #: ``kueue.x-k8s.io/queue-name`` label; Kueue admits (unsuspends) them. One waiting for admission shows as
    #: "Queued (Kueue)" and does not count toward ``max_training_jobs``/``max_merge_jobs``.
    kueue_queue: str = ""
    #: Kubeflow Trainer is installed: the operator may create, watch and delete ``trainer.kubeflow.org`` TrainJobs
    #: (the chart's ``trainJob.enabled`` grants the RBAC). Off: a spec asking for ``runtime: trainjob`` is refused.
    trainjobs: bool = False
    #: KServe is installed: the operator may get and patch ``serving.kserve.io`` InferenceServices to roll published
    #: revisions out (the chart's ``serving.kserve.enabled`` grants the RBAC). Off: a spec with a ``kserve`` serving
    #: target is refused.
    kserve: bool = False
    #: Seconds between looks at an InferenceService while a rollout (canary, promotion, rollback) is in progress.
    serving_poll_seconds: float = 5.0
    #: What runs an expert's training unless its ``spec.runtime`` says: ``job`` (a batch/v1 Job; ``resources.gpus`` > 1
    #: runs one process per GPU in its pod) or ``trainjob`` (a Kubeflow Trainer TrainJob, one pod per node; needs
    #: ``trainjobs``).
    training_runtime: str = "job"
    #: The ClusterTrainingRuntime a TrainJob's ``runtimeRef`` names (a torch runtime: it injects torchrun's
    #: ``PET_*`` variables).
    trainjob_runtime: str = "torch-distributed"
    #: ServiceAccount of the Jobs' pods (empty: the namespace's default).
    job_service_account: str = ""
    #: Seconds between reconciles of an idle custom resource (a safety net; changes are event-driven).
    resync_seconds: float = 60.0
    #: Seconds between progress reads while a Job runs.
    progress_seconds: float = 10.0
    #: Entries kept in status.history.
    history_limit: int = 20
    #: Delete an expert's S3 artifacts when the expert is deleted (default: keep them, they are data).
    delete_artifacts_with_expert: bool = False
    #: Namespace of the leader-election Lease (the chart sets the operator's own namespace); empty: no election,
    #: this process always reconciles (one replica only).
    leader_election_namespace: str = ""
    #: Name of that Lease: replicas sharing it elect one leader; two releases in one namespace need two names.
    leader_election_lease_name: str = "langmerge-operator"
    #: Port of the Prometheus metrics endpoint (0 disables it).
    metrics_port: int = 9090
    #: Threads for blocking Kubernetes and S3 calls.
    workers: int = 16
    #: Seconds any one Kubernetes or S3 request may take (S3: per read; connecting gets at most 5 s).
    request_timeout_seconds: float = 30.0
    #: Seconds between S3 health probes: an outage shows on every object, and objects waiting for S3 run as soon as
    #: a probe succeeds.
    storage_probe_seconds: float = 2.0
    #: Seconds between full listings of the operator's Jobs (the watch keeps the index current in between).
    job_relist_seconds: float = 300.0
    #: Trainer log level passed to Jobs.
    trainer_log_level: str = "INFO"
    #: Extra environment for Jobs (``K=V,K2=V2``), e.g. HF_HUB_OFFLINE=1.
    job_env: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def s3(self) -> S3Config:
        """The operator's S3 client: bounded timeouts and few tries per request, since a failed pass is retried
        anyway (and an outage is probed, see ``storage_probe_seconds``)."""
        return S3Config(
            endpoint_url=self.s3_endpoint or None,
            region=self.s3_region,
            connect_timeout=min(5.0, self.request_timeout_seconds),
            read_timeout=self.request_timeout_seconds,
            max_attempts=2,
        )

    @property
    def policy(self) -> UriPolicy:
        """The URI policy these settings describe."""
        return UriPolicy(
            artifacts_uri=self.artifacts_uri,
            mode=self.uri_policy,
            namespace_prefix=self.namespace_prefix,
            grants=self.uri_grants,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``LANGMERGE_*`` variables; a malformed value is a :class:`SettingsError` naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f"LANGMERGE_{f.name.upper()}"
            if var not in env:
                continue
            raw = env[var].strip()
            default = f.default_factory() if callable(f.default_factory) else f.default
            try:
                values[f.name] = _parse(f.name, raw, default)
            except ValueError as err:
                raise SettingsError(f"{var}={raw!r}: {err}") from err
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.artifacts_uri.startswith("s3://"):
            raise SettingsError(f"LANGMERGE_ARTIFACTS_URI must be an s3:// URI, got {self.artifacts_uri!r}")
        for name in ("max_training_jobs", "max_merge_jobs", "history_limit", "workers"):
            if getattr(self, name) < 1:
                raise SettingsError(f"LANGMERGE_{name.upper()} must be >= 1")
        for name in (
            "resync_seconds",
            "progress_seconds",
            "request_timeout_seconds",
            "storage_probe_seconds",
            "job_relist_seconds",
            "serving_poll_seconds",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"LANGMERGE_{name.upper()} must be > 0")
        for name in ("max_training_jobs_per_namespace", "max_merge_jobs_per_namespace"):
            if getattr(self, name) < 0:
                raise SettingsError(f"LANGMERGE_{name.upper()} must be >= 0 (0: no per-namespace cap)")
        for name in ("max_job_cpu", "max_job_memory"):
            try:
                if parse_quantity(getattr(self, name)) <= 0:
                    raise ValueError("must be positive")
            except ValueError as err:
                raise SettingsError(f"LANGMERGE_{name.upper()}: {err}") from err
        try:
            parse_image(self.trainer_image)
        except ImageError as err:
            raise SettingsError(f"LANGMERGE_TRAINER_IMAGE: {err}") from err
        if self.training_runtime not in RUNTIMES:
            raise SettingsError(
                f"LANGMERGE_TRAINING_RUNTIME must be one of {', '.join(RUNTIMES)}, got {self.training_runtime!r}"
            )
        if self.training_runtime == "trainjob" and not self.trainjobs:
            raise SettingsError("LANGMERGE_TRAINING_RUNTIME=trainjob needs LANGMERGE_TRAINJOBS=true (Kubeflow Trainer)")
        if not _DNS_NAME.fullmatch(self.trainjob_runtime):
            raise SettingsError(f"LANGMERGE_TRAINJOB_RUNTIME must be an object name, got {self.trainjob_runtime!r}")
        if self.leader_election_namespace and not _DNS_NAME.fullmatch(self.leader_election_namespace):
            raise SettingsError(
                f"LANGMERGE_LEADER_ELECTION_NAMESPACE must be a namespace name, got {self.leader_election_namespace!r}"
            )
        if not _DNS_NAME.fullmatch(self.leader_election_lease_name):
            raise SettingsError(
                f"LANGMERGE_LEADER_ELECTION_LEASE_NAME must be an object name, got {self.leader_election_lease_name!r}"
            )
        if self.uri_policy not in (ENFORCE, OFF):
            raise SettingsError(f"LANGMERGE_URI_POLICY must be {ENFORCE} or {OFF}, got {self.uri_policy!r}")
        if self.namespace_prefix:
            try:
                example = self.policy.grants_for("example")[0].prefix
            except (KeyError, IndexError, ValueError) as err:
                raise SettingsError(
                    "LANGMERGE_NAMESPACE_PREFIX: a template with {artifactsUri} and {namespace} only"
                ) from err
            try:
                uri_segments(example)
            except UriError as err:
                raise SettingsError(f"LANGMERGE_NAMESPACE_PREFIX: {err}") from err
            if "{namespace}" not in self.namespace_prefix:
                raise SettingsError(
                    "LANGMERGE_NAMESPACE_PREFIX must be an s3:// template containing {namespace}, "
                    f"got {self.namespace_prefix!r}"
                )


def _parse(name: str, raw: str, default: Any) -> Any:
    if name in ("namespaces", "allowed_registries"):
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if name == "uri_grants":
        return parse_grants(raw)
    if name == "job_env":
        pairs = []
        for item in (x for x in raw.split(",") if x.strip()):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError("expected K=V pairs separated by commas")
            pairs.append((key.strip(), value))
        return tuple(pairs)
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
