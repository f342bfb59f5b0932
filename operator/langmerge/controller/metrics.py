"""Prometheus metrics of the operator."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_LAUNCHED = Counter("langmerge_jobs_launched_total", "Jobs created by the operator.", ["component"])
CACHE_HITS = Counter(
    "langmerge_fingerprint_cache_hits_total",
    "Desired states found already committed in S3 and adopted without a Job.",
    ["component"],
)
RECONCILE_SECONDS = Histogram(
    "langmerge_reconcile_seconds",
    "Time of one reconcile pass.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter("langmerge_reconcile_errors_total", "Reconcile passes that raised.", ["kind"])
TRAINING_SECONDS = Counter(
    "langmerge_training_seconds_total", "Wall seconds of committed training runs (from their manifests)."
)
TRAINING_GPU_SECONDS = Counter("langmerge_training_gpu_seconds_total", "GPU-seconds of committed training runs.")
PUBLISHED = Counter("langmerge_revisions_published_total", "Merged-model revisions published.", ["reason"])
QUALITY_GATE_BLOCKS = Counter("langmerge_quality_gate_blocks_total", "Merges held back by the quality gate.")
QUEUE_DEPTH = Gauge("langmerge_workqueue_depth", "Keys waiting in the reconcile queue.")
KUBE_REQUESTS = Counter(
    "langmerge_kube_requests_total",
    "Kubernetes API requests of the reconcilers (kopf's watches not included).",
    ["verb", "resource"],
)
S3_REQUESTS = Counter(
    "langmerge_s3_requests_total", "S3 requests by operation (ListObjectsV2, GetObject, ...).", ["operation"]
)
SLOT_WAITERS = Gauge("langmerge_slot_waiters", "Objects waiting for a Job slot.", ["component"])
