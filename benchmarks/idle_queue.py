"""Idle cost of a queue: an operator with many LanguageExperts waiting for a few training slots, doing nothing else.

On the real local control plane (kube-apiserver + SeaweedFS), the operator runs as its own process (``langmerge
run``); N experts are created, the first ``--slots`` get a Job (no Job runner: the Jobs stay running, the slots stay
full) and the rest queue. After a warm-up, over a window of ``--window`` seconds, it measures:

- the operator process's CPU time (user + system, from /proc) as a share of one core;
- S3 requests by kind (LIST = ListObjectsV2, GET, HEAD, PUT, ...) counted by an HTTP proxy in front of SeaweedFS;
- Job LISTs counted by the API server itself (``apiserver_request_total{verb="LIST",resource="jobs"}``; nothing
  else lists Jobs here: no Job runner runs, and the controller-manager watches).

``--operator-src LABEL=PATH`` (repeatable) measures other source trees in the same run, one after the other on the
same control plane (e.g. ``main=/work/main/operator`` as the baseline): the operator process imports ``langmerge``
from PATH. Without it the tree of this file is measured.

    python benchmarks/idle_queue.py                                   # 300 experts, 4 slots, poll 60 s, 120 s window
    python benchmarks/idle_queue.py --operator-src before=/path/to/main/operator --operator-src after=operator

Goal (issue 12, item 15): with 300 queued experts, at most 2% of a core and at most 1 S3 LIST per expert per poll
interval. Measured on the 2-core development machine (``--poll 300 --window 300``, the default poll interval), the
operator before and after the change in one run:

    source   queued  CPU % core  S3 LIST/min  S3 GET/min  Job LIST/min  LIST/expert/poll
    before      296       21.01        713.2      1258.4        1210.2            11.886
    after       296        1.49         60.4       108.9           0.2             1.006

(after: one data LIST per expert per poll, plus the base model's, shared by all; the Job LIST is the relist every
``job_relist_seconds``). With ``--poll 60`` the listing itself costs more: 6.1% of a core, 301 LISTs per minute.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(ROOT / "operator"))

from langmerge.dev.controlplane import ControlPlane, Endpoints  # noqa: E402
from langmerge.store import ObjectStore, S3Config  # noqa: E402

ROW = b'{"prompt": "q", "completion": " a"}\n'


# -- S3 request counting ---------------------------------------------------------------------------------------------
class CountingProxy:
    """A plain HTTP reverse proxy in front of S3 that counts requests by kind (headers, Host included, pass through
    unchanged, so request signatures stay valid)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                kind = proxy.kind(self.command, self.path)
                with proxy.lock:
                    proxy.counts[kind] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = getattr(self, "_upstream", None)
                if conn is None:
                    conn = self._upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()}
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    self._upstream = None
                    self.send_error(502)
                    return
                self.send_response_only(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def kind(method: str, path: str) -> str:
        query = parse_qs(urlsplit(path).query, keep_blank_values=True)
        if method == "GET" and "list-type" in query:
            return "LIST"
        return method

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)

    def close(self) -> None:
        self.server.shutdown()


# -- API server request counting ---------------------------------------------------------------------------------------
def job_lists(endpoints: Endpoints) -> float:
    """LIST requests on Jobs the API server has answered since it started."""
    ctx = ssl.create_default_context(cafile=endpoints.ca_file)
    req = urllib.request.Request(
        f"{endpoints.apiserver_url}/metrics", headers={"Authorization": f"Bearer {endpoints.token}"}
    )
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="jobs"' in line and 'verb="LIST"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the scenario -----------------------------------------------------------------------------------------------------
@dataclass
class Result:
    label: str
    source: str
    experts: int
    slots: int
    poll_seconds: int
    window_seconds: float
    queued: int
    cpu_share_of_a_core: float
    s3_per_minute: dict[str, float]
    job_lists_per_minute: float
    s3_lists_per_expert_per_poll: float


def kube_api(endpoints: Endpoints) -> Any:
    from langmerge.kube import load_client

    return load_client(endpoints.kubeconfig)


def create_experts(api: Any, namespace: str, bucket: str, count: int, poll: int) -> None:
    from kubernetes import client

    from langmerge.constants import EXPERT_PLURAL, GROUP, VERSION

    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    for i in range(count):
        spec = {
            "language": "es",
            "task": "dialog",
            "baseModel": {"uri": f"s3://{bucket}/base"},
            "dataset": {"uri": f"s3://{bucket}/data/{i:04d}"},
            "lora": {"rank": 4},
            "resources": {"gpus": 0},
            "schedule": {"pollIntervalSeconds": poll, "settleSeconds": 1},
        }
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LanguageExpert", "metadata": {"name": f"e{i:04d}"}}
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, {**body, "spec": spec})


def phases(api: Any, namespace: str) -> Counter[str]:
    from kubernetes import client

    from langmerge.constants import EXPERT_PLURAL, GROUP, VERSION

    items = client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL)
    return Counter(str((o.get("status") or {}).get("phase")) for o in items["items"])


@contextlib.contextmanager
def operator_process(
    source: Path, endpoints: Endpoints, s3_endpoint: str, namespace: str, bucket: str, slots: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        **endpoints.env(),
        "PYTHONPATH": str(source),
        "LANGMERGE_S3_ENDPOINT": s3_endpoint,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "LANGMERGE_ARTIFACTS_URI": f"s3://{bucket}/artifacts",
        "LANGMERGE_MAX_TRAINING_JOBS": str(slots),
        "LANGMERGE_METRICS_PORT": "0",
        "LANGMERGE_NAMESPACES": namespace,
        # One tenant: any URI, no per-namespace cap, no S3 Secret (no Job runs here anyway).
        "LANGMERGE_URI_POLICY": "off",
        "LANGMERGE_MAX_TRAINING_JOBS_PER_NAMESPACE": "0",
        "LANGMERGE_CHECK_S3_SECRET": "false",
    }
    code = "import langmerge, sys; print('langmerge from', langmerge.__file__, flush=True); from langmerge.cli import main; sys.exit(main(['run', '--namespace', sys.argv[1]]))"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, namespace],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(
    label: str, source: Path, endpoints: Endpoints, store: ObjectStore, args: argparse.Namespace, workdir: Path
) -> Result:
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    store.client.create_bucket(Bucket=bucket)
    store.put_bytes(f"s3://{bucket}/base/config.json", b'{"model_type": "llama"}')
    store.put_bytes(f"s3://{bucket}/base/model.safetensors", b"weights")
    for i in range(args.experts):
        store.put_bytes(f"s3://{bucket}/data/{i:04d}/part-0.jsonl", ROW)
    proxy = CountingProxy(endpoints.s3_endpoint)
    api = kube_api(endpoints)
    log = workdir / f"operator-{label}.log"
    try:
        with operator_process(source, endpoints, proxy.endpoint, namespace, bucket, args.slots, log) as proc:
            create_experts(api, namespace, bucket, args.experts, args.poll)
            deadline = time.monotonic() + args.settle_timeout
            while True:
                seen = phases(api, namespace)
                if seen.get("Training", 0) == args.slots and seen.get("Pending", 0) == args.experts - args.slots:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{label}: experts did not settle ({dict(seen)}); see {log}")
                time.sleep(2)
            time.sleep(args.warmup)
            s3_before, lists_before, cpu_before, t0 = (
                proxy.snapshot(),
                job_lists(endpoints),
                cpu_seconds(proc.pid),
                time.monotonic(),
            )
            time.sleep(args.window)
            s3_after, lists_after, cpu_after, t1 = (
                proxy.snapshot(),
                job_lists(endpoints),
                cpu_seconds(proc.pid),
                time.monotonic(),
            )
            queued = phases(api, namespace).get("Pending", 0)
    finally:
        proxy.close()
        from kubernetes import client

        with contextlib.suppress(Exception):
            client.CoreV1Api(api).delete_namespace(namespace)
        # The namespace controller lists every kind (Jobs too) while it empties the namespace: wait, so that the
        # next measurement does not count its LISTs.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and namespace in {
            n.metadata.name for n in client.CoreV1Api(api).list_namespace().items
        }:
            time.sleep(1)
        with contextlib.suppress(Exception):
            store.delete_prefix(f"s3://{bucket}")
            store.client.delete_bucket(Bucket=bucket)
    minutes = (t1 - t0) / 60
    s3 = {k: round((s3_after[k] - s3_before[k]) / minutes, 1) for k in sorted(set(s3_after) | set(s3_before))}
    lists = s3_after["LIST"] - s3_before["LIST"]
    return Result(
        label=label,
        source=str(source),
        experts=args.experts,
        slots=args.slots,
        poll_seconds=args.poll,
        window_seconds=round(t1 - t0, 1),
        queued=queued,
        cpu_share_of_a_core=round((cpu_after - cpu_before) / (t1 - t0), 4),
        s3_per_minute=s3,
        job_lists_per_minute=round((lists_after - lists_before) / minutes, 1),
        s3_lists_per_expert_per_poll=round(lists / args.experts / ((t1 - t0) / args.poll), 3),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=300)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--poll", type=int, default=60, help="spec.schedule.pollIntervalSeconds of every expert")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds after the queue formed, not measured")
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    parser.add_argument("--operator-src", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--state", type=Path, help="control-plane state folder to use (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sources = [(s.split("=", 1)[0], Path(s.split("=", 1)[1]).resolve()) for s in args.operator_src] or [
        ("this-tree", ROOT / "operator")
    ]
    with tempfile.TemporaryDirectory(prefix="idle-queue-") as tmp:
        cp = ControlPlane(args.state or Path(tmp) / "controlplane")
        endpoints = cp.start()
        try:
            from langmerge.kube import install_crds

            install_crds(kube_api(endpoints))
            store = ObjectStore.from_config(
                S3Config(endpoint_url=endpoints.s3_endpoint),
                aws_access_key_id=endpoints.s3_access_key,
                aws_secret_access_key=endpoints.s3_secret_key,
            )
            results = [measure(label, source, endpoints, store, args, Path(tmp)) for label, source in sources]
        finally:
            if not args.state:
                cp.stop()
    print(f"\n{args.experts} experts, {args.slots} training slots, poll {args.poll}s, measured over {args.window:.0f}s")
    print(
        f"{'source':<12} {'queued':>6} {'CPU % core':>10} {'S3 LIST/min':>12} {'S3 GET/min':>11} {'Job LIST/min':>13} {'LIST/expert/poll':>17}"
    )
    for r in results:
        print(
            f"{r.label:<12} {r.queued:>6} {r.cpu_share_of_a_core * 100:>10.2f} {r.s3_per_minute.get('LIST', 0):>12.1f} "
            f"{r.s3_per_minute.get('GET', 0):>11.1f} {r.job_lists_per_minute:>13.1f} {r.s3_lists_per_expert_per_poll:>17.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
